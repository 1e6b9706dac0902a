"""Multiple-choice log-likelihood throughput: stock lm-eval ``HFLM``, qeval's prefill scoring with
every request prefilled on its own, and with each shared context prefilled once, side by side.

    python scripts/bench_mc_scoring.py                            # tiny-random, KIVI-2, 600-token contexts
    python scripts/bench_mc_scoring.py --context 1200 --questions 16 --method kv_bits=16

MMLU-shaped requests: ``--questions`` few-shot contexts of ``--context`` tokens, four single-token
choices each (" A" .. " D"). Each path scores the same requests in batches of ``--batch-size``;
requests per second is the median of ``--repeats`` timed runs after a warm-up. Stock HFLM scores
in one pass and never reads a ``cache``-semantics quantized cache (it is the speed reference, not
a faithful path for KIVI); the two prefill paths read the method's cache for every scored token.
Rows go to ``--out`` (JSON) as well as stdout. A benchmark, not a test: numbers depend on the
machine and its load; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval_fixtures import handle_for  # noqa: E402

from qeval.tasks.lm_eval.model import QevalLM  # noqa: E402


def requests(tokenizer, questions: int, context: int) -> list:
    reqs = []
    for q in range(questions):
        text = "".join(f"Question {q}.{i}: which number follows {i + q}? Answer: {i + q + 1}\n" for i in range(400))
        ctx = tokenizer.encode(text)[:context]
        for choice in (" A", " B", " C", " D"):
            reqs.append((("ctx", choice), ctx, tokenizer.encode(choice, add_special_tokens=False)))
    return reqs


def per_request_prefill(lm: QevalLM, reqs, bs: int) -> list:
    """qeval's prefill scoring before contexts were shared: batches of ``bs`` requests, each
    request prefilling its own context."""
    out = []
    for i in range(0, len(reqs), bs):
        for r in reqs[i:i + bs]:
            out += lm._score_batch([r])
    return out


def timed(fn, repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", nargs="*", default=["method=kivi", "kv_bits=2"])
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "mc_scoring.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = handle_for(*args.method, "kv_semantics=cache")
    reqs = requests(handle.tokenizer, args.questions, args.context)
    stock = HFLM(pretrained=handle.model, tokenizer=handle.tokenizer, batch_size=args.batch_size, device="cpu")
    ours = QevalLM(handle, batch_size=args.batch_size)
    seconds = {
        "stock HFLM (one pass)": timed(lambda: stock._loglikelihood_tokens(reqs, disable_tqdm=True), args.repeats),
        "qeval prefill, per request": timed(lambda: per_request_prefill(ours, reqs, args.batch_size), args.repeats),
        "qeval prefill, shared context": timed(lambda: ours._loglikelihood_tokens(reqs), args.repeats),
    }
    base = seconds["qeval prefill, per request"]
    rows = [{"path": k, "requests_per_s": len(reqs) / s, "speedup_vs_per_request": base / s,
             "vs_stock": seconds["stock HFLM (one pass)"] / s} for k, s in seconds.items()]
    meta = {"method": args.method, "context": args.context, "requests": len(reqs), "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "machine": f"{platform.processor() or platform.machine()}"}
    for r in rows:
        print(f"{r['path']:32s} {r['requests_per_s']:8.1f} req/s   x{r['speedup_vs_per_request']:.2f} vs per-request   "
              f"x{r['vs_stock']:.2f} vs stock")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
