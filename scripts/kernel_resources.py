"""Compile every kernel specialisation in qeval/kernels/compile_cases.py for sm_80 and sm_90, with
no GPU, and print registers, spills, shared memory and the MMA instruction of each.

    python scripts/kernel_resources.py                      # the table
    python scripts/kernel_resources.py --json out.json      # and every row as JSON
    python scripts/kernel_resources.py --cases decode --targets 90 --jobs 2

Budgets (qeval/kernels/compile_check.py): no spills; shared memory within one CTA's limit
(sm_80 163 KB, sm_90 227 KB); decode and GEMV kernels ("occ" column) keep registers low enough
for 3 CTAs per SM: 65536 registers / (3 CTAs * 128 threads) = 170 registers per thread at
num_warps = 4 (168 after the allocation granularity of 8). tests/test_kernels_compile.py asserts
them from this script's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# kernels must be decorated for compilation, not the CPU interpreter, before qeval is imported
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, without its warning
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(name: str, target: int) -> dict:
    """Record the case's launch, compile it for ``sm_<target>``, read its resources."""
    from qeval.kernels import compile_cases, compile_check
    case = next(c for c in compile_cases.CASES if c.name == name)
    kernel = compile_cases.KERNELS[case.kernel]
    with compile_check.recording(*compile_cases.KERNELS.values()) as launches:
        case.launch()
    launch = next(launch for launch in launches if launch.kernel is kernel)
    t0 = time.perf_counter()
    compiled, log = compile_check.compile_launch(launch, target)
    row = {"case": name, "kernel": case.kernel, "target": target, "occupancy": case.occupancy,
           "constexprs": launch.constexprs, **compile_check.resources(compiled, target, log),
           "compile_s": round(time.perf_counter() - t0, 2)}
    row["failures"] = compile_check.budget_failures(row)
    return row


def _measure_packed(job):
    return measure(*job)


def main(argv=None) -> int:
    from qeval.kernels import compile_cases
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[], help="only cases whose name contains one of these")
    ap.add_argument("--targets", nargs="+", type=int, default=list(compile_cases.TARGETS))
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    args = ap.parse_args(argv)
    names = [c.name for c in compile_cases.CASES if not args.cases or any(s in c.name for s in args.cases)]
    jobs = [(n, t) for n in names for t in args.targets]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_measure_packed, jobs))
    else:
        rows = [measure(*job) for job in jobs]
    print(f"{'case':40s} {'sm':>3s} {'warps':>5s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} "
          f"{'CTA/SM':>6s} {'occ':>3s} {'async':>5s} {'mma':24s} budget")
    for r in rows:
        ctas = min(r["ctas_by_regs"], r["ctas_by_shared"])
        print(f"{r['case']:40s} {r['target']:3d} {r['num_warps']:5d} {r['regs']:4d} "
              f"{r['spill_stores']:5d} {r['shared'] / 1024:7.1f} {ctas:6d} "
              f"{'yes' if r['occupancy'] else '':>3s} {r['async_copies']:5d} {r['mma']:24s} "
              f"{'; '.join(r['failures']) or 'ok'}")
    for r in rows:
        print(f"  {r['case']} sm_{r['target']}: {r['constexprs']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
