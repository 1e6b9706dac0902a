"""Generation time of each KV method's torch path against transformers' caches, side by side.

    python scripts/bench_methods.py                               # tiny-random, 512 / 1k / 2k
    python scripts/bench_methods.py --contexts 512 --new-tokens 32 --repeats 1

For each context length: greedy generation of ``--new-tokens`` tokens (batch 1, random prompt ids)
with the unquantized ``DynamicCache``, transformers' ``QuantizedCache`` (quanto backend, same bits;
HQQ when quanto is missing), and qeval's KIVI, GEAR and H2O caches (``cache`` semantics, torch
path, their config defaults). Time = median wall clock of ``--repeats`` runs after a warm-up; the
ratios are against ``DynamicCache`` (target <= 1.5) and ``QuantizedCache`` (target <= 1.0). Rows
land in ``--out`` (JSON) as well as on stdout. This is a benchmark, not a test: the numbers depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import DynamicCache, QuantizedCache

ROOT = Path(__file__).resolve().parent.parent

from qeval.kv.cache import cache_kwarg
from qeval.recipe.build import shorthand
from qeval.methods.base import Bits, Knobs
from qeval.model import loading
from qeval.model.handle import Handle


def quantized_cache_backend() -> str | None:
    from transformers.utils import is_hqq_available, is_optimum_quanto_available
    if is_optimum_quanto_available():
        return "quanto"
    return "hqq" if is_hqq_available() else None


def method_cache_factory(model, name: str, bits: int):
    """() -> a fresh qeval cache for ``name`` at ``bits`` (H2O: 16), with its attention function set."""
    cfg = OmegaConf.load(ROOT / "qeval" / "configs" / "method" / f"{name}.yaml")
    b = 16 if name == "h2o" else bits
    method = shorthand(name, cfg, Knobs(Bits(16, 16, b, b), kv_semantics="cache"))
    attention = method.attention_implementation("sdpa")
    handle = Handle(model, None, method, "cache")

    def make(mask):
        model.set_attn_implementation(attention or "sdpa")
        return handle.new_cache(mask)
    return make


def time_generate(model, caches: dict, ids, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds per cache; repeats are interleaved across caches so drifting machine load
    (a shared CPU) hits every cache alike."""
    mask = torch.ones_like(ids)

    def once(make, n):
        cache = make(mask)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    for make in caches.values():
        once(make, 4)   # warm-up
    runs: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(repeats):
        for name, make in caches.items():
            runs[name].append(once(make, new_tokens))
    return {name: statistics.median(t) for name, t in runs.items()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-random", help="a qeval/configs/model/<name>.yaml")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "cpu-methods.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = OmegaConf.load(ROOT / "qeval" / "configs" / "model" / f"{args.model}.yaml")
    model, _ = loading.load(model_cfg, "cpu", "float32", "sdpa", 0)
    vocab = model.config.vocab_size
    backend = quantized_cache_backend()
    caches = {"DynamicCache": lambda mask: (model.set_attn_implementation("sdpa"),
                                           DynamicCache(config=model.config))[1]}
    if backend:
        caches[f"QuantizedCache[{backend}]"] = lambda mask: (
            model.set_attn_implementation("sdpa"),
            QuantizedCache(backend=backend, config=model.config, nbits=args.bits, q_group_size=32,
                           residual_length=128))[1]
    else:
        print("bench_methods: neither optimum-quanto nor hqq is installed; QuantizedCache is skipped")
    for name in ("kivi", "gear", "h2o"):
        caches[name] = method_cache_factory(model, name, args.bits)

    rows = []
    g = torch.Generator().manual_seed(0)
    for ctx in args.contexts:
        ids = torch.randint(4, vocab, (1, ctx), generator=g)
        times = time_generate(model, caches, ids, args.new_tokens, args.repeats)
        base = times["DynamicCache"]
        peer = next((t for n, t in times.items() if n.startswith("QuantizedCache")), None)
        for name, t in times.items():
            rows.append({"context": ctx, "cache": name, "bits": 16 if name in ("DynamicCache", "h2o") else args.bits,
                         "new_tokens": args.new_tokens, "seconds": t, "ms_per_token": 1000 * t / args.new_tokens,
                         "vs_dynamic": t / base, "vs_quantized_cache": None if peer is None else t / peer})
    print(f"{'context':>7} {'cache':<24} {'bits':>4} {'ms/token':>9} {'vs Dynamic':>10} {'vs Quantized':>12}")
    for r in rows:
        vq = "-" if r["vs_quantized_cache"] is None else f"{r['vs_quantized_cache']:.2f}"
        print(f"{r['context']:>7} {r['cache']:<24} {r['bits']:>4} {r['ms_per_token']:>9.2f} "
              f"{r['vs_dynamic']:>10.2f} {vq:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "device": "cpu", "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"bench_methods: rows written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
