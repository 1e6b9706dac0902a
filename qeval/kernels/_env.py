"""Choose Triton's interpreter before any kernel, and before transformers (which imports Triton).

``triton.jit`` decides at decoration time whether a kernel compiles for a GPU or runs in the
interpreter (``TRITON_INTERPRET=1``, NumPy on the CPU), and Triton decorates its own library
functions (``tl.sum`` and the like) when it is imported. Without CUDA nothing can compile, so the
interpreter is switched on here, which is what lets ``backend=triton`` and the kernel tests run on
a CPU-only machine. An explicit ``TRITON_INTERPRET`` set by the user is left as it is.

This runs when ``qeval`` is imported, so it must not import torch: ``python -m qeval --help``
answers without it. Whether a CUDA device is visible is asked the way
``torch.cuda.is_available()`` asks under ``PYTORCH_NVML_BASED_CUDA_CHECK``: a CUDA build of torch
(its ``version.py``), ``CUDA_VISIBLE_DEVICES``, and NVML's device count, which unlike ``cuInit``
leaves the process safe to fork. :func:`confirm_with_torch` checks the answer once torch is loaded.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
from pathlib import Path


def _torch_build() -> dict[str, str | None]:
    """``cuda`` and ``hip`` from torch's ``version.py``, read as text (importing torch takes seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"cuda": None, "hip": None}
    text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    found = {k: re.search(rf"^{k}(?::[^=]*)?=\s*'([^']+)'", text, re.M) for k in ("cuda", "hip")}
    return {k: m.group(1) if m else None for k, m in found.items()}


def _nvml_device_count() -> int:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def cuda_device_visible() -> bool:
    """Whether torch will see a CUDA (or ROCm) device, answered without importing torch where it can be."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    build = _torch_build()
    if build["hip"]:   # ROCm: no NVML to ask; torch's own answer
        import torch
        return torch.cuda.is_available()
    return bool(build["cuda"]) and _nvml_device_count() > 0


def use_interpreter_without_cuda() -> bool:
    """Set ``TRITON_INTERPRET=1`` when no CUDA device exists; returns whether it is on."""
    if "TRITON_INTERPRET" not in os.environ and not cuda_device_visible():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


CHOSEN_HERE = "TRITON_INTERPRET" not in os.environ
INTERPRETING = use_interpreter_without_cuda()


def confirm_with_torch() -> None:
    """Once torch is loaded anyway: if it sees a GPU that the check above missed, the kernels were
    decorated for the interpreter and would run on the CPU, so say so instead of crawling."""
    import torch
    if INTERPRETING and CHOSEN_HERE and torch.cuda.is_available():
        raise RuntimeError("qeval chose Triton's interpreter (NVML reported no CUDA device) but torch sees "
                           f"{torch.cuda.device_count()}; set TRITON_INTERPRET=0 to compile the kernels")
