"""Tasks: each evaluates a :class:`qeval.handle.Handle` and returns metric rows."""

from qeval.tasks import passkey  # noqa: F401
from qeval.tasks import lm_eval_tasks  # noqa: F401
from qeval.tasks import quant_error  # noqa: F401
from qeval.tasks import toy_arith  # noqa: F401
from qeval.tasks import toy_mc  # noqa: F401
