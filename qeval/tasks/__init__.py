"""Tasks: each evaluates a :class:`qeval.handle.Handle` and returns metric rows."""

from qeval.tasks import passkey  # noqa: F401
