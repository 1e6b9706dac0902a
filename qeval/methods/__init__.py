"""Quantization and eviction methods, one file each (plus a packed variant where real low-bit
storage exists). ``METHODS`` is the table the runner and validation read, one row
(:class:`qeval.methods.spec.Spec`) per method: registry key = module name = config file name
(``qeval/configs/method/<name>.yaml``)."""

from qeval.methods.awq import AWQ
from qeval.methods.gear import GEAR
from qeval.methods.gptq import GPTQ
from qeval.methods.group import GROUP
from qeval.methods.h2o import H2O
from qeval.methods.kivi import KIVI
from qeval.methods.smoothquant import SMOOTHQUANT
from qeval.methods.spec import Spec
from qeval.methods.streaming import STREAMING
from qeval.methods.uniform import UNIFORM

METHODS: dict[str, Spec] = {spec.name: spec for spec in (UNIFORM, GROUP, KIVI, GEAR, H2O, STREAMING, GPTQ,
                                                         SMOOTHQUANT, AWQ)}
