import os

# Offline everywhere: tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter. The variable is read when a kernel is
# decorated, so it must be set before any qeval.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel launcher allocates with ``torch.empty`` starts poisoned (floats NaN,
    integers 0x55), so elements a kernel fails to write show up in the comparison."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x55)
    monkeypatch.setattr(torch, "empty", poisoned)
