"""KIVI with real low-bit storage: int32 words in the cache and fused decode attention on them.

Used when the run's ``backend`` is ``triton`` (arXiv:2402.02750). The block structure is exactly
:class:`qeval.kv.blocks.BlockCompressedLayer`'s with KIVI's streams (keys flushed in whole
blocks of R, values token by token behind a window of R, counted per row from its first real
token, flushed once a step's attention has its K/V: right after a prefill, at the start of the next
update after a decode step), so the torch and triton backends quantize the same
elements with the same codes; only the storage differs:

- packed keys / values: :func:`qeval.kernels.kv_pack.pack_keys` / ``pack_values`` words and
  scale / zero in the model's dtype, row-local (row ``b``'s token ``i`` is padded position
  ``start[b] + i``), growing in chunks of R tokens;
- residuals: right-aligned windows over the newest padded positions, as wide as the longest
  residual of any row (each row's residual is the tail of the window).

A one-token step (decode) hands the layer to the attention function registered by
:func:`register`, which runs :func:`qeval.kernels.kv_decode_attention.decode_attention` on the
packed words directly; any other step (prefill, several tokens) gets the dequantized K/V
materialized in the padded timeline and attends as usual.
"""

from __future__ import annotations

import array
from abc import abstractmethod

import torch
from transformers.cache_utils import DynamicLayer

from qeval.errors import ConfigError
from qeval.kernels import kv_pack
from qeval.kernels.kv_decode_attention import decode_attention
from qeval.kv.attention import PendingLayers, register_attention
from qeval.kv.rows import RowSelectable
from qeval.kv.sequence import SequenceState
from qeval.quant.primitives import packed_bytes


def layout_problem(k_bits: int, v_bits: int, group_size: int) -> str | None:
    """Why the packed layout cannot hold this configuration, or None."""
    for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
        if bits not in kv_pack.PACK_BITS:
            return f"{name}={bits}: packed KV kernels support {kv_pack.PACK_BITS}"
    try:
        kv_pack.check_layout(k_bits, group_size)
    except ValueError as e:
        return f"method.{e}"
    return None


class FusedDecode(PendingLayers):
    """Which packed layer took the current one-token step, per layer index. ``active`` once the
    attention function is registered: before that, layers materialize K/V for whatever attention
    the model runs. Any layer with ``decode(query, scaling)`` can be pending (KIVI's, GEAR's)."""

    def __init__(self):
        super().__init__()
        self.active = False


def register(fused: FusedDecode, base: str, kind: str = "kivi_packed") -> str:
    """Register decode-on-packed-words over ``base`` (sdpa | eager); returns its name."""
    def make(attend):
        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = fused.take(module.layer_idx)
            if layer is None:
                return attend(module, query, key, value, attention_mask, **kwargs)
            # (B, Hq, 1, D) -> (B, Hq, D) -> (B, 1, Hq, D), the layout attention functions return
            out = layer.decode(query, kwargs.get("scaling"))
            return out[:, None], None
        return attention

    name = register_attention(kind, base, make)
    fused.active = True
    return name


def to_device(values: list[int], device: torch.device, width: int | None = None) -> torch.Tensor:
    """Python ints -> an int32 tensor on ``device`` (rows of ``width`` when given) without waiting
    for the device.

    ``torch.tensor(rows, device=cuda)`` copies from pageable memory, which synchronizes the stream
    (the host waits for every queued kernel). From pinned memory a ``non_blocking`` copy is queued
    like a kernel; the caching host allocator keeps the pinned block until the copy has run. Off
    CUDA the ints are viewed in place (``array`` -> ``frombuffer``: a third of the host time of
    ``torch.tensor`` on a list)."""
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.int32, pin_memory=True)
    else:
        host = torch.frombuffer(array.array("i", values), dtype=torch.int32)
    host = host if width is None else host.view(-1, width)
    return host.to(device, non_blocking=True)


def grow(t: torch.Tensor, dim: int, need: int, chunk: int) -> torch.Tensor:
    """``t`` with at least ``need`` slots along ``dim``, growing in whole chunks of ``chunk``
    (amortized copies); the new slots are zero."""
    if t.shape[dim] >= need:
        return t
    shape = list(t.shape)
    shape[dim] = -(-need // chunk) * chunk - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class PackedKVLayer(RowSelectable, DynamicLayer):
    """What every packed layer shares: int32 words with scale / zero in kv_pack's layout, the
    right-aligned full-precision residual windows, per-row bookkeeping (``start``, packed counts
    ``dk`` / ``dv``), fused decode, materialization and row operations. When blocks are packed
    is the subclass's policy (``settle``), as is its byte formula (``packed_bytes``)."""

    def __init__(self, method, seq: SequenceState, layer_idx: int, fused: FusedDecode):
        super().__init__()
        self.method, self.seq, self.layer_idx, self.fused = method, seq, layer_idx, fused
        self.G = int(method.params.group_size)
        self.kb, self.vb = method.knobs.bits.k, method.knobs.bits.v

    @abstractmethod
    def settle(self) -> None:
        """Pack every block that is due; idempotent."""

    @abstractmethod
    def packed_bytes(self) -> int:
        """The packed-layout formula for what this layer holds."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)   # empty keys / values: 0 bytes
        B, H, T, D = key_states.shape
        if D % self.G:
            raise ConfigError(f"method.group_size={self.G}: must divide the model's head_dim={D}")
        dev, dt = key_states.device, key_states.dtype
        fk, fv = kv_pack.codes_per_word(self.kb), kv_pack.codes_per_word(self.vb)
        self.k_words = torch.zeros(B, H, 0, D, dtype=torch.int32, device=dev)
        self.k_scale = torch.zeros(B, H, 0, D, dtype=dt, device=dev)
        self.k_zero = torch.zeros(B, H, 0, D, dtype=dt, device=dev)
        self.v_words = torch.zeros(B, H, 0, D // fv, dtype=torch.int32, device=dev)
        self.v_scale = torch.zeros(B, H, 0, D // self.G, dtype=dt, device=dev)
        self.v_zero = torch.zeros(B, H, 0, D // self.G, dtype=dt, device=dev)
        self.k_res = key_states[:, :, :0]
        self.v_res = value_states[:, :, :0]
        self.start = self.seq.starts(T, B)
        self.dk, self.dv = [0] * B, [0] * B      # packed keys / values per row (row-local)
        self.length = 0                           # padded positions seen
        self._fk = fk

    # -- bookkeeping ---------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def _n(self, b: int) -> int:
        return self.length - self.start[b]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self.settle()
        self.k_res = torch.cat([self.k_res, key_states], dim=2)
        self.v_res = torch.cat([self.v_res, value_states], dim=2)
        self.length += key_states.shape[2]
        if key_states.shape[2] == 1 and self.fused.active:
            self.fused.put(self.layer_idx, self)
            return key_states, value_states      # not read: the attention asks the layer
        keys, values = self.materialize()
        # this step's K/V are built, so what is due can be packed now rather than at the next
        # update: after a prefill the cache holds the packed prompt, not the whole prompt in full
        # precision (same blocks, same inputs: the codes do not depend on when they are packed)
        self.settle()
        return keys, values

    # -- reading -------------------------------------------------------------------------------
    def _launch_args(self) -> dict:
        """The launcher's per-row table, (B, 5) int32 on the device in
        :func:`~qeval.kernels.kv_decode_attention.row_lengths`' layout (length, packed keys, packed
        values, first residual key / value), and its maxima as host ints.

        Built from the host-side counters and sent in one copy that does not wait for the device,
        so a decode step never reads the device back (the maxima would otherwise be read from the
        device tensors)."""
        W_k, W_v = self.k_res.shape[2], self.v_res.shape[2]
        n = [self.length - s for s in self.start]
        flat = [x for m, dk, dv in zip(n, self.dk, self.dv) for x in (m, dk, dv, W_k - m + dk, W_v - m + dv)]
        rows = to_device(flat, self.k_res.device, width=5)
        return {"rows": rows, "max_length": max(n), "max_k_quantized": max(self.dk)}

    def decode(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """(B, Hq, 1, D) query -> (B, Hq, D): fused attention over packed words + residual."""
        return decode_attention(query, self.k_words, self.k_scale, self.k_zero, self.v_words,
                                self.v_scale, self.v_zero, self.k_res, self.v_res,
                                k_bits=self.kb, v_bits=self.vb, group_size=self.G,
                                sm_scale=scaling, **self._launch_args())

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (B, H, T, D) K and V in the padded timeline (pad positions zero)."""
        if not any(self.dk) and not any(self.dv):
            return self.k_res, self.v_res
        B, H, _, D = self.k_res.shape
        keys = self.k_res.new_zeros(B, H, self.length, D)
        values = torch.zeros_like(keys)
        for b in range(B):
            s, n, dk, dv = self.start[b], self._n(b), self.dk[b], self.dv[b]
            sl = slice(b, b + 1)
            kq = kv_pack.dequantize_keys(self.k_words[sl, :, :dk // self._fk],
                                         self.k_scale[sl, :, :dk // self.G],
                                         self.k_zero[sl, :, :dk // self.G], self.kb, self.G)
            vq = kv_pack.dequantize_values(self.v_words[sl, :, :dv], self.v_scale[sl, :, :dv],
                                           self.v_zero[sl, :, :dv], self.vb, self.G)
            keys[b, :, s:s + dk] = kq[0]
            keys[b, :, s + dk:] = self.k_res[b, :, self.k_res.shape[2] - (n - dk):]
            values[b, :, s:s + dv] = vq[0]
            values[b, :, s + dv:] = self.v_res[b, :, self.v_res.shape[2] - (n - dv):]
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        # as the torch backend: a packed block cannot be un-quantized back into the residual
        raise NotImplementedError("packed KV layers cannot be cropped (packed blocks are final)")

    # -- batch rows: beam search, batch expansion and selection --------------------------------
    ROW_TENSORS = ("k_words", "k_scale", "k_zero", "v_words", "v_scale", "v_zero", "k_res", "v_res")

    def _n_rows(self) -> int:
        return len(self.start)

    def _select_rows(self, idx: torch.Tensor) -> None:
        """Rows are row-local (own start, own packed counts): moving the tensors and lists is all."""
        idx = idx.to(self.k_res.device)
        for name in self.ROW_TENSORS:
            setattr(self, name, getattr(self, name).index_select(0, idx))
        order = idx.tolist()
        self.start, self.dk, self.dv = ([xs[i] for i in order] for xs in (self.start, self.dk, self.dv))


class PackedKIVILayer(PackedKVLayer):
    """One layer of KIVI's cache holding int32 codes (see the module docstring): keys packed in
    whole blocks of R once R wait, values token by token behind a window of R."""

    def __init__(self, method, seq: SequenceState, layer_idx: int, fused: FusedDecode):
        super().__init__(method, seq, layer_idx, fused)
        self.R = int(method.params.residual_length)

    def settle(self) -> None:
        """Pack every block that is due (KIVI's flush after attention); idempotent."""
        B = len(self.start)
        key_due = [(self._n(b) - self.dk[b]) // self.R * self.R for b in range(B)]
        val_due = [max(0, self._n(b) - self.R - self.dv[b]) for b in range(B)]
        if any(key_due):
            self._flush("k", key_due)
        if any(val_due):
            self._flush("v", val_due)

    def _flush(self, which: str, due: list[int]) -> None:
        res = getattr(self, f"{which}_res")
        done = self.dk if which == "k" else self.dv
        W = res.shape[2]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for b, m in enumerate(due):
            if m:
                groups.setdefault((done[b], self._n(b) - done[b], m), []).append(b)
        for (lo, resid, m), rows in groups.items():
            idx = slice(None) if len(rows) == res.shape[0] else to_device(rows, res.device)
            # (B', H, m, D): the oldest m residual positions of these rows
            chunk = res[idx, :, W - resid:W - resid + m]
            if which == "k":
                words, scale, zero = kv_pack.pack_keys(chunk, self.kb, self.G)
                self.k_words = grow(self.k_words, 2, (lo + m) // self._fk, self.R // self._fk)
                self.k_scale = grow(self.k_scale, 2, (lo + m) // self.G, self.R // self.G)
                self.k_zero = grow(self.k_zero, 2, (lo + m) // self.G, self.R // self.G)
                self.k_words[idx, :, lo // self._fk:(lo + m) // self._fk] = words
                self.k_scale[idx, :, lo // self.G:(lo + m) // self.G] = scale
                self.k_zero[idx, :, lo // self.G:(lo + m) // self.G] = zero
            else:
                words, scale, zero = kv_pack.pack_values(chunk, self.vb, self.G)
                for name, part in (("v_words", words), ("v_scale", scale), ("v_zero", zero)):
                    buf = grow(getattr(self, name), 2, lo + m, self.R)
                    buf[idx, :, lo:lo + m] = part
                    setattr(self, name, buf)
            for b in rows:
                done[b] += m
        keep = max(self._n(b) - done[b] for b in range(len(done)))
        # a copy when most of the window was packed (a prompt, a block of keys), so that storage is
        # really freed; a view when few positions were (a decode step's one value): the next
        # update's cat copies the window anyway, and a copy here would move it twice per step
        tail = res[:, :, W - keep:]
        setattr(self, f"{which}_res", tail.clone() if W - keep > keep else tail)

    def packed_bytes(self) -> int:
        """The packed-layout formula: codes + scale/zero per group + the fp16 residual tail."""
        if not self.is_initialized:
            return 0
        self.settle()   # as BlockCompressedLayer.packed_bytes, so both backends report alike
        _, H, _, D = self.k_res.shape
        total = 0
        for b in range(len(self.start)):
            n = self._n(b)
            total += (packed_bytes(self.dk[b] * H * D, self.kb, self.G)
                      + packed_bytes(self.dv[b] * H * D, self.vb, self.G)
                      + ((n - self.dk[b]) + (n - self.dv[b])) * H * D * 2)
        return total
