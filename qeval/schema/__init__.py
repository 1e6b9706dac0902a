"""qeval's typed configuration: every node's keys and types (:mod:`qeval.schema.nodes`), checked on
the composed config of every cell before Hydra writes anything (:mod:`qeval.schema.check`). Light:
no torch, transformers or lm-eval."""

from qeval.schema.check import check, check_hydra
from qeval.schema.groups import GROUPS, options

__all__ = ["GROUPS", "check", "check_hydra", "options"]
