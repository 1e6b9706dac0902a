"""Benchmark the packed-KV kernels on a CUDA GPU; results land in results/bench/<device>-kv.json.

    python scripts/bench_kv_kernels.py                          # both sections
    python scripts/bench_kv_kernels.py --sections kv --batch 1 8 --context 8192

Sections (each ``section(args) -> rows``, the convention of ``scripts/bench_kernels.py``, which can
import ``SECTIONS`` from here and run them beside the weight kernels):

- ``kv``: fused decode attention over a KIVI-packed cache (2 / 4 / 8 bits, G = 32, a 128-token
  fp16 residual) against fp16 ``scaled_dot_product_attention`` over the same context and against
  dequantize-then-attend in torch, on Llama-2-7B's attention (32 heads x 128), batch 1-64,
  context 1k-32k. Achieved GB/s come from the bytes the kernel must read,
      bytes = B * Hkv * [T_q * D * (k_bits + v_bits) / 8          (codes)
                         + 2 * 2 * T_q * D / G * 2                (fp16 scale + zero, K and V)
                         + 2 * R * D * 2]                          (fp16 residual K and V)
              + 2 * B * Hq * D * 2                                 (query in, output out)
  (fp16 SDPA: 2 * B * Hkv * T * D * 2 + the same query/output term), printed beside the device's
  measured copy bandwidth (2 x bytes of a 512 MiB device-to-device copy / time).
- ``kv_e2e``: KIVI's throughput-vs-batch comparison: greedy decoding on a randomly initialised
  Llama-2-7B-shaped fp16 model (speed does not depend on weight values) with an fp16 cache,
  KIVI-2 and KIVI-4 (``backend=triton``: packed cache, fused decode attention), batch doubling
  until out of memory; tokens/s (generated tokens / wall time) and peak memory per batch.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median of repetitions) for kernels,
median of wall-clock runs after a warm-up generation end to end. Without CUDA the script exits
with one line (the kernels' correctness tests run on a CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from qeval.kv.cache import cache_kwarg

HQ, HKV, HEAD_DIM = 32, 32, 128        # Llama-2-7B attention
GROUP, RESIDUAL = 32, 128              # KIVI's G and R
BATCHES = [1, 4, 8, 16, 32, 64]
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 28, dtype=torch.float16, device="cuda").normal_()   # 512 MiB
    dst = torch.empty_like(src)
    gbs = 2 * src.nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return gbs


def packed_cache(B: int, T: int, bits: int, dtype=torch.float16):
    """Random words / scales (speed does not depend on values) in kv_pack's layout."""
    from qeval.kernels.kv_pack import codes_per_word
    tq, fpi, dev = T - RESIDUAL, codes_per_word(bits), "cuda"
    words = lambda *s: torch.randint(-2**31, 2**31 - 1, s, dtype=torch.int32, device=dev)  # noqa: E731
    small = lambda *s: torch.rand(s, dtype=dtype, device=dev) * 0.1  # noqa: E731
    return (words(B, HKV, tq // fpi, HEAD_DIM), small(B, HKV, tq // GROUP, HEAD_DIM),
            small(B, HKV, tq // GROUP, HEAD_DIM), words(B, HKV, tq, HEAD_DIM // fpi),
            small(B, HKV, tq, HEAD_DIM // GROUP), small(B, HKV, tq, HEAD_DIM // GROUP),
            torch.randn(B, HKV, RESIDUAL, HEAD_DIM, dtype=dtype, device=dev),
            torch.randn(B, HKV, RESIDUAL, HEAD_DIM, dtype=dtype, device=dev))


def kernel_bytes(B: int, T: int, bits: int) -> int:
    tq = T - RESIDUAL
    per_head = (tq * HEAD_DIM * 2 * bits // 8 + 2 * 2 * tq * HEAD_DIM // GROUP * 2
                + 2 * RESIDUAL * HEAD_DIM * 2)
    return B * HKV * per_head + 2 * B * HQ * HEAD_DIM * 2


def fp16_bytes(B: int, T: int) -> int:
    return 2 * B * HKV * T * HEAD_DIM * 2 + 2 * B * HQ * HEAD_DIM * 2


def section_kv(args) -> list[dict]:
    from qeval.kernels.kv_decode_attention import decode_attention
    from qeval.kernels.kv_decode_reference import decode_attention_torch
    copy = args.copy_gbs
    free = torch.cuda.mem_get_info()[0]
    rows = []
    for T in args.context:
        for B in args.batch:
            if 3 * fp16_bytes(B, T) > free:   # fp16 K/V + dequantized copy + headroom
                rows.append({"batch": B, "context": T, "status": "skipped: memory"})
                continue
            q = torch.randn(B, HQ, 1, HEAD_DIM, dtype=torch.float16, device="cuda")
            k = torch.randn(B, HKV, T, HEAD_DIM, dtype=torch.float16, device="cuda")
            v = torch.randn_like(k)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            ms_fp16 = bench_ms(lambda: sdpa(q, k, v, enable_gqa=HQ != HKV))
            del k, v
            for bits in args.bits:
                cache = packed_cache(B, T, bits)
                kw = dict(k_bits=bits, v_bits=bits, group_size=GROUP)
                ms_fused = bench_ms(lambda: decode_attention(q, *cache, **kw))
                ms_deq = bench_ms(lambda: decode_attention_torch(q, *cache, **kw, use_sdpa=True))
                nbytes = kernel_bytes(B, T, bits)
                row = {"batch": B, "context": T, "bits": bits, "group_size": GROUP,
                       "residual": RESIDUAL, "ms_fused": ms_fused, "ms_fp16_sdpa": ms_fp16,
                       "ms_dequant_sdpa": ms_deq, "speedup_vs_fp16": ms_fp16 / ms_fused,
                       "speedup_vs_dequant": ms_deq / ms_fused, "bytes_read": nbytes,
                       "gbs_fused": nbytes / ms_fused / 1e6,
                       "gbs_fp16_sdpa": fp16_bytes(B, T) / ms_fp16 / 1e6, "copy_gbs": copy,
                       "fraction_of_copy": nbytes / ms_fused / 1e6 / copy, "status": "ok"}
                rows.append(row)
                print(f"kv B={B:3d} T={T:6d} {bits}b fused {ms_fused:8.3f} ms  fp16 {ms_fp16:8.3f}  "
                      f"deq {ms_deq:8.3f}  x{row['speedup_vs_fp16']:5.2f} vs fp16  "
                      f"{row['gbs_fused']:7.0f} GB/s ({100 * row['fraction_of_copy']:4.1f}% of copy)")
                del cache
            del q
            torch.cuda.empty_cache()
    return rows


def _llama7b_random():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=HQ, num_key_value_heads=HKV, vocab_size=32000,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float16,
                                                attn_implementation="sdpa").eval()


def _kivi(bits: int):
    from omegaconf import OmegaConf

    from qeval.methods.base import Bits, Knobs
    from qeval.recipe.build import shorthand
    cfg = OmegaConf.create({"name": "kivi", "group_size": GROUP, "residual_length": RESIDUAL})
    return shorthand("kivi", cfg, Knobs(Bits(16, 16, bits, bits), kv_semantics="cache", backend="triton"))


def _generate_seconds(model, method, batch: int, prompt: int, new: int) -> float:
    from transformers import DynamicCache

    from qeval.kv.cache import QevalCache
    ids = torch.randint(3, 32000, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    cache = (QevalCache(method, 32, mask) if method else DynamicCache(config=model.config))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, **{cache_kwarg(model): cache}, max_new_tokens=new,
                   min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def section_kv_e2e(args) -> list[dict]:
    model = _llama7b_random()
    rows, best = [], {}
    for name, bits in (("fp16", None), ("kivi-2", 2), ("kivi-4", 4)):
        method = _kivi(bits) if bits else None
        model.set_attn_implementation((method and method.attention_implementation("sdpa")) or "sdpa")
        with torch.no_grad():
            _generate_seconds(model, method, 1, args.prompt, 8)    # warm-up: compile kernels
            B = 1
            while B <= args.max_batch:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    s = statistics.median(_generate_seconds(model, method, B, args.prompt, args.new)
                                          for _ in range(args.repeats))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"config": name, "batch": B, "status": "oom"})
                    print(f"e2e {name:7s} B={B:4d} out of memory")
                    break
                row = {"config": name, "batch": B, "prompt_tokens": args.prompt,
                       "new_tokens": args.new, "seconds": s, "tokens_per_s": B * args.new / s,
                       "peak_memory_bytes": torch.cuda.max_memory_allocated(), "status": "ok"}
                rows.append(row)
                best[name] = row
                print(f"e2e {name:7s} B={B:4d} {row['tokens_per_s']:9.1f} tok/s  "
                      f"peak {row['peak_memory_bytes'] / 2**30:6.2f} GiB")
                B *= 2
    fp16_best = max((r["tokens_per_s"] for r in rows if r["config"] == "fp16" and r["status"] == "ok"),
                    default=None)
    for name in ("kivi-2", "kivi-4"):
        if name in best and "fp16" in best and fp16_best:
            rows.append({"config": name, "summary": True,
                         "max_batch_ratio_vs_fp16": best[name]["batch"] / best["fp16"]["batch"],
                         "throughput_at_max_batch_vs_fp16_best": best[name]["tokens_per_s"] / fp16_best})
            print(f"e2e {name}: max batch x{rows[-1]['max_batch_ratio_vs_fp16']:.1f} vs fp16, "
                  f"throughput x{rows[-1]['throughput_at_max_batch_vs_fp16_best']:.2f} vs fp16's best")
    del model
    torch.cuda.empty_cache()
    return rows


SECTIONS = {"kv": section_kv, "kv_e2e": section_kv_e2e}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options the KV sections read (``scripts/bench_kernels.py`` may add them to its own)."""
    ap.add_argument("--batch", nargs="+", type=int, default=BATCHES)
    ap.add_argument("--context", nargs="+", type=int, default=CONTEXTS)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8], choices=[2, 4, 8])
    ap.add_argument("--prompt", type=int, default=512, help="kv_e2e prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="kv_e2e generated tokens")
    ap.add_argument("--max-batch", type=int, default=1024, help="kv_e2e: stop doubling here")
    ap.add_argument("--repeats", type=int, default=1, help="kv_e2e timed runs per batch")


def open_report(out: Path, suffix: str = "") -> tuple[Path, dict]:
    """``out/<device><suffix>.json`` and its report so far (sections not rerun are kept), with
    this run's device and versions."""
    device = torch.cuda.get_device_name()
    path = out / (device.replace(" ", "_").replace("/", "_") + suffix + ".json")
    report = json.loads(path.read_text()) if path.exists() else {}
    report |= {"device": device, "torch": torch.__version__, "triton": __import__("triton").__version__,
               "cuda": torch.version.cuda}
    return path, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    add_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kv_kernels: no CUDA device; the KV kernel benchmarks need a GPU "
              "(correctness: pytest tests/test_kernels_kv_*.py runs on a CPU)", file=sys.stderr)
        return 2
    path, report = open_report(args.out, "-kv")
    args.copy_gbs = copy_bandwidth_gbs()
    report["copy_gbs"] = args.copy_gbs
    print(f"bench_kv_kernels: {report['device']}, measured copy bandwidth {args.copy_gbs:.0f} GB/s")
    for name in args.sections:
        report[name] = SECTIONS[name](args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))   # after every section: a crash keeps what ran
    print(f"bench_kv_kernels: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
