"""Decoder layers kept in full precision (``w_keep_layers``, ``kv_keep_layers``): the field's habit of
leaving the first and last layers alone. Indices count from 0, negative ones from the end."""

from __future__ import annotations


def resolved(indices, n_layers: int) -> frozenset[int]:
    """The kept layers as indices in ``[0, n_layers)`` (validated before load to be in range)."""
    return frozenset(i % n_layers for i in (indices or ()))


def layer_of(name: str, prefix: str) -> int | None:
    """The decoder layer a module named ``name`` sits in, given the layers' ``prefix``, or None."""
    head = prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None
