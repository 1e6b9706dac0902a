"""Choose Triton's interpreter before any kernel in this package is decorated.

``triton.jit`` decides at decoration time whether a kernel compiles for a GPU or runs in the
interpreter (``TRITON_INTERPRET=1``, NumPy on the CPU). Without CUDA nothing can compile, so the
interpreter is switched on here, which is what lets ``backend=triton`` and the kernel tests run on a
CPU-only machine. An explicit ``TRITON_INTERPRET`` set by the user is left as it is.
"""

from __future__ import annotations

import os

import torch


def use_interpreter_without_cuda() -> bool:
    """Set ``TRITON_INTERPRET=1`` when no CUDA device exists; returns whether it is on."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETING = use_interpreter_without_cuda()
