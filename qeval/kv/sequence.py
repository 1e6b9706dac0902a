"""Per-batch facts a cache layer needs but transformers does not pass: where the padding is."""

from __future__ import annotations

import torch


class SequenceState:
    """Shared by every layer of one cache."""

    def __init__(self, attention_mask: torch.Tensor | None = None):
        # (B, T_prompt) with 1 = real token, 0 = left padding
        self.attention_mask = attention_mask

    def pad(self, start: int, length: int, batch: int) -> torch.Tensor | None:
        """(B, 1, length, 1) bool mask of padding among positions [start, start + length)."""
        m = self.attention_mask
        if m is None or start >= m.shape[-1]:
            return None
        if m.shape[0] != batch:  # beam search expands the batch before prefill
            m = m.repeat_interleave(batch // m.shape[0], dim=0)
        pad = m[:, start:start + length] == 0
        if pad.shape[-1] < length:  # decode tokens past the prompt are never padding
            pad = torch.cat([pad, pad.new_zeros(batch, length - pad.shape[-1])], -1)
        return pad[:, None, :, None] if pad.any() else None

    def starts(self, length: int, batch: int) -> list[int]:
        """Each row's first real position (its number of left-pad positions) in a prompt of
        ``length`` positions."""
        pad = self.pad(0, length, batch)
        # (B, 1, T, 1) -> (B,)
        return [0] * batch if pad is None else pad[:, 0, :, 0].sum(-1).tolist()
