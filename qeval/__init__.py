"""qeval: evaluate quantized LLMs (weights, activations, KV cache) and turn results into rows.

Importing this package imports nothing heavy (no torch, transformers or lm-eval), so that
``python -m qeval --help`` and ``--version`` answer at once.
"""

from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("qeval")
except metadata.PackageNotFoundError:   # run from a checkout that was never installed
    __version__ = "0+unknown"

# the Hydra config tree ships inside the package, so a wheel installed anywhere finds it
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Triton reads TRITON_INTERPRET when it is imported, and transformers imports it: choose the
# interpreter (on a machine without CUDA) before anything else is imported.
from qeval.kernels import _env as _kernel_env  # noqa: E402,F401
