"""qeval: evaluate quantized LLMs (weights, activations, KV cache) and turn results into rows."""

from pathlib import Path

__version__ = "0.1.0"

# the Hydra config tree (configs/ beside the package in a checkout, which is how qeval is installed)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Triton reads TRITON_INTERPRET when it is imported (its own library functions, tl.sum and the
# like, are decorated then), and transformers imports it through torch._dynamo: choose the
# interpreter (on a machine without CUDA) before anything else is imported.
from qeval.kernels import _env as _kernel_env  # noqa: E402,F401
