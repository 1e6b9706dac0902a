"""A lease-sized, checked subset of scripts/bench_kernels.py: one run of a few minutes on a lent GPU.

    python scripts/bench_quick.py                  # every section, report in results/bench/
    python scripts/bench_quick.py --sections kv --context 8192 --batch 1

Each case first runs the kernel on fresh random inputs against a reference and records
``rel_err = ||out - ref|| / ||ref||`` (NaN never passes; the kernel's output is poisoned first).
That run also compiles the specialisation, so the timing after it (``triton.testing.do_bench``,
median, L2 flushed) holds no compilation. A case whose check fails is recorded and not timed.
The report, ``results/bench/<device>.json`` (keys ``quick_*``, beside bench_kernels.py's
sections), is rewritten after every case: a crash loses nothing.

- ``quick_kv``: fused decode attention over a KIVI cache (2 / 4 bits, G = 32, R = 128) in fp16 and
  bf16, context 8k / 32k x batch 1 / 8 / 32, Llama-2-7B heads (32 x 128), beside SDPA over an
  uncompressed cache of the same dtype; GB/s from ``bench_kv_kernels.kernel_bytes`` next to the
  measured copy bandwidth. Reference: dequantize then SDPA (first <= 4 rows of the batch).
- ``quick_w``: W4 g128 (weight-only), W8A8 and W4A8 g128 against cuBLAS fp16, M = 1 and 16, on
  Llama-2-7B layer shapes. Reference: each kernel's torch reference.
- ``quick_e2e``: KIVI-2 end to end on a Llama-2-7B-shaped model with random weights (its first
  ``--layers`` decoder layers, bf16): prefill then greedy decode at batch 1 and 8, ms per decode
  step for the uncompressed cache and for KIVI on packed words (``backend=triton``), and the KIVI
  cache's bytes beside the uncompressed one's. Check: one teacher-forced decode step's logits from
  the packed cache against KIVI's torch backend, which quantizes the same elements to the same
  codes.
- ``quick_runtime_resources``: registers and spills the CUDA driver reports for every kernel
  specialisation loaded, the ground truth for scripts/kernel_resources.py's compile-only numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench_kv_kernels as kvb  # the KV helpers (a script beside this one)
import torch
from bench_kernels import SHAPES

from qeval.kv.cache import cache_kwarg

# relative error bounds: the kernels feed tl.dot in the activation dtype (8-bit mantissa for bf16)
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
CHECK_ROWS = 4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Report:
    """results/bench/<device>.json, rewritten after every row."""

    def __init__(self, out: Path):
        self.path, self.data = kvb.open_report(out)

    def add(self, key: str, row: dict) -> None:
        self.data.setdefault(key, []).append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def _kivi_cache(B: int, T: int, bits: int, dtype):
    """Random codes with signed zeros and scales of unit order, so attention is not uniform."""
    cache = kvb.packed_cache(B, T, bits, dtype)
    for i in (1, 4):
        cache[i].mul_(10)               # scales in [0, 1)
    for i in (2, 5):
        cache[i].normal_()              # zeros ~ N(0, 1)
    return cache


def section_kv(args, report: Report) -> None:
    from qeval.kernels.kv_decode_attention import decode_attention
    from qeval.kernels.kv_decode_reference import decode_attention_torch
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for T in args.context:
            for B in args.batch:
                base = {"dtype": str(dtype).removeprefix("torch."), "context": T, "batch": B,
                        "group_size": kvb.GROUP, "residual": kvb.RESIDUAL, "copy_gbs": args.copy_gbs}
                if 3 * kvb.fp16_bytes(B, T) > torch.cuda.mem_get_info()[0]:
                    report.add("quick_kv", {**base, "status": "skipped: memory"})
                    continue
                q = torch.randn(B, kvb.HQ, 1, kvb.HEAD_DIM, dtype=dtype, device="cuda")
                k = torch.randn(B, kvb.HKV, T, kvb.HEAD_DIM, dtype=dtype, device="cuda")
                v = torch.randn_like(k)
                ms_sdpa = kvb.bench_ms(lambda q=q, k=k, v=v: sdpa(q, k, v))
                del k, v
                for bits in args.bits:
                    cache = _kivi_cache(B, T, bits, dtype)
                    kw = {"k_bits": bits, "v_bits": bits, "group_size": kvb.GROUP}
                    out = torch.full((B, kvb.HQ, 1, kvb.HEAD_DIM), float("nan"), dtype=dtype, device="cuda")
                    decode_attention(q, *cache, **kw, out=out)
                    n = min(B, CHECK_ROWS)
                    ref = decode_attention_torch(q[:n], *(c[:n] for c in cache), **kw, use_sdpa=True)
                    err = rel_err(out[:n, :, 0], ref)
                    row = {**base, "bits": bits, "rel_err": err, "ms_fp_sdpa": ms_sdpa}
                    if not err <= REL_TOL[dtype]:
                        report.add("quick_kv", {**row, "status": f"FAILED check: rel_err {err:.3g}"})
                        print(f"kv {base['dtype']} T={T} B={B} {bits}b FAILED rel_err {err:.3g}")
                        continue
                    ms = kvb.bench_ms(lambda q=q, c=cache, kw=kw: decode_attention(q, *c, **kw))
                    nbytes = kvb.kernel_bytes(B, T, bits)
                    row |= {"ms_fused": ms, "speedup_vs_sdpa": ms_sdpa / ms, "bytes_read": nbytes,
                            "gbs_fused": nbytes / ms / 1e6,
                            "gbs_sdpa": kvb.fp16_bytes(B, T) / ms_sdpa / 1e6,
                            "fraction_of_copy": nbytes / ms / 1e6 / args.copy_gbs, "status": "ok"}
                    report.add("quick_kv", row)
                    print(f"kv {base['dtype']:8s} T={T:6d} B={B:3d} {bits}b fused {ms:7.3f} ms "
                          f"sdpa {ms_sdpa:7.3f}  x{row['speedup_vs_sdpa']:5.2f}  "
                          f"{row['gbs_fused']:6.0f} GB/s ({100 * row['fraction_of_copy']:4.1f}% of copy)  "
                          f"err {err:.1e}")
                    del cache, out, ref
                del q
                torch.cuda.empty_cache()


def _w_candidates(w16: torch.Tensor):
    """name -> (weight bytes, kernel(x), reference(x))."""
    from qeval.quant.packed import pack_weight
    from qeval.kernels.w4a8_gemm import (
        GroupedInt8Weight,
        w4a8_matmul,
        w4a8_matmul_reference,
    )
    from qeval.kernels.w8a8_gemm import Int8Weight, w8a8_matmul, w8a8_matmul_reference
    from qeval.kernels.wq_gemm import wq_matmul, wq_matmul_reference
    p4 = pack_weight(w16, 4, 128).with_param_dtype(torch.float16)
    i8 = Int8Weight.from_packed(pack_weight(w16, 8, None).with_param_dtype(torch.float16))
    g4 = GroupedInt8Weight.from_packed(p4)
    return {"w4_g128_triton": (p4.nbytes, lambda x: wq_matmul(x, p4), lambda x: wq_matmul_reference(x, p4)),
            "w8a8_triton": (i8.nbytes, lambda x: w8a8_matmul(x, i8), lambda x: w8a8_matmul_reference(x, i8)),
            "w4a8_g128_triton": (g4.nbytes, lambda x: w4a8_matmul(x, g4),
                                 lambda x: w4a8_matmul_reference(x, g4))}


def section_w(args, report: Report) -> None:
    for layer, k, n in SHAPES["llama2-7b"]:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        cands = _w_candidates(w16)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ms_fp16 = kvb.bench_ms(lambda x=x, w=w16: torch.nn.functional.linear(x, w))
            for name, (wbytes, fn, ref) in cands.items():
                err = rel_err(fn(x), ref(x))
                row = {"layer": layer, "K": k, "N": n, "M": m, "kernel": name, "rel_err": err,
                       "weight_bytes": wbytes, "ms_fp16_cublas": ms_fp16}
                if not err <= REL_TOL[torch.float16]:
                    report.add("quick_w", {**row, "status": f"FAILED check: rel_err {err:.3g}"})
                    print(f"w {layer} M={m} {name} FAILED rel_err {err:.3g}")
                    continue
                ms = kvb.bench_ms(lambda fn=fn, x=x: fn(x))
                moved = wbytes + 2 * m * k + 2 * m * n
                row |= {"ms": ms, "speedup_vs_fp16": ms_fp16 / ms, "GBps": moved / ms / 1e6,
                        "fraction_of_copy": moved / ms / 1e6 / args.copy_gbs, "status": "ok"}
                report.add("quick_w", row)
                print(f"w {layer:12s} M={m:3d} {name:17s} {ms:7.4f} ms  x{row['speedup_vs_fp16']:5.2f} "
                      f"vs cuBLAS fp16  {row['GBps']:6.0f} GB/s  err {err:.1e}")
        del w16, cands
        torch.cuda.empty_cache()


def _llama_random(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                      max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()


def _kivi_method(backend: str, bits: int):
    from omegaconf import OmegaConf

    from qeval.methods.base import Bits, Knobs
    from qeval.recipe.build import shorthand
    cfg = OmegaConf.create({"name": "kivi", "group_size": kvb.GROUP, "residual_length": kvb.RESIDUAL})
    return shorthand("kivi", cfg, Knobs(Bits(16, 16, bits, bits), kv_semantics="cache", backend=backend))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _decode_steps(model, method, ids, steps: int, device: str):
    """Prefill ``ids``, then ``steps`` greedy one-token steps: (seconds per step, last logits,
    cache bytes held after the last step)."""
    import time

    from transformers import DynamicCache

    from qeval.kv.cache import QevalCache, held_bytes
    mask = torch.ones_like(ids)
    n_layers = model.config.num_hidden_layers
    cache = QevalCache(method, n_layers, mask) if method else DynamicCache(config=model.config)
    model.set_attn_implementation((method and method.attention_implementation("sdpa")) or "sdpa")
    out = model(ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    seconds = (time.perf_counter() - t0) / max(1, steps)
    return seconds, out.logits[:, -1].float(), held_bytes(cache)


def section_e2e(args, report: Report, device: str = "cuda") -> None:
    """KIVI end to end; ``device``/``args`` sizes let a CPU test run the same code tiny."""
    from qeval.kernels._env import INTERPRETING
    dtype = torch.float32 if INTERPRETING else torch.bfloat16   # the interpreter runs no bf16 dots
    model = _llama_random(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate,
                          dtype, device)
    torch.manual_seed(1)
    with torch.no_grad():
        for B in args.e2e_batch:
            ids = torch.randint(3, 32000, (B, args.prompt), device=device)
            base = {"batch": B, "prompt_tokens": args.prompt, "steps": args.steps, "layers": args.layers,
                    "dtype": str(dtype).removeprefix("torch."), "kv_bits": 2}
            # check first (it also compiles every specialisation the timed run meets)
            _, ref_logits, _ = _decode_steps(model, _kivi_method("torch", 2), ids, 1, device)
            _, logits, _ = _decode_steps(model, _kivi_method("triton", 2), ids, 1, device)
            err = rel_err(logits, ref_logits)
            if not err <= REL_TOL[torch.bfloat16]:
                report.add("quick_e2e", {**base, "rel_err": err, "status": f"FAILED check: rel_err {err:.3g}"})
                print(f"e2e B={B} FAILED rel_err {err:.3g}")
                continue
            s_fp, _, bytes_fp = _decode_steps(model, None, ids, args.steps, device)
            s_kivi, _, bytes_kivi = _decode_steps(model, _kivi_method("triton", 2), ids, args.steps, device)
            row = {**base, "rel_err": err, "ms_per_step_fp": 1e3 * s_fp, "ms_per_step_kivi2": 1e3 * s_kivi,
                   "speedup_vs_fp": s_fp / s_kivi, "cache_bytes_fp": bytes_fp,
                   "cache_bytes_kivi2": bytes_kivi, "cache_ratio": bytes_kivi / bytes_fp, "status": "ok"}
            report.add("quick_e2e", row)
            print(f"e2e B={B:3d} fp {row['ms_per_step_fp']:8.2f} ms/step  kivi-2 "
                  f"{row['ms_per_step_kivi2']:8.2f}  x{row['speedup_vs_fp']:5.2f}  cache "
                  f"x{row['cache_ratio']:.3f} of fp  err {err:.1e}")
            del ids
            if device == "cuda":
                torch.cuda.empty_cache()
    del model


def runtime_resources() -> list[dict]:
    """Registers / spills the driver reported for every qeval kernel specialisation loaded."""
    from triton.runtime.jit import JITFunction

    from qeval.kernels import (
        act_quant,
        kv_decode_attention,
        kv_pack,
        w4a8_gemm,
        w8a8_gemm,
        wq_gemm,
    )
    rows, seen = [], set()
    for mod in (act_quant, kv_decode_attention, kv_pack, w4a8_gemm, w8a8_gemm, wq_gemm):
        for fn in vars(mod).values():
            if not isinstance(fn, JITFunction):
                continue
            for cache in getattr(fn, "device_caches", {}).values():
                for part in cache if isinstance(cache, tuple) else ():
                    for ck in part.values() if isinstance(part, dict) else ():
                        if getattr(ck, "n_regs", None) is None or id(ck) in seen:
                            continue
                        seen.add(id(ck))
                        consts = getattr(getattr(ck, "src", None), "constants", {}) or {}
                        names = fn.arg_names
                        rows.append({"kernel": ck.name, "n_regs": ck.n_regs, "n_spills": ck.n_spills,
                                     "shared": ck.metadata.shared, "num_warps": ck.metadata.num_warps,
                                     "constexprs": {names[k[0]] if isinstance(k, tuple) else str(k): str(v)
                                                    for k, v in consts.items()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["kv", "w", "e2e"], choices=["kv", "w", "e2e"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    ap.add_argument("--context", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4], choices=[2, 4, 8])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    e2e = ap.add_argument_group("e2e: a Llama-2-7B-shaped model's first layers, random weights")
    e2e.add_argument("--layers", type=int, default=4)
    e2e.add_argument("--hidden", type=int, default=4096)
    e2e.add_argument("--heads", type=int, default=32)
    e2e.add_argument("--kv-heads", type=int, default=32)
    e2e.add_argument("--intermediate", type=int, default=11008)
    e2e.add_argument("--prompt", type=int, default=4096)
    e2e.add_argument("--steps", type=int, default=32)
    e2e.add_argument("--e2e-batch", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quick: no CUDA device", file=sys.stderr)
        return 2
    report = Report(args.out)
    for key in [f"quick_{name}" for name in args.sections] + ["quick_runtime_resources"]:
        report.data.pop(key, None)     # this run's rows only; other sections' rows stay
    args.copy_gbs = report.data["quick_copy_gbs"] = kvb.copy_bandwidth_gbs()
    report.save()
    print(f"bench_quick: {report.data['device']}, copy bandwidth {args.copy_gbs:.0f} GB/s")
    try:
        for name in args.sections:
            {"kv": section_kv, "w": section_w, "e2e": section_e2e}[name](args, report)
    finally:
        report.data["quick_runtime_resources"] = runtime_resources()
        report.save()
        print(f"bench_quick: wrote {report.path}")
    failed = [r for key in ("quick_kv", "quick_w", "quick_e2e") for r in report.data.get(key, [])
              if r["status"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
