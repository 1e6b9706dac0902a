"""Quantization methods; importing a module registers it (one import line per method)."""

from qeval.methods import group, uniform  # noqa: F401
from qeval.methods import gear, h2o, kivi  # noqa: F401
