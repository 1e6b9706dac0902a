"""Batch-row operations for cache layers that keep per-row state beside K/V."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class RowSelectable(ABC):
    """Mixin for cache layers with per-row state beside K/V (bookkeeping lists, scores, packed
    words): beam reorder, batch expansion and batch selection all become one ``_select_rows(idx)``
    where new row ``i`` is old row ``idx[i]``, so no per-row field can be left behind."""

    @abstractmethod
    def _select_rows(self, idx: torch.Tensor) -> None:
        """Make row ``i`` of every per-row tensor and list old row ``idx[i]``."""

    @abstractmethod
    def _n_rows(self) -> int:
        """The batch rows held."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_rows(torch.as_tensor(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self._n_rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.as_tensor(indices)
            self._select_rows(idx.nonzero().flatten() if idx.dtype == torch.bool else idx)
