import os

# Offline everywhere: tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Importing qeval decides Triton's interpreter (qeval/kernels/_env.py: on without CUDA) before any
# test module imports triton or a kernel.
import qeval  # noqa: E402,F401


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel launcher allocates with ``torch.empty`` starts poisoned (floats NaN,
    integers 0x55), so elements a kernel fails to write show up in the comparison."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x55)
    monkeypatch.setattr(torch, "empty", poisoned)
