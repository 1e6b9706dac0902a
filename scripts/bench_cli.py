"""How fast the command line answers, beside the cost of importing torch, in one run.

    python scripts/bench_cli.py                   # 5 rounds, results/bench/cli.json
    python scripts/bench_cli.py --rounds 9 --out /tmp/cli.json

Each round runs, interleaved in this order (so a machine that slows down slows every command
alike), one fresh process of each:

- ``python -c "import torch"``: the floor anything that touches a tensor pays;
- ``python -m qeval --help``, ``python -m qeval --version`` and a refused override
  (``python -m qeval method=unifrom``): what must answer without torch;
- ``python -m qeval model=tiny-random ...``: a real single run, timed from the process start to
  the line ``qeval: model ... loaded`` on its output (the wall time to the first model load:
  imports, validation, Hydra, loading) and to its exit.

Wall seconds per command: the median over the rounds, and each median as a ratio to ``import
torch``'s. A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["model=tiny-random", "task=passkey", "task.passkey.lengths=[240]", "task.passkey.depths=[0.5]",
       "task.passkey.samples_per_cell=1", "force=true"]
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "qeval --help": [sys.executable, "-m", "qeval", "--help"],
    "qeval --version": [sys.executable, "-m", "qeval", "--version"],
    "qeval method=unifrom (refused)": [sys.executable, "-m", "qeval", "method=unifrom"],
    "qeval single run": [sys.executable, "-m", "qeval", *RUN],
}


def timed(cmd: list[str], cwd: str) -> dict:
    """Wall seconds to exit, and to the model-loaded line where the command prints one."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    loaded = None
    for line in proc.stdout:
        if loaded is None and line.startswith("qeval: model ") and " loaded in " in line:
            loaded = time.perf_counter() - start
    proc.wait()
    return {"seconds": time.perf_counter() - start, "to_model_load": loaded, "rc": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results/bench/cli.json")
    a = ap.parse_args(argv)
    samples: dict[str, list[dict]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(a.rounds):
            for name, cmd in COMMANDS.items():
                samples[name].append(timed(cmd, cwd))
    base = statistics.median(s["seconds"] for s in samples["import torch"])
    rows = []
    for name, runs in samples.items():
        med = statistics.median(s["seconds"] for s in runs)
        loads = [s["to_model_load"] for s in runs if s["to_model_load"] is not None]
        row = {"command": name, "median_s": round(med, 3), "ratio_to_import_torch": round(med / base, 2),
               "min_s": round(min(s["seconds"] for s in runs), 3), "exit_codes": sorted({s["rc"] for s in runs})}
        if loads:
            row["median_to_model_load_s"] = round(statistics.median(loads), 3)
            row["model_load_ratio_to_import_torch"] = round(statistics.median(loads) / base, 2)
        rows.append(row)
        extra = (f", model loaded at {row['median_to_model_load_s']:.2f} s "
                 f"({row['model_load_ratio_to_import_torch']:.2f}x)" if loads else "")
        print(f"{name:34s} {med:7.2f} s  {med / base:5.2f}x import torch{extra}")
    out = {"device": f"{platform.machine()} CPU, {os.cpu_count()} cores", "python": platform.python_version(),
           "rounds": a.rounds, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"bench_cli: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
