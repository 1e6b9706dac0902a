"""Benchmark qeval's Triton kernels on a CUDA GPU; results land in results/bench/<device>.json.

    python scripts/bench_kernels.py                       # every section
    python scripts/bench_kernels.py --sections ceilings w --m 1 16 1024

Sections (each a function returning JSON-able rows; a new kernel family adds one):
- ``ceilings``: the device's measured copy bandwidth (GB/s), cuBLAS fp16 and int8 matmul throughput.
- ``w``: weight-only int4/int3/int8 GEMM (``wq_gemm``), W8A8 and W4A8 against cuBLAS fp16 and
  against dequantize-then-matmul, for M = 1..4096 on Llama-2-7B and -70B layer shapes.
- ``w_e2e``: decode tokens/s and peak memory of W4 (g128) and W8A8 against fp16 on a randomly
  initialised Llama-2-7B-shaped model (batch 1, 128 prompt + 128 generated tokens).
- ``kv`` and ``kv_e2e`` (from ``scripts/bench_kv_kernels.py``, also runnable alone): fused decode
  attention over the packed KV cache at 2/4/8 bits against fp16 SDPA and dequantize-then-attend
  (batch 1-64, context 1k-32k, GB/s beside the copy bandwidth), and KIVI's throughput-vs-batch
  comparison end to end.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between repetitions,
median). Achieved rates come from explicit formulas:
    bytes = weight bytes held (packed words + scales + zeros [+ row sums]) + 2 M K + 2 M N
    FLOPs = 2 M N K
and sit beside the measured ceilings so a figure reads as a fraction of what the device can do.
Sections already in the JSON file and not rerun are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bench_kv_kernels  # the KV sections and their options (a script beside this one)
import torch

# (name, K in, N out) per layer; Llama-2-7B (hidden 4096, MLP 11008) and -70B (8192, 28672, GQA kv 1024)
SHAPES = {
    "llama2-7b": [("qkv_proj", 4096, 12288), ("o_proj", 4096, 4096), ("gate_up_proj", 4096, 22016),
                  ("down_proj", 11008, 4096)],
    "llama2-70b": [("q_proj", 8192, 8192), ("kv_proj", 8192, 2048), ("gate_up_proj", 8192, 57344),
                   ("down_proj", 28672, 8192)],
}
M_VALUES = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]


bench_ms = bench_kv_kernels.bench_ms


# -- ceilings ---------------------------------------------------------------------------------------
def section_ceilings(args) -> dict:
    copy_gbs = bench_kv_kernels.copy_bandwidth_gbs()   # 512 MiB device-to-device: far beyond L2
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    fp16_tflops = 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9
    ai = torch.randint(-128, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    bi = torch.randint(-128, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    int8_tops = 2 * 8192**3 / bench_ms(lambda: torch._int_mm(ai, bi)) / 1e9
    out = {"copy_GBps": copy_gbs, "cublas_fp16_TFLOPs": fp16_tflops, "cublas_int8_TOPs": int8_tops}
    print("ceilings: " + ", ".join(f"{k}={v:.0f}" for k, v in out.items()))
    return out


# -- W: weight-only and weight-activation GEMMs ---------------------------------------------------
def _w_candidates(w16: torch.Tensor):
    """name -> (bytes of weight held, callable(x) -> out)."""
    from qeval.quant.packed import pack_weight
    from qeval.kernels.w4a8_gemm import GroupedInt8Weight, w4a8_matmul
    from qeval.kernels.w8a8_gemm import Int8Weight, w8a8_matmul
    from qeval.kernels.wq_gemm import wq_matmul, wq_matmul_reference
    out = {"fp16_cublas": (w16.nbytes, lambda x: torch.nn.functional.linear(x, w16))}
    for bits in (4, 3, 8):
        p = pack_weight(w16, bits, 128).with_param_dtype(torch.float16)
        out[f"w{bits}_g128_triton"] = (p.nbytes, lambda x, p=p: wq_matmul(x, p))
        if bits == 4:
            out["w4_g128_dequant_then_matmul"] = (p.nbytes, lambda x, p=p: wq_matmul_reference(x, p))
    i8 = Int8Weight.from_packed(pack_weight(w16, 8, None).with_param_dtype(torch.float16))
    out["w8a8_per_channel_triton"] = (i8.nbytes, lambda x: w8a8_matmul(x, i8))
    g4 = GroupedInt8Weight.from_packed(pack_weight(w16, 4, 128).with_param_dtype(torch.float16))
    out["w4a8_g128_triton"] = (g4.nbytes, lambda x: w4a8_matmul(x, g4))
    return out


def section_w(args) -> list[dict]:
    ceil = args.ceilings
    rows = []
    for model, layers in SHAPES.items():
        if args.models and model not in args.models:
            continue
        for layer, k, n in layers:
            w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            cands = _w_candidates(w16)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                times = {name: bench_ms(lambda f=f: f(x)) for name, (_, f) in cands.items()}
                for name, (wbytes, _) in cands.items():
                    ms = times[name]
                    moved = wbytes + 2 * m * k + 2 * m * n
                    row = {"model": model, "layer": layer, "K": k, "N": n, "M": m, "kernel": name,
                           "ms": ms, "GBps": moved / ms / 1e6, "TFLOPs": 2 * m * n * k / ms / 1e9,
                           "speedup_vs_fp16": times["fp16_cublas"] / ms, "weight_bytes": wbytes}
                    if ceil:
                        row["GBps_of_copy_ceiling"] = row["GBps"] / ceil["copy_GBps"]
                        row["TFLOPs_of_fp16_ceiling"] = row["TFLOPs"] / ceil["cublas_fp16_TFLOPs"]
                    rows.append(row)
                print(f"{model:10s} {layer:12s} M={m:5d} " + " ".join(
                    f"{name}={times['fp16_cublas'] / t:.2f}x" for name, t in times.items() if name != "fp16_cublas"))
            del w16, cands
            torch.cuda.empty_cache()
    return rows


# -- W end to end ---------------------------------------------------------------------------------
def _llama7b_random():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()


def section_w_e2e(args) -> list[dict]:
    from omegaconf import OmegaConf

    from qeval.methods.base import Bits, Knobs
    from qeval.recipe.build import shorthand
    from qeval.model.linear import quantize_linears
    uniform = OmegaConf.create({"name": "uniform", "symmetric": False, "w_granularity": "per_channel",
                                "a_granularity": "per_token", "kv_granularity": "per_token"})
    configs = {"fp16": None,
               "w4_g128": shorthand("group", OmegaConf.create({"name": "group", "symmetric": False}),
                                    Knobs(Bits(4, 16), w_group_size=128)),
               "w8a8": shorthand("uniform", uniform, Knobs(Bits(8, 8)))}
    rows = []
    prompt, new = 128, 128
    for name, method in configs.items():
        model = _llama7b_random()
        facts = quantize_linears(model, method, backend="triton") if method else {}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        ids = torch.randint(0, 32000, (1, prompt), device="cuda")
        gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up / compile
            seconds = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, **gen)
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
        s = statistics.median(seconds)
        rows.append({"config": name, "batch": 1, "prompt_tokens": prompt, "new_tokens": new,
                     "seconds": s, "decode_tokens_per_s": new / s, "memory_after_load_bytes": held,
                     "peak_memory_bytes": torch.cuda.max_memory_allocated(), **facts})
        print(f"e2e {name:8s} {new / s:7.1f} tok/s  held {held / 2**30:6.2f} GiB  "
              f"peak {rows[-1]['peak_memory_bytes'] / 2**30:6.2f} GiB")
        del model
        torch.cuda.empty_cache()
    return rows


SECTIONS = {"ceilings": section_ceilings, "w": section_w, "w_e2e": section_w_e2e, **bench_kv_kernels.SECTIONS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES, help="token counts M for the GEMM sections")
    ap.add_argument("--models", nargs="+", default=None, choices=list(SHAPES), help="layer shapes to run")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    bench_kv_kernels.add_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device: the kernel benchmarks need a GPU "
              "(correctness tests run on a CPU: pytest tests/test_kernels_w*.py)", file=sys.stderr)
        return 2
    path, report = bench_kv_kernels.open_report(args.out)
    args.ceilings = report.get("ceilings")
    args.copy_gbs = None
    for name in args.sections:
        if name in bench_kv_kernels.SECTIONS and args.copy_gbs is None:
            # the KV sections read the copy bandwidth: this run's ceiling, else a fresh measurement
            args.copy_gbs = (args.ceilings or {}).get("copy_GBps") or bench_kv_kernels.copy_bandwidth_gbs()
        report[name] = SECTIONS[name](args)
        if name == "ceilings":
            args.ceilings = report[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))  # after every section: a crash keeps what ran
    print(f"bench_kernels: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
