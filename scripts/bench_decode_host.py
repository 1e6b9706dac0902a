"""Host cost of one decode step of one packed-KV layer: the layer's update and the fused-decode
launcher, with every Triton launch replaced by a no-op.

    python scripts/bench_decode_host.py                       # KIVI, batch 1 and 8
    python scripts/bench_decode_host.py --methods kivi gear --device cuda
    python scripts/bench_decode_host.py --methods kivi --batch 1 --context 4096

At decode the GPU runs a layer's attention in a few microseconds, so what the host spends per
layer per step (Python, tensor bookkeeping, argument building) is what bounds the step once it
exceeds that: a 32-layer model at 50 us per layer-step already spends 1.6 ms per token on the
host. The target is < 50 us per layer-step (``TARGET_US``).

The target is met by ``us_decode_warm``: the layer's launch arguments and the launcher, timed
``--repeats`` times on the last step's state, as a host pays them when the tensor work of the step
runs on the GPU. On the CPU (one thread) the torch ops also do their work on the host, so the
step-loop columns are an upper bound: the update's residual copies (``torch.cat`` of the window
each step) and GEAR's corrections over every packed token are device work on a GPU, and on the
CPU they also evict the caches the decode's Python then misses (``us_decode_in_loop``).
``--device cuda`` (kernels still stubbed) times the host side alone.
Llama-2-7B-like shapes: 32 heads x head_dim 128, fp16, the methods' shipped settings
(qeval/configs/method/*.yaml), a prompt of ``--context`` tokens prefilled first. Each case reports
medians over ``--steps`` steps in ``--out`` (one row per case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TARGET_US = 50.0
HEADS, HEAD_DIM = 32, 128


def stub_kernels(patch=setattr) -> list[str]:
    """Replace every Triton kernel of the packed-KV kernel modules by a launch that does nothing
    (outputs keep what their allocation held) through ``patch(module, name, value)`` (a test
    passes one that undoes itself); returns the names replaced."""
    from triton.runtime.jit import KernelInterface

    from qeval.kernels import kv_decode_attention, kv_pack

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    names = []
    for mod in (kv_decode_attention, kv_pack):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface):
                patch(mod, name, NoLaunch())
                names.append(f"{mod.__name__}.{name}")
    return names


def make_method(name: str, bits: int):
    from omegaconf import OmegaConf

    from qeval.recipe.build import shorthand
    from qeval.methods.base import Bits, Knobs
    from qeval.validate import CONFIG_DIR
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "method" / f"{name}.yaml")
    method = shorthand(name, cfg, Knobs(Bits(16, 16, bits, bits), kv_semantics="cache", backend="triton"))
    if method.kv_backend != "triton":
        raise SystemExit(f"{name}: the packed backend is not available here")
    method.kv._fused.active = True   # as once its attention function is registered
    return method


def time_layer(method, batch: int, context: int, steps: int, device: str,
               repeats: int) -> tuple[list, list, list]:
    """Prefill ``context`` tokens into one layer, then time ``steps`` one-token steps (seconds in
    the update and in the fused decode, per step), then the last step's fused decode ``repeats``
    times more on the same state (warm: what a host that does no tensor work in between pays)."""
    from qeval.kv.sequence import SequenceState
    dt = torch.float16
    layer = method.make_cache_layer(0, SequenceState(None))
    def kv(t):
        return torch.randn(batch, HEADS, t, HEAD_DIM, dtype=dt, device=device)
    layer.update(kv(context), kv(context))
    k1, v1, q = kv(1), kv(1), kv(1)
    updates, decodes, warm = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        layer.update(k1, v1)
        t1 = time.perf_counter()
        pending = method.kv._fused.take(0)
        pending.decode(q, None)
        decodes.append(time.perf_counter() - t1)
        updates.append(t1 - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        pending.decode(q, None)
        warm.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
    return updates, decodes, warm


def main(argv=None, patch=setattr) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # GEAR's decode adds its outlier and low-rank terms with torch ops over every packed token: on
    # the CPU that is tensor work, not host cost, so it is measured on request (or on a GPU)
    ap.add_argument("--methods", nargs="+", default=["kivi"], choices=["kivi", "gear"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2000, help="warm decode timings after the loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("results/bench/decode_host.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)   # the host side of a decode step is one thread
    stubbed = stub_kernels(patch)
    rows = []
    for name in args.methods:
        for B in args.batch:
            method = make_method(name, args.bits)
            updates, decodes, warm = time_layer(method, B, args.context, args.steps, args.device,
                                                args.repeats)
            us_update, us_decode, us_warm = (1e6 * statistics.median(t) for t in (updates, decodes, warm))
            rows.append({"method": name, "batch": B, "context": args.context, "bits": args.bits,
                         "heads": HEADS, "head_dim": HEAD_DIM, "device": args.device,
                         "steps": args.steps, "repeats": args.repeats,
                         "us_decode_warm": us_warm, "us_decode_in_loop": us_decode,
                         "us_update": us_update, "target_us": TARGET_US,
                         "status": "ok" if us_warm < TARGET_US else "over target"})
            print(f"{name:5s} B={B:2d} T={args.context} {args.device}: decode step {us_warm:7.1f} us warm "
                  f"({'under' if us_warm < TARGET_US else 'OVER'} the {TARGET_US:.0f} us target); "
                  f"in the step loop: decode {us_decode:7.1f}, update {us_update:7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "stubbed_kernels": stubbed,
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
