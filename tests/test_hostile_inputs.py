"""Hostile files and strings: a CIFAR-10 batch that would run code, HTML built from strings that would inject
markup or script, terminal output of strings holding control sequences.

Each check looks at an independent fact: a marker file on disk that must not exist, the stdlib HTML
parser's view of a page, the characters that reach a stream.
"""

import io
import itertools
import json
import os
import pickle
import re
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from symgen.data import Cifar10Batches, load_dataset
from symgen.errors import MissingDataError

# ---------------------------------------------------------------------------------------------- CIFAR-10


class _RunsShell:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpensFile:
    """Unpickling calls ``open(path, "w")``: creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _EvalsCode:
    """Unpickling calls ``eval`` on code that creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w')",))


def _cifar_dir(tmp_path, payload, protocol):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({**good, b"labels": [0, payload]}, protocol=protocol))
    return base


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    ("make", "refused"),
    [
        (lambda m: _RunsShell(f"touch {m}"), r"(posix|nt|os)\.system"),
        (lambda m: _OpensFile(m), r"(builtins|__builtin__|io)\.open"),
        (lambda m: _EvalsCode(m), r"(builtins|__builtin__)\.eval"),
    ],
)
def test_malicious_cifar_batch_never_runs(tmp_path, make, refused, protocol):
    marker = tmp_path / "PWNED"
    _cifar_dir(tmp_path, make(marker), protocol)
    with pytest.raises(MissingDataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert not marker.exists(), "unpickling a CIFAR-10 batch ran the code it names"
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("refused to load ")
    assert "data_batch_1" in msg and "CIFAR-10 batches hold only arrays, lists and strings" in msg
    assert re.search(rf"refused to load {refused} from ", msg), msg
    with pytest.raises(MissingDataError, match="refused to load"):
        list(Cifar10Batches("test", tmp_path, batch_size=1))  # the lazy reader too
    assert not marker.exists()


def test_malicious_cifar_batch_one_line_from_the_cli(tmp_path, capsys):
    """``symgen audit --data cifar10 --root DIR`` on a hostile batch: exit 2, one line on stderr, no command run."""
    from symgen.cli import main

    marker = tmp_path / "PWNED"
    _cifar_dir(tmp_path, _RunsShell(f"touch {marker}"), 2)
    model = f"{os.path.join(os.path.dirname(__file__), 'audit_user_model.py')}:make_model"
    code = main(["audit", "--model", model, "--data", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refused to load" in lines[0] and "system" in lines[0], err


def test_numpy_global_tricks_are_refused(tmp_path):
    """Names of numpy and the codec module other than the admitted helpers are refused too."""
    marker = tmp_path / "PWNED"

    class _NumpyLoad:
        def __reduce__(self):
            return (np.save, (str(marker), np.zeros(1)))

    class _Codec:
        def __reduce__(self):
            import codecs

            return (codecs.encode, ("x", "rot13"))

    for payload, name in [(_NumpyLoad(), "numpy.save"), (_Codec(), "_codecs.encode")]:
        (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": payload}, protocol=4))
        with pytest.raises(MissingDataError) as err:
            load_dataset("cifar10", "test", root=tmp_path)
        assert "test_batch" in str(err.value) and name in str(err.value), str(err.value)
    assert not marker.exists() and not marker.with_suffix(".npy").exists()


# -------------------------------------------------------------------------------------------------- HTML

HOSTILE = [
    '"><script>alert(1)</script>',
    "'/onmouseover='alert(2)",
    'x" onmouseover="alert(3)',
    "javascript:alert(4)",
    "</script><script>alert(5)</script>",
    "<!--<script>",
    "<img src=x onerror=alert(6)>",
]
SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "thead", "tbody", "tr"}
PAGE_TAGS |= {
    "th",
    "td",
    "span",
    "figure",
    "img",
    "figcaption",
    "pre",
    "script",
    "a",
    "section",
}  # the audit page groups its figures in a <section>


class _Page(HTMLParser):
    """What a browser's tokenizer makes of a page: elements with their attributes, text, script bodies."""

    def __init__(self, html_text):
        super().__init__(convert_charrefs=True)
        self.elements, self.text, self.scripts = [], [], []
        self._script = None
        self.feed(html_text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, attrs))
        if tag == "script":
            self._script = (dict(attrs), [])

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script[0], "".join(self._script[1])))
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script[1].append(data)
        else:
            self.text.append(data)

    def handle_comment(self, data):
        raise AssertionError(f"a comment opened in the page: <!--{data}-->")

    def attrs(self, tag):
        return [dict(a) for t, a in self.elements if t == tag]


def _assert_inert(page):
    """No event handler, no script but the page's JSON, no tag the page does not write itself, safe ids."""
    assert not page.rawdata, f"unparsed rest of the page: {page.rawdata[:200]!r}"
    for tag, attrs in page.elements:
        assert tag in PAGE_TAGS, f"an injected <{tag}> element"
        for name, value in attrs:
            assert not name.lower().startswith("on"), f"<{tag} {name}={value!r}>: an event handler"
            if name == "id":
                assert SAFE_ID.match(value), f"unsafe id {value!r}"
            if name in ("href", "src"):
                assert not re.match(r"^\s*(javascript|vbscript):", value, re.I), f"<{tag} {name}={value!r}>"
    assert len(page.scripts) == 1, page.scripts
    attrs, body = page.scripts[0]
    assert attrs == {"type": "application/json", "id": "data"}
    assert "<" not in body and ">" not in body  # nothing inside can close the element or open a comment
    return json.loads(body)


def _png(path):
    """A valid 1x1 PNG file (written here, not by symgen)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(raw)
    return path


def test_run_report_from_hostile_result_is_inert(tmp_path):
    import yaml

    from symgen.report import write_report

    run = tmp_path / "run-1"
    (run / "figures").mkdir(parents=True)
    claims = [
        {
            "id": h,
            "statement": HOSTILE[(i + 1) % len(HOSTILE)],
            "measured": {h: 1.0},
            "threshold": h,
            "passed": i % 2 == 0,
            "note": h,
        }
        for i, h in enumerate(HOSTILE)
    ]
    tables = {h: [{"col " + h: h, "n": 1.5}] for h in HOSTILE}
    tables['x"/onmouseover="alert(1)'] = [{"a": 1}]
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": HOSTILE[0], "config": {h: h for h in HOSTILE}}))
    (run / "claims.json").write_text(json.dumps(claims))
    (run / "result.json").write_text(json.dumps({"tables": tables}))
    figure_names = ['"><img src=x onerror=alert(7)>', "'onmouseover='alert(8)'"]
    for name in figure_names:
        _png(run / "figures" / f"{name}.png")

    page = _Page((write_report(type("Run", (), {"path": run})())).read_text())
    data = _assert_inert(page)
    assert data == {"claims": claims}  # the page's JSON is the claims file, intact
    text = "".join(page.text)
    for h in HOSTILE:  # every hostile string is on the page, as text
        assert h in text, h
    assert 'x"/onmouseover="alert(1)' in text
    ids = [a["id"] for a in page.attrs("table") if "id" in a]
    assert len(ids) == len(set(ids)) == len(tables) + 1  # the claims table and one per result table
    imgs = page.attrs("img")
    assert sorted(a["alt"] for a in imgs) == sorted(figure_names)
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    rows = [a for a in page.attrs("tr") if "data-claim" in a]
    assert [a["data-claim"] for a in rows] == HOSTILE  # attribute values round-trip whole


def test_reproduce_index_from_hostile_summary_is_inert(tmp_path):
    from urllib.parse import unquote

    from symgen.report import render_index, safe_href

    reports = {
        "javascript:alert(1)": None,
        " java\tscript:alert(1)": None,
        "JAVASCRIPT:alert(1)": None,
        "data:text/html,<script>alert(1)</script>": None,
        "//evil.example/report.html": None,
        "\\\\evil.example\\report.html": None,
        'run 1/"><img src=x onerror=alert(1)>/report.html': "ok",
        "run-2/report.html": "ok",
    }
    claim = {"id": HOSTILE[2], "statement": HOSTILE[0], "measured": 0.5, "threshold": 0.1, "passed": True}
    summary = {
        "experiments": [
            {"name": h, "run": h, "report": r, "seconds": 1.0, "passed": 1, "claims": [claim]}
            for h, r in zip(HOSTILE + HOSTILE[:1], reports, strict=True)
        ],
        "machine": {h: h for h in HOSTILE},
        "versions": {"torch": HOSTILE[4]},
        "seed": HOSTILE[1],
        "settings": HOSTILE[5],
        "seconds": 2.0,
        "started": HOSTILE[0],
    }
    page = _Page(render_index(summary))
    assert _assert_inert(page) == summary
    hrefs = [a["href"] for a in page.attrs("a")]
    assert [unquote(h) for h in hrefs] == [r for r, ok in reports.items() if ok]  # the safe ones, percent-encoded
    assert all(not re.search(r'[\s"<>\']', h) for h in hrefs)
    assert all(safe_href(r) is None for r, ok in reports.items() if not ok)
    text = "".join(page.text)
    assert text.count("link refused") == 6 and all(h in text for h in HOSTILE)


def test_audit_page_from_hostile_result_is_inert(tmp_path):
    from symgen.audit.page import render_audit_page
    from symgen.audit.result import AuditResult, Estimate, SectionResult

    perf = SectionResult(name="performance", title=HOSTILE[3], flags=[HOSTILE[1]])
    perf.values[HOSTILE[2]] = Estimate(1.0, 0.1, note=HOSTILE[0])
    hess = SectionResult(name="hessian", title=HOSTILE[4], status="skipped", skipped=[HOSTILE[5], HOSTILE[6]])
    result = AuditResult(
        model=HOSTILE[0],
        data=HOSTILE[6],
        action=HOSTILE[1],
        budget=HOSTILE[2],
        device=HOSTILE[3],
        dtype=HOSTILE[4],
        seed=0,
        num_params=1,
        limits={h: h for h in HOSTILE},
        sections={"performance": perf, "hessian": hess},
        flags=[HOSTILE[5]],
    )
    figure = _png(tmp_path / "'onmouseover='alert(9)'.png")
    page = _Page(render_audit_page(result, [figure]))
    data = _assert_inert(page)
    assert data["model"] == HOSTILE[0] and data["limits"] == {h: h for h in HOSTILE}
    text = "".join(page.text)
    assert all(h in text for h in HOSTILE)
    assert [a["alt"] for a in page.attrs("img")] == ["'onmouseover='alert(9)'"]
    placeholders = [a["data-figure"] for a in page.attrs("figure") if "data-figure" in a]
    assert placeholders == ["hessian_density"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("summary", "summary"), ("scale symmetries", "scale-symmetries"), ('x"/onmouseover="a(1)', "x-onmouseover-a-1")],
)
def test_safe_id(name, expected):
    from symgen.report import safe_id

    assert safe_id(name) == expected


# ---------------------------------------------------------------------------------------------- terminal

TITLE = "\x1b]0;pwned\x07"  # OSC: sets the terminal window's title, ended by BEL
CLEAR = "\x1b[2J\x1b[H"  # CSI: clears the screen, cursor home
CSI_C1 = "\x9b31m"  # the one-character C1 CSI (U+009B): red text on terminals that honour C1
OVERWRITE = "ok\rFAIL"  # CR: the line's start is overwritten
HOSTILE_TTY = [TITLE, CLEAR, CSI_C1, OVERWRITE, "a\x00b\x7fc\x85d", "two\nlines\tand tab"]
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but newline and tab, DEL, C1


def test_printable_shows_control_characters_as_visible_escapes():
    from symgen.terminal import printable

    assert printable(TITLE) == "\\x1b]0;pwned\\x07"
    assert printable(CLEAR) == "\\x1b[2J\\x1b[H"
    assert printable(CSI_C1) == "\\u009b31m"
    assert printable(OVERWRITE) == "ok\\x0dFAIL"
    assert printable("a\x00b\x7fc\x85d") == "a\\x00b\\x7fc\\u0085d"
    assert printable("two\nlines\tand tab") == "two\nlines\tand tab"  # kept in a whole line
    assert printable("two\nlines\tand tab", keep="") == "two\\x0alines\\x09and tab"
    assert printable("Grüße, 日本, π ≈ 3.14") == "Grüße, 日本, π ≈ 3.14"  # text of any script is kept


def test_tables_and_claim_lines_print_no_control_characters():
    from symgen.terminal import claim_lines, text_table

    table = text_table(["name", TITLE], [[h, f"x{h}"] for h in HOSTILE_TTY])
    assert not CONTROL.search(table) and "\t" not in table
    lines = table.split("\n")
    assert len(lines) == 2 + len(HOSTILE_TTY)  # a newline in a cell did not break the table
    assert len({line.index("  x") for line in lines[2:]}) == 1  # one column start: widths counted once escaped
    assert "\\x1b]0;pwned\\x07" in lines[0] and "\\u009b31m" in table

    claims = [{"id": h, "passed": True, "measured": 0.5, "threshold": 0.1, "paper": h} for h in HOSTILE_TTY]
    out = claim_lines(claims, title=CLEAR)
    assert not CONTROL.search(out) and "\t" not in out
    assert out.startswith("\\x1b[2J\\x1b[H: 6/6 claims pass\n")
    assert len(out.split("\n")) == 3 + len(claims)


def test_progress_lines_and_json_print_no_control_characters(monkeypatch):
    from symgen.terminal import Ticker, dump_json, progress

    stream = io.StringIO()
    ticker = Ticker(TITLE + CSI_C1, total=2, stream=stream, interval=0.0)
    ticker.advance()
    assert stream.getvalue().startswith("  \\x1b]0;pwned\\x07\\u009b31m: 1/2") and not CONTROL.search(stream.getvalue())

    stream = io.StringIO()  # a pipe: plain lines, here one per item (each call of the clock is 100 s later)
    clock = itertools.count(0.0, 100.0)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    assert list(progress(range(3), desc=CLEAR + OVERWRITE, total=3, stream=stream)) == [0, 1, 2]
    monkeypatch.undo()
    assert len(stream.getvalue().splitlines()) == 3
    assert "\\x1b[2J" in stream.getvalue() and not CONTROL.search(stream.getvalue())

    stream = io.StringIO()
    obj = {"model": TITLE, "paths": HOSTILE_TTY}
    dump_json(obj, stream)
    assert not CONTROL.search(stream.getvalue()) and json.loads(stream.getvalue()) == obj


class _Terminal(io.StringIO):
    """A stream that says it is a terminal (rich draws its bar and its own colour codes)."""

    def isatty(self):
        return True


def test_progress_bar_in_a_terminal_shows_the_label_escaped():
    from symgen.terminal import progress

    stream = _Terminal()
    assert list(progress(range(2), desc=TITLE + "[bold]x[/bold]" + CSI_C1, total=2, stream=stream)) == [0, 1]
    out = stream.getvalue()
    assert "]0;pwned" not in out.replace("\\x1b]0;pwned", "")  # the OSC title sequence never reaches the terminal raw
    assert "\x07" not in out and "\x9b" not in out
    assert "\\x1b]0;pwned\\x07[bold]x[/bold]\\u009b31m" in out  # label shown as typed, markup literal


def test_cli_error_lines_show_control_characters_escaped(tmp_path, capsys):
    """A path with terminal escapes (window title, clear screen, BEL) reaches the CLI's error line escaped."""
    from symgen.cli import main

    hostile = tmp_path / "x\x1b]0;owned\x07\x1b[2Jy"
    code = main(["runs", "show", "nope", "--out", str(hostile)])
    captured = capsys.readouterr()
    assert code == 2
    for stream in (captured.out, captured.err):
        assert "\x1b" not in stream and "\x07" not in stream
    assert "x\\x1b]0;owned\\x07\\x1b[2Jy" in captured.err, captured.err  # the path is named, visibly
