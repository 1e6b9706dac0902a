"""A ``cache``-semantics layer that compresses K/V in whole blocks per sequence (KIVI, GEAR).

Both methods keep the newest tokens in full precision and compress older ones in blocks whose
boundaries matter: KIVI groups keys per channel over G tokens, GEAR compresses streaming blocks of
n_b tokens. With left padding, block boundaries counted in padded positions would differ between
a sequence run alone and the same sequence inside a batch, so every row counts its blocks from its
own first real token (``start[b]``). Pad positions are never compressed, never enter statistics,
and are masked by attention anyway.

Storage is fake quantization: the dequantized K/V are held in the model's dtype, so
``held_bytes`` measures what is really held while ``packed_bytes`` is the formula for a packed
layout (codes + fp16 scale/zero per group + whatever the method adds).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from qeval.kv.rows import RowSelectable
from qeval.kv.sequence import SequenceState

FP16_BYTES = 2

# compress(x (b, H, n, D), first_block) -> (x_hat in x's dtype, packed bytes of the whole group of rows)
Compressor = Callable[[torch.Tensor, bool], tuple[torch.Tensor, int]]


class BlockCompressedLayer(RowSelectable, DynamicLayer):
    """Positions ``[start[b], done[b])`` of row ``b`` are compressed, the rest is full precision.

    A stream (keys or values) is described by ``(block, lag, compress)``: once at least ``lag``
    newer positions exist, the positions before them are compressed in whole blocks of ``block``.
    Compression runs at the start of the next ``update``, i.e. after the step that filled the
    block has attended to it in full precision (KIVI's "flush after attention").
    """

    def __init__(self, seq: SequenceState, keys: tuple[int, int, Compressor],
                 values: tuple[int, int, Compressor]):
        super().__init__()
        self.seq = seq
        self.streams = {"keys": keys, "values": values}
        self.start: list[int] = []
        self.done: dict[str, list[int]] = {"keys": [], "values": []}
        self.packed: list[int] = []       # packed bytes of the compressed part, per row

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, t = key_states.shape[0], key_states.shape[-2]
            self.start = self.seq.starts(t, b)
            self.done = {name: list(self.start) for name in self.streams}
            self.packed = [0] * b
        else:
            self.settle()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def settle(self) -> None:
        """Compress every whole block that is due (idempotent)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return
        for name in self.streams:
            self._compress(name)

    def _compress(self, name: str) -> None:
        block, lag, compress = self.streams[name]
        x = getattr(self, name)
        t, done = x.shape[-2], self.done[name]
        todo: dict[tuple[int, int, bool], list[int]] = {}
        for b, lo in enumerate(done):
            n = (t - lag - lo) // block * block
            if n > 0:
                todo.setdefault((lo, n, lo == self.start[b]), []).append(b)
        for (lo, n, first), rows in todo.items():
            whole = len(rows) == x.shape[0]
            idx = slice(None) if whole else torch.tensor(rows, device=x.device)
            # (B', H, n, D): one block-aligned chunk of the rows that share it
            y, nbytes = compress(x[idx, :, lo:lo + n], first)
            x[idx, :, lo:lo + n] = y
            for b in rows:
                done[b] += n
                self.packed[b] += nbytes // len(rows)

    def packed_bytes(self) -> int:
        """Compressed part (formula from the method) + the full-precision tail as fp16."""
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        self.settle()
        _, h, t, d = self.keys.shape
        tail = sum((t - lo) for name in self.streams for lo in self.done[name])
        return sum(self.packed) + tail * h * d * FP16_BYTES

    def _n_rows(self) -> int:
        return len(self.start)

    def _select_rows(self, idx: torch.Tensor) -> None:
        """K/V and the per-row bookkeeping move together."""
        self.keys = self.keys.index_select(0, idx.to(self.keys.device))
        self.values = self.values.index_select(0, idx.to(self.values.device))
        order = idx.tolist()
        self.start = [self.start[i] for i in order]
        self.done = {name: [d[i] for i in order] for name, d in self.done.items()}
        self.packed = [self.packed[i] for i in order]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("block-compressed KV layers cannot be cropped (compressed blocks are final)")


def per_row_real(k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``simulated`` semantics helper: apply ``fn(k_b, v_b)`` to each row's real (non-pad) tokens.

    Left padding is stripped per row so statistics, groups and outliers never see pad tokens and a
    row gives the same result alone or inside a batch; pad positions are returned unchanged.
    """
    if pad is None:
        return fn(k, v)
    starts = pad[:, 0, :, 0].sum(-1).tolist()
    k_out, v_out = k.clone(), v.clone()
    for b, s in enumerate(starts):
        # (1, H, T - s, D): this row's real tokens
        kb, vb = fn(k[b:b + 1, :, s:], v[b:b + 1, :, s:])
        k_out[b:b + 1, :, s:], v_out[b:b + 1, :, s:] = kb, vb
    return k_out, v_out
