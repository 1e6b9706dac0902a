"""Compile a kernel's launches for a GPU target without a GPU, and read its resources.

A launcher runs on CPU tensors with its kernels' ``run`` swapped for a recorder, so the
constexprs, ``num_warps`` and argument specialisations (ints equal to 1, 16-divisible pointers
and strides) are exactly what the launcher would hand Triton. Each recorded launch is then
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``: the full
TTIR -> TTGIR -> LLVM -> PTX -> cubin pipeline of the installed Triton, ptxas included (Triton's
wheel ships it). Nothing is launched.

Needs kernels decorated for compilation, not interpretation: set ``TRITON_INTERPRET=0`` before
``qeval`` is first imported (``scripts/kernel_resources.py`` does).

What is measured, per (launch, target):
- ``regs``, ``spill_stores`` / ``spill_loads`` (bytes), ``stack`` (bytes): the ``ptxas -v`` report
  of Triton's own cubin step (on a cache hit, ptxas runs again with the same binary and flags),
  so the numbers are those of the cubin a GPU would load;
- ``shared``: bytes of shared memory the launch asks for (Triton's ``metadata.shared``, its
  dynamic allocation, plus any static shared memory ptxas reports);
- ``ctas_by_regs`` / ``ctas_by_shared``: CTAs one SM can hold by registers / by shared memory;
- ``mma``: the matrix instruction in the PTX: ``wgmma`` (Hopper's asynchronous warpgroup MMA),
  ``mma.sync`` (Ampere-style warp MMA), or ``none``.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from qeval.kernels._env import INTERPRETING

# -- budgets (NVIDIA CUDA C Programming Guide, "Compute Capabilities", table of technical limits) --
REGS_PER_SM = 65536              # 64 K 32-bit registers per SM on sm_80 and sm_90
REG_ALLOC_UNIT = 8               # registers are allocated per thread in multiples of 8 (256 / warp)
MIN_RESIDENT_CTAS = 3            # decode / GEMV kernels hide memory latency with >= 3 CTAs per SM
# shared memory one CTA may use (opt-in maximum); an SM holds 1 KB more, reserved per CTA
SHARED_PER_CTA = {80: 163 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
RESERVED_SHARED_PER_CTA = 1024


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function and the arguments the launcher passed."""

    kernel: JITFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def constexprs(self) -> dict:
        names = [p.name for p in self.kernel.params if p.is_constexpr]
        kw = {k: v for k, v in self.kwargs.items() if k in names or k in ("num_warps", "num_stages")}
        return {k: (str(v).removeprefix("triton.language.") if not isinstance(v, (int, bool)) else v)
                for k, v in kw.items()}


@contextlib.contextmanager
def recording(*kernels: JITFunction):
    """Within the block, launches of ``kernels`` are recorded (into the yielded list), not run."""
    if INTERPRETING:
        raise RuntimeError("kernels were decorated for the interpreter: set TRITON_INTERPRET=0 "
                           "before qeval is imported")
    launches: list[Launch] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, kwargs))
        return run

    for k in kernels:
        k.run = recorder(k)          # JITFunction.__getitem__ calls self.run
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def compile_launch(launch: Launch, capability: int):
    """Compile ``launch`` for ``sm_<capability>`` the way ``JITFunction.run`` would on that GPU.
    Returns the compiled kernel and the ``ptxas -v`` log of its cubin step ('' on a cache hit)."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    # the options JITFunction.run adds before binding (those this Triton has)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    log, dump = io.StringIO(), getattr(knobs.nvidia, "dump_ptxas_log", None)
    if dump is not None:
        knobs.nvidia.dump_ptxas_log = True   # Triton's cubin step prints its own `ptxas -v` report
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        if dump is not None:
            knobs.nvidia.dump_ptxas_log = dump
    return compiled, log.getvalue()


def _ptxas_report(ptx: str, capability: int) -> str:
    """``ptxas -v`` output for ``ptx``, with the binary and flags of Triton's cubin step."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        try:
            ptxas = get_ptxas(capability).path
        except TypeError:   # Triton before 3.5: one ptxas for every target
            ptxas = get_ptxas().path
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(src) + ".o"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def _int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def mma_kind(ptx: str) -> str:
    """'wgmma m64n64k16 f16' / 'mma.sync m16n8k16 bf16' (shape and operand type) or 'none'."""
    m = re.search(r"\b(wgmma\.mma_async|mma\.sync)[\w.]*", ptx)
    if m is None:
        return "none"
    parts = m.group(0).split(".")
    shape = next((p for p in parts if re.fullmatch(r"m\d+n\d+k\d+", p)), "?")
    # after the shape: [layouts], D type, A type, B type[, C type]
    types = [p for p in parts[parts.index(shape) + 1:] if p not in ("row", "col")] if shape != "?" else []
    kind = "wgmma" if parts[0] == "wgmma" else "mma.sync"
    return f"{kind} {shape} {types[1] if len(types) > 1 else '?'}"


def async_copies(ptx: str) -> int:
    """Asynchronous global-to-shared copies in the PTX (``cp.async``, TMA's ``cp.async.bulk``):
    the software pipeliner's mark, keeping the next tiles' loads in flight during this tile's math."""
    return len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)\b", ptx))


def resources(compiled, capability: int, ptxas_log: str = "") -> dict:
    """Registers, spills, shared memory and MMA kind of one compiled kernel (see module doc);
    ``ptxas_log`` from :func:`compile_launch`, else (a cache hit) ptxas runs again."""
    ptx = compiled.asm["ptx"]
    log = ptxas_log if "Used" in ptxas_log else _ptxas_report(ptx, capability)
    md = compiled.metadata
    threads = md.num_warps * 32
    regs = _int(r"Used (\d+) registers", log)
    shared = md.shared + _int(r"(\d+) bytes smem", log)
    alloc = -(-regs // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return {"regs": regs, "spill_stores": _int(r"(\d+) bytes spill stores", log),
            "spill_loads": _int(r"(\d+) bytes spill loads", log),
            "stack": _int(r"(\d+) bytes stack frame", log), "shared": shared,
            "num_warps": md.num_warps, "num_stages": md.num_stages, "threads": threads,
            "ctas_by_regs": REGS_PER_SM // max(1, alloc * threads),
            "ctas_by_shared": SHARED_PER_SM[capability] // (shared + RESERVED_SHARED_PER_CTA),
            "mma": mma_kind(ptx), "async_copies": async_copies(ptx)}


def budget_failures(row: dict) -> list[str]:
    """The budgets a :func:`resources` row (plus ``target`` and ``occupancy``) breaks, in words."""
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row["shared"] > SHARED_PER_CTA[row["target"]]:
        out.append(f"shared {row['shared']} B > {SHARED_PER_CTA[row['target']]} B per CTA")
    if row["occupancy"] and row["ctas_by_regs"] < MIN_RESIDENT_CTAS:
        out.append(f"{row['regs']} registers x {row['threads']} threads allow "
                   f"{row['ctas_by_regs']} CTAs/SM < {MIN_RESIDENT_CTAS}")
    return out
