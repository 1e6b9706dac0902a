"""Every kernel specialisation in qeval/kernels/compile_cases.py compiles for sm_80 (A100) and
sm_90 (H100 / H200) with no GPU present, and stays inside its resource budget:

- no register spills (local-memory traffic a memory-bound kernel cannot afford);
- shared memory within one CTA's limit: 163 KB on sm_80, 227 KB on sm_90;
- decode attention and GEMV kernels leave room for 3 resident CTAs per SM:
  65536 registers / (3 CTAs * 128 threads) = 170 registers per thread (168 after allocation in
  multiples of 8).

The numbers come from Triton's own compile pipeline, ptxas included (see compile_check.py). They
are compiled in one subprocess: kernels must be decorated for compilation, and this process
decorated them for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from qeval.kernels.compile_cases import CASES, TARGETS
from qeval.kernels.compile_check import MIN_RESIDENT_CTAS, SHARED_PER_CTA

ROOT = Path(__file__).resolve().parent.parent

# Known register gaps, (case, target) -> registers/thread measured, each a strict xfail under the
# Triton it was measured with (so a fix turns the test red until its entry goes). Empty: every
# decode specialisation fits 3 CTAs per SM (95-141 registers with Triton 3.9 on sm_80 / sm_90)
# since the decode kernel puts the GQA group on the MMA's columns instead of padding it to 16
# rows, dequantizes keys instead of holding a scaled copy of the query, and runs 16-token tiles
# at head_dim 128.
REGISTER_GAPS: dict[tuple[str, int], int] = {}


MEASURED_WITH = "3.9"   # the Triton release REGISTER_GAPS was measured with


def _params(cases, gaps: dict | None = None):
    out = []
    for case in cases:
        for target in TARGETS:
            regs = (gaps or {}).get((case.name, target))
            # strict under the Triton the numbers were measured with (the CI pin), so a fix turns
            # it red; another Triton allocates registers its own way, so there it only reports
            marks = [pytest.mark.xfail(strict=triton.__version__.startswith(MEASURED_WITH), reason=(
                f"{regs} registers/thread measured, <= 168 needed for 3 CTAs of 128 threads: decode "
                "kernel item of issue 'GPU kernels fast by design and proven without a GPU'"))] if regs else []
            out.append(pytest.param(case.name, target, id=f"{case.name}-sm{target}", marks=marks))
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """(case, target) -> resources, from one run of scripts/kernel_resources.py."""
    out = tmp_path_factory.mktemp("kernels") / "resources.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), "--json", str(out),
                    "--jobs", "2"], check=True, env=env, timeout=540, stdout=subprocess.DEVNULL)
    return {(r["case"], r["target"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("name,target", _params(CASES))
def test_compiles_without_spills_within_shared_memory(measured, name, target):
    r = measured[(name, target)]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads at {r['regs']} "
        f"registers; constexprs {r['constexprs']}")
    assert r["shared"] <= SHARED_PER_CTA[target], f"{r['shared']} B shared memory"


@pytest.mark.parametrize("name,target", _params([c for c in CASES if c.occupancy], REGISTER_GAPS))
def test_memory_bound_kernels_leave_room_for_three_ctas(measured, name, target):
    r = measured[(name, target)]
    assert r["ctas_by_regs"] >= MIN_RESIDENT_CTAS, (
        f"{r['regs']} registers x {r['threads']} threads: {r['ctas_by_regs']} CTAs/SM; "
        f"constexprs {r['constexprs']}")


def test_tensor_core_paths_are_the_expected_ones(measured):
    """Half-precision tiles run on mma.sync; Hopper prefill tiles on wgmma; int8 GEMMs on s8; the
    batch-1 GEMV unpacks in registers onto FMA units (a 1-row MMA would waste 15 of 16 rows)."""
    assert measured[("wq-decode-M1-w4g128-fp16", 90)]["mma"] == "none"
    assert measured[("wq-decode-M16-w3g128-bf16", 90)]["mma"].startswith("mma.sync")
    assert measured[("wq-prefill-M512-w4g128-fp16", 90)]["mma"].startswith("wgmma")
    assert measured[("wq-prefill-M512-w4g128-fp16", 80)]["mma"].startswith("mma.sync")
    assert measured[("w8a8-prefill-M512-bf16", 90)]["mma"] == "wgmma m64n64k32 s8"
    # float32 is IEEE: no TF32 tensor-core instruction
    assert measured[("wq-decode-M1-w4g128-fp32", 90)]["mma"] == "none"
    assert measured[("decode-G32-D64-grp4-fp32-k4v4", 90)]["mma"] == "none"
    # decode: GQA groups on mma.sync (heads as the MMA's columns), MHA without an MMA to pad
    assert measured[("decode-G32-D128-grp2-fp16-k4v4", 90)]["mma"].startswith("mma.sync")
    assert measured[("decode-G32-D128-grp1-fp16-k2v2", 90)]["mma"] == "none"


def test_decode_attention_pipelines_its_tile_loads(measured):
    """Decode attention is bandwidth-bound: its key / value tiles are loaded by cp.async, so the
    next tiles are in flight while this one is computed (the pipeliner skips loads under control
    flow, which is why the loop has none)."""
    decode = {k: r for k, r in measured.items() if k[0].startswith("decode-")}
    assert decode
    for (case, target), row in decode.items():
        assert row["async_copies"] > 0, f"{case} sm_{target}: no asynchronous tile loads"
