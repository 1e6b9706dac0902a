"""A report that cannot be injected, crashed or hung (issue 33, part 3).

One table of hostile items: each case writes a results folder of real rows (as
:func:`test_report_cells.write` builds them, through :func:`qeval.results.write_run`) plus one
hostile item, runs ``python -m qeval.report``'s ``main`` and checks, for every case alike:

* it finishes, with exit status 0, within seconds (a FIFO or an alias bomb would hang it);
* the Markdown holds no ``<`` or ``>`` at all (so no HTML), every table row has exactly as many
  cells as its header (no cell or row fabricated);
* the LaTeX holds no special character that is not escaped, and as many cells per row as columns;
* no CSV cell starts like a formula (``= + @``, tab, CR; ``-`` only in a number);
* the skipped item is named in the output (file, line, key), and the finished runs are still there.

The same folder with every item at once runs as ``python -m qeval.report`` in a subprocess, and
``python -m qeval.sweep`` gets hostile markers."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_report_cells import write

from qeval import results
from qeval.report.__main__ import main

ENV = os.environ | {"OMP_NUM_THREADS": "1"}
SECONDS = 60   # a hanging report is killed here; a working one takes a few seconds
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
FORMULA = "=cmd|' /C calc'!A0"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def real_rows(root: Path, **changes) -> list[dict]:
    """The rows of a real-schema run (KV4 unless ``changes`` say otherwise), written elsewhere."""
    src = write(root / "_src", 0.7, **({"kv_bits": 4} | changes))
    return [json.loads(line) for line in (src / "rows.jsonl").read_text().splitlines()]


def run_with(root: Path, name: str, rows: list, config_yaml: str = "unused: true\n") -> Path:
    run_dir = root / "runs" / name
    results.write_run(run_dir, {"run_id": name, "status": "ok", "rows": rows}, rows, config_yaml)
    return run_dir


def one_bad_row(key, value, why: str | None = None):
    """A case: a real KV4 row, then the same row with ``key`` set to ``value`` (line 2, skipped,
    named by its line, its key and ``why``); ``key`` None: ``value`` is the whole line."""
    def build(root: Path):
        good = real_rows(root)[0]
        bad = value if key is None else good | {key: value}
        d = run_with(root, "hostile", [good, bad])
        return [f"{d / 'rows.jsonl'}:2", *([why] if why else []), *([f"key '{key}'"] if key and not why else [])]
    return build


def nested(depth: int) -> dict:
    out: dict = {}
    for _ in range(depth):
        out = {"a": out}
    return out


def named_value(key, value, **more):
    """A case: a valid row whose ``key`` holds a hostile value (kept, escaped everywhere)."""
    def build(root: Path):
        run_with(root, "hostile", [real_rows(root)[0] | {key: value} | more])
        return []
    return build


def alias_bomb(root: Path):
    rows = [{k: v for k, v in r.items() if k != "config"} for r in real_rows(root)]
    d = run_with(root, "bomb", rows, BOMB)   # rows without a config: config.yaml is read
    return [str(d / "config.yaml"), "aliases"]


def fifo(name: str):
    def build(root: Path):
        d = run_with(root, "fifo", real_rows(root))
        (d / name).unlink()
        os.mkfifo(d / name)
        return [str(d / name), "is a FIFO"]
    return build


def fifo_config(root: Path):
    rows = [{k: v for k, v in r.items() if k != "config"} for r in real_rows(root)]
    d = run_with(root, "fifo_config", rows)
    (d / "config.yaml").unlink()
    os.mkfifo(d / "config.yaml")
    (root / "bench").mkdir()
    os.mkfifo(root / "bench" / "gpu.json")
    return [str(d / "config.yaml"), "is a FIFO"]


CASES = {
    "script in a model name": named_value("model", SCRIPT),
    "img onerror in a method name": named_value("method", IMG),
    "pipe in a model name": named_value("model", "evil | fake | cells"),
    "newline in a model name": named_value("model", "evil\n| fabricated | row |\n"),
    "formula in a model name": named_value("model", FORMULA),
    "formula in a setting": named_value("setting", "+1+1"),
    "latex in a model name": named_value("model", r"\input{/etc/passwd} $x^2$ 100% #1 a_b ~{}&"),
    "NUL in a task name": named_value("task", "pass\x00key/../x"),
    "long model name": named_value("model", "m" * 900),
    "lone surrogate in a model name": named_value("model", "a\ud800b"),
    "unknown key holding a list": named_value("extra_key", [{"a": [1, 2]}]),
    "infinite value": named_value("value", float("inf")),
    "infinite passkey length": named_value("length", float("inf"), depth=0.5),
    "10 MB model name": one_bad_row("model", "m" * 10_000_000),
    "dict model name": one_bad_row("model", {"name": "toy"}),
    "list task": one_bad_row("task", ["passkey", "x"]),
    "number metric": one_bad_row("metric", 3),
    "text value": one_bad_row("value", "0.5"),
    "boolean bits": one_bad_row("kv_bits", True),
    "unknown status": one_bad_row("status", "maybe"),
    "integer beyond 64 bits": one_bad_row("value", 10**400),
    "config nested 40 deep": one_bad_row("config", nested(40), "nested more than"),
    "a key of 1000 characters": one_bad_row("k" * 1000, 1, "a key longer than"),
    "null row": one_bad_row(None, None, "a row must be a JSON object, not null"),
    "string row": one_bad_row(None, "just text", "a row must be a JSON object, not text"),
    "list row": one_bad_row(None, [1, 2], "a row must be a JSON object, not a list"),
    "YAML alias bomb config.yaml": alias_bomb,
    "FIFO rows.jsonl": fifo("rows.jsonl"),
    "FIFO result.json": fifo("result.json"),
    "FIFO config.yaml and bench": fifo_config,
}


def baseline(root: Path) -> None:
    write(root, 1.0)
    write(root, 0.5, kv_bits=2)


# ---------------------------------------------------------------------------- checks
def md_cells(line: str) -> list[str]:
    """A Markdown table row's cells, split where a pipe is not escaped (as GFM splits them)."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def check_markdown(text: str, where: str) -> None:
    assert "<" not in text and ">" not in text, f"{where}: raw HTML"
    width = None
    for line in text.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = md_cells(line)
        width = len(cells) if width is None else width
        assert len(cells) == width, f"{where}: a row with {len(cells)} cells under a header of {width}: {line[:200]}"


TEX_ESCAPES = re.compile(r"\\(textbackslash|textasciicircum|textasciitilde|textless|textgreater|textbar)\{\}"
                         r"|\\[{}$&#_%]")


def check_latex(text: str, where: str) -> None:
    ncols = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", text).group(1))
    lines = text.splitlines()
    body = lines[lines.index(r"\toprule") + 1:lines.index(r"\bottomrule")]
    caption = next(line for line in lines if line.startswith(r"\caption{"))
    for line in [*body, caption[len(r"\caption{"):-1]]:
        if line == r"\midrule":
            continue
        bare = TEX_ESCAPES.sub("", line).removesuffix(r" \\")
        cells = bare.split("&")
        assert len(cells) in (1, ncols), f"{where}: {len(cells)} cells, {ncols} columns: {line[:200]}"
        assert not re.search(r"[\\{}$#^_%~<>]", "".join(cells)), f"{where}: unescaped LaTeX: {line[:200]}"


def check_csv(path: Path) -> None:
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            for cell in row:
                assert not cell.startswith(("=", "+", "@", "\t", "\r")), f"{path}:{number}: {cell[:80]!r}"
                if cell.startswith("-"):
                    float(cell)   # only a number may start with a minus


def check_report(out: Path) -> None:
    for path in out.rglob("*"):
        assert path.name.isprintable(), f"a file name with a control character: {path.name!r}"
        if path.suffix == ".md":
            check_markdown(path.read_text(), path.name)
        elif path.suffix == ".tex":
            check_latex(path.read_text(), path.name)
        elif path.suffix == ".csv":
            check_csv(path)


# ---------------------------------------------------------------------------- the table
@pytest.mark.timeout(120)
@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_a_hostile_item_is_escaped_or_named_and_skipped(tmp_path, capsys, build):
    baseline(tmp_path)
    named = build(tmp_path)
    start = time.monotonic()
    assert main([str(tmp_path)]) == 0
    assert time.monotonic() - start < SECONDS
    said = capsys.readouterr()
    output = said.out + said.err
    for text in named:
        assert text in output, f"{text!r} not named in:\n{output[-3000:]}"
    if named:   # and once more at the end, with the count
        counts = re.search(r"^qeval.report: skipped (\d+) rows? and (\d+) files?", said.out, re.MULTILINE)
        assert counts and sum(map(int, counts.groups())) > 0, said.out
    out = tmp_path / "report"
    check_report(out)
    md = (out / "tables" / "all.md").read_text()
    assert "fp32" in md and "uniform KV2" in md, "the finished runs are still reported"
    assert sum(f.stat().st_size for f in out.rglob("*")) < 20 * 2**20, "the report blew up in size"


def test_escaped_names_stay_readable(tmp_path):
    baseline(tmp_path)
    run_with(tmp_path, "a", [real_rows(tmp_path)[0] | {"model": SCRIPT}])
    run_with(tmp_path, "b", [real_rows(tmp_path, kv_bits=3)[0] | {"model": "a|b", "value": -0.5}])
    assert main([str(tmp_path)]) == 0
    tables = tmp_path / "report" / "tables"
    md = (tables / "passkey.md").read_text()
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; |" in md and "| a\\|b |" in md
    assert r"\textless{}script\textgreater{}alert(1)\textless{}/script\textgreater{}" in (tables / "passkey.tex").read_text()
    cells = list(csv.DictReader((tables / "cells.csv").open(newline="")))
    assert "-0.5" in {c["value"] for c in cells}, "a negative number stays a number"


def test_a_formula_is_neutralised_in_every_csv(tmp_path):
    baseline(tmp_path)
    run_with(tmp_path, "f", [real_rows(tmp_path)[0] | {"model": FORMULA, "note": "@SUM(A1)", FORMULA: 1}])
    assert main([str(tmp_path)]) == 0
    out = tmp_path / "report"
    for path in (out / "rows.csv", out / "tables" / "cells.csv"):
        text = path.read_text()
        assert "'" + FORMULA in text and "," + FORMULA not in text and "\n" + FORMULA not in text, path
    assert "'@SUM(A1)" in (out / "rows.csv").read_text()


def test_long_names_are_cut_in_labels_and_file_names(tmp_path):
    baseline(tmp_path)
    task = "t" * 1000
    run_with(tmp_path, "long", [real_rows(tmp_path)[0] | {"model": "m" * 1000}])
    run_with(tmp_path, "long_task", [r | {"task": task} for r in real_rows(tmp_path)])
    assert main([str(tmp_path)]) == 0
    tables = tmp_path / "report" / "tables"
    assert "| " + "m" * 79 + "… |" in (tables / "passkey.md").read_text()
    names = [p.name for p in tables.iterdir()]
    assert all(len(n.encode()) < 200 for n in names) and any(n.startswith("t" * 50) for n in names)


def test_an_interrupted_run_fits_the_schema_and_is_listed_with_the_failed(tmp_path, capsys):
    baseline(tmp_path)
    row = real_rows(tmp_path)[0] | {"status": "interrupted", "metric": None, "value": None,
                                   "error": "interrupted: SIGTERM"}
    run_with(tmp_path, "stopped", [row])
    assert main([str(tmp_path)]) == 0
    assert "skipped" not in capsys.readouterr().err
    assert "interrupted: SIGTERM" in (tmp_path / "report" / "tables" / "failed.md").read_text()


def test_out_under_a_file_is_one_error_line_and_exit_status_2(tmp_path):
    baseline(tmp_path)
    (tmp_path / "file").write_text("x")
    p = subprocess.run([sys.executable, "-m", "qeval.report", str(tmp_path), "--out", str(tmp_path / "file" / "sub")],
                       capture_output=True, text=True, timeout=SECONDS, env=ENV, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("qeval.report: error:") and str(tmp_path / "file") in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.timeout(180)
def test_every_hostile_item_at_once_through_the_command_line(tmp_path):
    baseline(tmp_path)
    for i, build in enumerate(CASES.values()):
        case = tmp_path / f"case{i}"
        case.mkdir()
        build(case)
        for d in (case / "runs").iterdir():
            d.rename(tmp_path / "runs" / f"{i}-{d.name}")
        if (case / "bench").exists():
            (case / "bench").rename(tmp_path / "bench")
    p = subprocess.run([sys.executable, "-m", "qeval.report", str(tmp_path)], capture_output=True, text=True, check=False,
                       timeout=SECONDS, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for text in ("key 'model'", "key 'task'", "key 'metric'", "key 'value'", "is a FIFO", "aliases",
                 "a row must be a JSON object"):
        assert text in p.stderr, text
    assert re.search(r"qeval.report: skipped \d+ rows and \d+ files", p.stdout), p.stdout[-2000:]
    assert "\x1b" not in p.stdout + p.stderr and "\x00" not in p.stdout + p.stderr
    check_report(tmp_path / "report")
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert manifest["skipped"]["rows"] >= 10 and manifest["skipped"]["files"] >= 4, manifest["skipped"]


# ---------------------------------------------------------------------------- sweeps
def marker(sweep: Path, job, content) -> Path:
    path = sweep / ".qeval_cells" / f"{job:06d}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.timeout(120)
def test_hostile_markers_are_named_and_skipped_by_the_sweep_status(tmp_path):
    run = write(tmp_path, 0.5, kv_bits=2)
    fifo_run = run_with(tmp_path, "fifo", real_rows(tmp_path))
    (fifo_run / "rows.jsonl").unlink()
    os.mkfifo(fifo_run / "rows.jsonl")
    sweep = tmp_path / "sweep"
    (sweep / ".qeval_cells").mkdir(parents=True)
    (sweep / ".qeval_cells" / "total").write_text('"many"')
    cell = {"status": "done", "error": None, "overrides": ["kv_bits=2"], "seconds": 1.0}
    marker(sweep, 0, cell | {"job": 0, "run_dir": str(run)})
    marker(sweep, 1, cell | {"job": 1, "run_dir": str(fifo_run)})   # its rows are a FIFO
    marker(sweep, 2, cell | {"job": 2, "status": "failed", "error": "boom\x1b[2J\nsecond line", "run_dir": None})
    hostile = [marker(sweep, 3, "[1, 2]"), marker(sweep, 4, cell | {"job": "x"}),
               marker(sweep, 5, cell | {"job": 5, "overrides": "kv_bits=2"}), marker(sweep, 6, "{not json"),
               marker(sweep, 7, cell | {"job": 7, "status": "weird"}), marker(sweep, 8, " " * (2 * 2**20) + "{}"),
               marker(sweep, 9, cell | {"job": 9, "error": {"a": 1}})]
    fifo_marker = sweep / ".qeval_cells" / "000010.json"
    os.mkfifo(fifo_marker)
    p = subprocess.run([sys.executable, "-m", "qeval.sweep", str(sweep)], capture_output=True, text=True, check=False,
                       timeout=SECONDS, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "? cells: done 2, skipped 0, failed 1" in p.stdout, p.stdout
    for path in [*hostile, fifo_marker]:
        assert f"skipped marker {path}" in p.stdout, (path, p.stdout)
    assert "\x1b" not in p.stdout and "boom [2J second line" in p.stdout

    from qeval.sweep.summary import comparison, read_markers
    table = comparison(read_markers(sweep))   # the FIFO run's rows are left out, never waited on
    assert "0.500" in table
