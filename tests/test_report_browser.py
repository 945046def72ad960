"""The audit's report.html opened in a real headless Chromium: figures render, the table holds audit.json's numbers.

Chromium is driven through its command line only (``--dump-dom`` of a copy of the page with a probe
script injected, and ``--screenshot``); no Python browser bindings are needed. Skips when Chromium
is not installed (``make test`` installs Debian's ``chromium`` where it can).
"""

import html.parser
import json
import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

USER_MODEL = Path(__file__).parent / "audit_user_model.py"
CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if shutil.which(n)
    ),
    None,
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
]

# Runs after the page's load event: records what the browser made of every <img>, and whether the
# embedded JSON parses, into a <pre id="probe"> that --dump-dom then serializes.
PROBE = """<script>
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'probe';
  var data = null;
  try { data = JSON.parse(document.getElementById('data').textContent); } catch (e) { data = null; }
  out.textContent = JSON.stringify({
    images: Array.prototype.map.call(document.images, function (i) {
      return {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete};
    }),
    json_ok: data !== null && typeof data.sections === 'object',
    summary_rows: document.querySelectorAll('table#summary tbody tr').length
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium(args, tmp_path, timeout=90):
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


class _Tables(html.parser.HTMLParser):
    """Cells of every <table id=...> and the text of <pre id="probe">."""

    def __init__(self):
        super().__init__()
        self.tables, self.probe = {}, ""
        self._table = self._row = self._cell = None
        self._in_probe = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "pre" and attrs.get("id") == "probe":
            self._in_probe = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_probe = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_probe:
            self.probe += data


def _png_size(path):
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _close(text, value):
    got = float(text)
    if value is None:  # NaN in JSON
        return math.isnan(got)
    return math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-12)


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    from symgen.runs import run_audit

    out = tmp_path_factory.mktemp("runs")
    limits = dict(
        time_limit=600.0,
        eval_num_data=200,
        invariance_num_data=64,
        symmetry_num_data=16,
        hessian_num_data=64,
        hutchinson_probes=8,
        top_eigenvalues=2,
        eigen_iters=8,
        density_runs=1,
        density_steps=10,
        noise_num_data=64,
        noise_num_samples=4,
        ntk_num_data=16,
        ntk_subsamples=2,
        pgd_num_data=48,
        pgd_steps=3,
    )
    result, run = run_audit(f"{USER_MODEL}:make_model", "digits", action="c4", out=out, limits=limits)
    return result, run.path


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install chromium "
    "chromium-driver; `make test` tries); the browser test is skipped",
)
def test_report_renders_in_chromium(audit_run, tmp_path):
    result, run_dir = audit_run
    page = (run_dir / "report.html").read_text()
    audit_json = json.loads((run_dir / "audit.json").read_text())
    figures = sorted((run_dir / "figures").glob("*.png"))
    assert sorted(f.stem for f in figures) == [
        "hessian_density",
        "invariance",
        "noise_stability",
        "ntk_spectrum",
        "robustness",
    ]
    assert all(s["status"] == "ok" for s in audit_json["sections"].values())

    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path)
    parsed = _Tables()
    parsed.feed(dom)
    assert parsed.probe, "the probe script did not run: no <pre id='probe'> in the dumped DOM"
    probe = json.loads(parsed.probe)

    # Every figure file is on the page and decoded by the browser at the PNG's own size.
    images = {i["alt"]: i for i in probe["images"]}
    for fig in figures:
        assert fig.stem in images, f"figure {fig.name} is not on the page"
        img = images[fig.stem]
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
        assert (img["width"], img["height"]) == _png_size(fig)
    assert probe["json_ok"], "the page's embedded JSON did not parse in the browser"

    # The summary table as rendered holds exactly audit.json's values and standard errors.
    rows = parsed.tables["summary"]
    header, body = rows[0], rows[1:]
    assert header[:4] == ["section", "metric", "value", "stderr"]
    assert probe["summary_rows"] == len(body)
    expected = {(s, m): v for s, sec in audit_json["sections"].items() for m, v in sec["values"].items()}
    assert {(r[0], r[1]) for r in body} == set(expected)
    assert len(expected) >= 15
    for section, metric, value, stderr, *_ in body:
        want = expected[(section, metric)]
        assert _close(value, want["value"]), (section, metric, value, want)
        if want["stderr"] is None:
            assert stderr == "-", (section, metric, stderr)
        else:
            assert _close(stderr, want["stderr"]), (section, metric, stderr, want)
    # Each section's cost and status is on the page too.
    sections = {r[0]: r for r in parsed.tables["sections"][1:]}
    assert set(sections) == set(audit_json["sections"])
    for name, sec in audit_json["sections"].items():
        assert sections[name][1] == sec["status"]
        assert _close(sections[name][2], sec["seconds"]) or abs(float(sections[name][2]) - sec["seconds"]) < 1e-3


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed; the browser test is skipped")
def test_report_screenshot_shows_figures(audit_run, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    _, run_dir = audit_run
    shot = tmp_path / "shot.png"
    _chromium(["--window-size=1000,3000", f"--screenshot={shot}", (run_dir / "report.html").as_uri()], tmp_path)
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the screenshot is blank"
    # matplotlib's default blue (#1f77b4) appears only inside the figures, never in the page's CSS.
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255.0).max(-1) < 0.04
    assert blue.sum() > 500, f"no figure pixels in the screenshot ({int(blue.sum())} blue pixels)"


INDEX_PROBE = """<script>
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'probe';
  var data = JSON.parse(document.getElementById('data').textContent);
  out.textContent = JSON.stringify({
    rows: Array.prototype.map.call(document.querySelectorAll('table#claims tbody tr'), function (r) {
      return {claim: r.getAttribute('data-claim'), ours: r.querySelector('.ours').textContent,
              verdict: r.cells[2].textContent, href: r.querySelector('a').getAttribute('href')};
    }),
    experiments: data.experiments.length
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed; the browser test is skipped")
def test_reproduce_index_renders_in_chromium(tmp_path, monkeypatch):
    """`symgen reproduce` writes index.html: every claim with its verdict and headline number equal to the
    JSON, each linking to its experiment's report, whose figures load in the browser too."""
    from symgen.cli import main
    from symgen.terminal import claim_headline

    monkeypatch.setattr("symgen.experiments.REGISTRY", {"toy": "toy_experiment"})
    out = tmp_path / "runs"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "reproduce.json").read_text())
    probed = out / "probed.html"
    probed.write_text((out / "index.html").read_text().replace("</body>", INDEX_PROBE + "</body>"))
    parsed = _Tables()
    parsed.feed(_chromium(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path))
    probe = json.loads(parsed.probe)
    claims = [(e, c) for e in summary["experiments"] for c in e["claims"]]
    assert len(probe["rows"]) == len(claims) == 2
    for row, (exp, c) in zip(probe["rows"], claims, strict=True):
        assert row["claim"] == f"{exp['name']}:{c['id']}"
        assert row["verdict"] == ("PASS" if c["passed"] else "FAIL")
        h = claim_headline(c)
        key, value = row["ours"].split(" = ")
        assert key == h["key"] and _close(value, h["measured"]), (row, h)
        assert (out / row["href"]).is_file()
    # The linked experiment report: its figure decodes in the browser.
    report = out / probe["rows"][0]["href"]
    page = report.read_text().replace(
        "</body>", PROBE.replace("typeof data.sections === 'object'", "Array.isArray(data.claims)") + "</body>"
    )
    probed_report = tmp_path / "report_probed.html"
    probed_report.write_text(page)
    parsed = _Tables()
    parsed.feed(_chromium(["--virtual-time-budget=5000", "--dump-dom", probed_report.as_uri()], tmp_path))
    rprobe = json.loads(parsed.probe)
    assert rprobe["json_ok"] and rprobe["images"] and all(i["complete"] and i["width"] > 0 for i in rprobe["images"])


def test_skipped_section_says_so_where_its_figure_would_be(audit_run):
    """A section that did not run leaves a placeholder with the reason in place of its figure."""
    from symgen.audit import AuditResult
    from symgen.audit.page import render_audit_page

    result, run_dir = audit_run
    data = json.loads((run_dir / "audit.json").read_text())
    data["sections"]["hessian"]["status"] = "skipped"
    data["sections"]["hessian"]["skipped"] = ["not requested (sections=...)"]
    page = render_audit_page(
        AuditResult.from_dict(data),
        [f for f in sorted((run_dir / "figures").glob("*.png")) if f.stem != "hessian_density"],
    )
    assert 'data-figure="hessian_density"' in page and "not requested (sections=...)" in page
    assert 'data-figure="invariance"' not in page


PWN = "document.body.appendChild(document.createElement('pwned'))"  # what every payload below would run
PAYLOADS = [
    f"</td><script>{PWN}</script>",
    f'"><img src=x onerror="{PWN}">',
    f"' autofocus onfocus='{PWN}' x='",
    f"</script><script>{PWN}</script>",
    f"<!--<script>{PWN}</script>",
    f'<svg onload="{PWN}"></svg>',
    f'"><img/src="x"/onerror="{PWN}">',  # no space: survives the former id = name.replace(" ", "-")
]


class _Elements(html.parser.HTMLParser):
    """Tag names, attributes and text of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed; the browser test is skipped")
def test_hostile_strings_run_nothing_in_chromium(tmp_path):
    """A run report and a reproduce page built from strings that would inject script: Chromium loads them,
    runs none of it (no <pwned> element appears), shows each string as text, and the page's JSON parses."""
    import yaml

    from symgen.report import render_index, write_report

    run = tmp_path / "run-1"
    (run / "figures").mkdir(parents=True)
    claims = [
        {"id": p, "statement": p, "measured": {p: 1.0}, "threshold": 0.5, "passed": True, "note": p} for p in PAYLOADS
    ]
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": PAYLOADS[0], "config": {p: p for p in PAYLOADS}}))
    (run / "claims.json").write_text(json.dumps(claims))
    (run / "result.json").write_text(json.dumps({"tables": {p: [{p: p}] for p in PAYLOADS}}))
    page = write_report(type("Run", (), {"path": run})()).read_text()
    summary = {
        "experiments": [
            {"name": p, "run": p, "report": r, "seconds": 1.0, "passed": 1, "claims": claims[:1]}
            for p, r in zip(PAYLOADS, [f"javascript:{PWN}", "//evil.example/r.html", "run-1/report.html"], strict=False)
        ],
        "machine": {p: p for p in PAYLOADS},
        "versions": {},
        "seconds": 1.0,
        "started": PAYLOADS[1],
    }
    index = render_index(summary)
    probe = PROBE.replace(
        "typeof data.sections === 'object'", "(Array.isArray(data.claims) || Array.isArray(data.experiments))"
    )
    for name, text in (("report.html", page), ("index.html", index)):
        path = tmp_path / name
        path.write_text(text.replace("</body>", probe + "</body>"))
        dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", path.as_uri()], tmp_path)
        parsed = _Elements()
        parsed.feed(dom)
        tags = [t for t, _ in parsed.tags]
        assert "pwned" not in tags, f"{name}: a payload ran in the browser"
        assert "svg" not in tags and tags.count("img") == 0, f"{name}: an injected element"
        assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
        hrefs = [attrs.get("href", "") for t, attrs in parsed.tags if t == "a"]
        assert hrefs == ([] if name == "report.html" else ["run-1/report.html"])
        text_seen = "".join(parsed.text)
        assert all(p in text_seen for p in PAYLOADS), name
        assert '"json_ok":true' in text_seen, f"{name}: the page's JSON did not parse in the browser"
