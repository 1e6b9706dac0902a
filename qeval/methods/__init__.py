"""Quantization and eviction methods, one file each (plus a packed variant where real low-bit
storage exists). ``METHODS`` is the table the runner and validation read: registry key = module
name = config file name (``qeval/configs/method/<name>.yaml``)."""

from qeval.methods.awq import AWQ
from qeval.methods.base import Method
from qeval.methods.gear import GEAR
from qeval.methods.gptq import GPTQ
from qeval.methods.group import Group
from qeval.methods.h2o import H2O
from qeval.methods.kivi import KIVI
from qeval.methods.smoothquant import SmoothQuant
from qeval.methods.streaming import StreamingLLM
from qeval.methods.uniform import Uniform

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Uniform, Group, KIVI, GEAR, H2O, StreamingLLM, GPTQ,
                                                         SmoothQuant, AWQ)}
