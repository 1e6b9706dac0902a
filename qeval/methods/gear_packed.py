"""GEAR with real low-bit storage: KIVI-backbone codes, sparse outliers and low-rank factors held
in the cache, decode on the fused packed-KV kernel (arXiv 2403.05527; ``backend=triton``).

The block structure is :class:`qeval.kv.blocks.BlockCompressedLayer`'s with GEAR's
streams: per row, counted from its first real token, the prompt's first L - (L mod n_b) tokens
are one block (rank ``rank_prefill``), then every ``stream_block`` new tokens one block (rank
``rank_decode``), keys and values in the same blocks, compressed once a step's attention has its
K/V (right after a prefill, at the start of the next update after a decode step).
Blocks are grouped across rows exactly as the torch backend groups them and decomposed by the
same :func:`qeval.quant.decompose.gear_decompose`, so both backends keep the same codes, outliers
and factors. A block X (K or V) is held as X ~ Q + S + L:

- Q: int32 words with scale / zero in the model's dtype in :mod:`qeval.kernels.kv_pack`'s layout
  (the codes of :func:`qeval.quant.primitives.quantize` with the outliers kept out of min/max);
- S: per (row, head), int32 flat indices ``t * D + d`` (row-local token t) and values in the
  model's dtype. A value is the outlier minus what its code dequantizes to, so Q + S gives the
  outlier back (to float rounding) while the codes stay as packed;
- L = U W: U (n, r) per token, W = U^T E (r, D) per block, in the model's dtype.

Per row the outlier count of a block depends only on its size, so the per-row tensors are dense:
rows with fewer or smaller blocks are padded with zero entries (index 0, value 0), as are U's
columns past a block's rank. (The reference code's rule, ``outlier_rule=reference_code``, splits a
token's value outliers unevenly across heads, so it runs on the torch backend.) ``block_of`` maps each packed token to its block's W.

Decode composes the corrections with the kernel rather than fusing them into it: for one query q
of a head and packed position t,

    score_t = scale * q . (Q_K[t] + S_K[t] + U_K[t] W_K) = kernel score + bias_t,
    bias_t  = scale * (q . S_K[t] + U_K[t] . (W_K q)),
    out     = kernel output + sum_t p_t S_V[t] + (sum_t p_t U_V[t]) W_V,

with ``p_t = exp2(score_t - lse)`` from the kernel's ``scores_out`` / ``lse_out``. The bias is a
sparse gather and rank-r products, small beside the packed pass the kernel makes over the cache.
Any other step (prefill, several tokens) gets Q + S + L and the residual materialized in the
padded timeline and attends as usual.
"""

from __future__ import annotations

import math

import torch

from qeval.kernels import kv_pack
from qeval.kernels.kv_decode_attention import decode_attention
from qeval.methods.kivi_packed import PackedKVLayer, grow, to_device
from qeval.quant.decompose import gear_decompose, outliers_per_side
from qeval.quant.primitives import dequantize, quantize

W_CHUNK = 4   # block slots of W added at a time


def pack_block(x: torch.Tensor, bits: int, group_size: int, which: str, exclude: torch.Tensor | None):
    """(B', H, n, D) -> (words, scale, zero) in kv_pack's layout and the dequantized Q in x's dtype.

    The codes are :func:`qeval.quant.primitives.quantize`'s with ``exclude`` (the outlier mask) kept out of
    min/max, and Q is exactly what GEAR's KIVI backbone (``fake_quantize_keys`` / ``_values``)
    returns for the same block and mask."""
    B, H, n, D = x.shape
    axis = -2 if which == "k" else -1
    qp = quantize(x, bits, axis, group_size, exclude=exclude)
    q = dequantize(qp, x, axis)
    if which == "k":
        # codes (B, H, D, n // G, G) -> (B, H, n, D); scale / zero (B, H, D, n // G, 1) -> (B, H, n // G, D)
        codes = qp.codes.reshape(B, H, D, n).transpose(-1, -2)
        params = [p.reshape(B, H, D, n // group_size).transpose(-1, -2) for p in (qp.scale, qp.zero)]
    else:
        # codes (B, H, n, D // G, G) -> (B, H, n, D); scale / zero -> (B, H, n, D // G)
        codes = qp.codes.reshape(B, H, n, D)
        params = [p.reshape(B, H, n, D // group_size) for p in (qp.scale, qp.zero)]
    words = kv_pack.pack_codes(codes, bits, axis=axis)
    return (words, *(p.to(x.dtype) for p in params)), q


def sparse_outliers(x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None, slots: int):
    """(B', H, n, D) -> flat indices (B', H, slots) int32 and values ``x - q`` there in x's dtype;
    entries past a (row, head)'s outliers (ties can make fewer than ``slots``) are zero."""
    B, H, n, D = x.shape
    if mask is None or slots == 0:
        return x.new_zeros(B, H, 0, dtype=torch.int32), x.new_zeros(B, H, 0)
    flat = mask.reshape(B, H, n * D)
    # the outliers first, in index order: a stable sort of "is not an outlier"
    pos = torch.sort((~flat).to(torch.uint8), dim=-1, stable=True).indices[..., :slots]
    hit = flat.gather(-1, pos)
    diff = (x.float() - q.float()).reshape(B, H, n * D).gather(-1, pos)
    return torch.where(hit, pos, 0).to(torch.int32), torch.where(hit, diff, 0.0).to(x.dtype)


class PackedGEARLayer(PackedKVLayer):
    """One layer of GEAR's cache holding codes, outliers and low-rank factors (module docstring).

    Reuses :class:`PackedKVLayer`'s residual windows, offsets, row bookkeeping (``start``,
    ``dk == dv`` packed tokens per row) and backbone materialization; GEAR's blocks, the
    corrections and the byte figure are its own."""

    ROW_TENSORS = PackedKVLayer.ROW_TENSORS + (
        "k_sidx", "k_sval", "v_sidx", "v_sval", "k_u", "v_u", "k_w", "v_w", "block_of")

    def __init__(self, method, seq, layer_idx: int, fused):
        super().__init__(method, seq, layer_idx, fused)
        self.nb = int(method.params.stream_block)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.rank_cap = self._rank_cap(D)
        for w in "kv":
            setattr(self, f"{w}_sidx", key_states.new_zeros(B, H, 0, dtype=torch.int32))
            setattr(self, f"{w}_sval", key_states.new_zeros(B, H, 0))
            setattr(self, f"{w}_u", key_states.new_zeros(B, H, 0, self.rank_cap))
            setattr(self, f"{w}_w", key_states.new_zeros(B, H, 0, self.rank_cap, D))
        self.block_of = key_states.new_zeros(B, 0, dtype=torch.int32)
        self.n_slots = [0] * B                     # outlier slots used per row (K and V alike)
        self.blocks: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]  # (lo, n, rank)
        self.packed = [0] * B                      # packed-layout bytes of the blocks, per row
        # blocks whose outlier count is still a device tensor: (rows, shape, bits, rank, count);
        # counted into ``packed`` when bytes are asked for, so compressing never reads the device
        self.uncounted: list[tuple[list[int], tuple, int, int, torch.Tensor | None]] = []

    def _rank_cap(self, d: int) -> int:
        """The largest rank a block can get (``rank`` is capped by min(n, D))."""
        params = self.method.params
        if params.rank_ratio is not None:
            return round(params.rank_ratio * d)
        return min(d, max(int(params.rank_prefill), int(params.rank_decode)))

    # -- compression ---------------------------------------------------------------------------
    def settle(self) -> None:
        """Compress every whole block that is due (idempotent)."""
        if not self.is_initialized:
            return
        B = len(self.start)
        due = [(self._n(b) - self.dk[b]) // self.nb * self.nb for b in range(B)]
        if not any(due):
            return
        # grouped by (padded position, size, first) as BlockCompressedLayer groups them
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for b, m in enumerate(due):
            if m:
                groups.setdefault((self.start[b] + self.dk[b], m, self.dk[b] == 0), []).append(b)
        for (lo, m, first), rows in groups.items():
            self._compress(rows, self.length - lo, m, first)
        keep = max(self._n(b) - self.dk[b] for b in range(B))
        # copies, not views: the packed positions' full-precision storage is really freed
        self.k_res = self.k_res[:, :, self.k_res.shape[2] - keep:].clone()
        self.v_res = self.v_res[:, :, self.v_res.shape[2] - keep:].clone()

    def _compress(self, rows: list[int], resid: int, m: int, first: bool) -> None:
        """The oldest ``m`` of the ``resid`` residual tokens of ``rows`` become one block each."""
        W = self.k_res.shape[2]
        idx = slice(None) if len(rows) == len(self.start) else to_device(rows, self.k_res.device)
        parts = {}
        for w, res, bits in (("k", self.k_res, self.kb), ("v", self.v_res, self.vb)):
            # (B', H, m, D): one block of each of these rows
            parts[w] = self._decompose(res[idx, :, W - resid:W - resid + m], w, bits, first)
        for i, b in enumerate(rows):
            self._store(b, i, parts, m)
        for w in "kv":
            p = parts[w]
            self.uncounted.append((list(rows), p["shape"], p["bits"], p["rank"], p["n_out"]))

    def _count_bytes(self) -> None:
        """Add the blocks compressed since the last call to ``packed`` (reads their outlier counts
        from the device: for reports and row operations, never in a decode step)."""
        for rows, shape, bits, rank, n_out in self.uncounted:
            like = torch.empty(shape, device="meta")   # the byte formula reads only the shape
            nbytes = self.method._packed(like, bits, 0 if n_out is None else int(n_out), rank)
            for b in rows:
                self.packed[b] += nbytes // len(rows)
        self.uncounted = []

    def _decompose(self, x: torch.Tensor, which: str, bits: int, first: bool) -> dict:
        """One block of rows (B', H, n, D) -> its packed parts and packed-layout bytes."""
        m = self.method
        _, _, n, D = x.shape
        box = []

        def quantizer(xx, exclude):
            packed, q = pack_block(xx, bits, self.G, which, exclude)
            box.append(packed)
            return q
        ratio = float(m.params.outlier_ratio)
        q, mask, u, w = gear_decompose(x, quantizer, ratio, m._rank(first, n, D), int(m.params.power_iterations))
        slots = 2 * outliers_per_side(ratio, n, D) if ratio > 0 else 0
        sidx, sval = sparse_outliers(x, q, mask, slots)
        return {"packed": box[0], "sidx": sidx, "sval": sval, "u": u, "w": w,
                "rank": 0 if u is None else u.shape[-1], "shape": tuple(x.shape), "bits": bits,
                "n_out": None if mask is None else mask.sum()}

    def _store(self, b: int, i: int, parts: dict, m: int) -> None:
        """Row ``b`` (row ``i`` of the block's rows) appends its block at row-local ``dk[b]``."""
        lo, j, D = self.dk[b], len(self.blocks[b]), self.k_res.shape[3]
        fk = self._fk
        (kw, ks, kz), (vw, vs, vz) = parts["k"]["packed"], parts["v"]["packed"]
        for name, part, at in (("k_words", kw, lo // fk), ("k_scale", ks, lo // self.G),
                               ("k_zero", kz, lo // self.G), ("v_words", vw, lo),
                               ("v_scale", vs, lo), ("v_zero", vz, lo)):
            n = part.shape[2]
            buf = grow(getattr(self, name), 2, at + n, n)
            buf[b, :, at:at + n] = part[i]
            setattr(self, name, buf)
        rank = parts["k"]["rank"]
        slots = parts["k"]["sidx"].shape[2]
        for w in "kv":
            p = parts[w]
            if slots:
                s0 = self.n_slots[b]
                for name, part in ((f"{w}_sidx", p["sidx"][i] + lo * D), (f"{w}_sval", p["sval"][i])):
                    buf = grow(getattr(self, name), 2, s0 + slots, slots)
                    buf[b, :, s0:s0 + slots] = part
                    setattr(self, name, buf)
            if self.rank_cap:   # every block gets its slots, rank 0 ones stay zero
                u = grow(getattr(self, f"{w}_u"), 2, lo + m, self.nb)
                wb = grow(getattr(self, f"{w}_w"), 2, j + 1, W_CHUNK)
                if rank:
                    u[b, :, lo:lo + m, :rank] = p["u"][i]
                    wb[b, :, j, :rank] = p["w"][i]
                setattr(self, f"{w}_u", u)
                setattr(self, f"{w}_w", wb)
        self.block_of = grow(self.block_of, 1, lo + m, self.nb)
        self.block_of[b, lo:lo + m] = j
        self.n_slots[b] += slots
        self.blocks[b].append((lo, m, rank))
        self.dk[b] += m
        self.dv[b] += m

    # -- reading -------------------------------------------------------------------------------
    def _low_rank(self) -> bool:
        return any(r for bl in self.blocks for _, _, r in bl)

    def _corrected(self) -> bool:
        return any(self.n_slots) or self._low_rank()

    def _correction(self, b: int, which: str) -> torch.Tensor:
        """S + L of row ``b``'s packed tokens, (H, dk, D) fp32."""
        _, H, _, D = self.k_res.shape
        dk, ns = self.dk[b], self.n_slots[b]
        c = torch.zeros(H, dk * D, device=self.k_res.device)
        # padding entries add 0 at index 0
        c.scatter_add_(-1, getattr(self, f"{which}_sidx")[b, :, :ns].long(),
                       getattr(self, f"{which}_sval")[b, :, :ns].float())
        c = c.view(H, dk, D)
        u, w = getattr(self, f"{which}_u"), getattr(self, f"{which}_w")
        for j, (lo, n, r) in enumerate(self.blocks[b]):
            if r:
                c[:, lo:lo + n] += u[b, :, lo:lo + n, :r].float() @ w[b, :, j, :r].float()
        return c

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized Q + S + L and the residual, (B, H, T, D) in the padded timeline."""
        keys, values = super().materialize()
        if not self._corrected():
            return keys, values
        for b, (s, dk) in enumerate(zip(self.start, self.dk)):
            if dk:
                for x, w in ((keys, "k"), (values, "v")):
                    x[b, :, s:s + dk] = (x[b, :, s:s + dk].float() + self._correction(b, w)).to(x.dtype)
        return keys, values

    def decode(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """(B, Hq, 1, D) query -> (B, Hq, D): the fused kernel on the backbone with the outliers'
        and low rank's score bias, then their value terms from the kernel's probabilities."""
        if not self._corrected():
            return super().decode(query, scaling)
        B, Hq, _, D = query.shape
        Hkv, dev = self.k_res.shape[1], query.device
        scale = 1.0 / math.sqrt(D) if scaling is None else scaling
        # (B, Hq, 1, D) -> (B, Hkv, g, D): the query heads of each KV head's group
        q = query[:, :, 0].float().reshape(B, Hkv, Hq // Hkv, D)
        args = self._launch_args()
        tq, T = args["max_k_quantized"], args["max_length"]
        blk = self.block_of[:, :tq].long()                               # (B, tq)
        bias = self._score_bias(q, tq, blk) * scale                      # (B, Hkv, g, tq)
        scores = torch.empty(B, Hq, T, device=dev)
        lse = torch.empty(B, Hq, device=dev)
        out = torch.empty(B, Hq, D, device=dev)   # fp32: the value terms are added before rounding
        decode_attention(query, self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale,
                         self.v_zero, self.k_res, self.v_res, k_bits=self.kb, v_bits=self.vb,
                         group_size=self.G, sm_scale=scaling, out=out, k_bias=bias.reshape(B, Hq, tq),
                         scores_out=scores, lse_out=lse, **args)
        packed = torch.arange(tq, device=dev)[None] < args["rows"][:, 1:2]   # packed keys per row
        # (B, Hq, tq) log2 scores -> (B, Hkv, g, tq) probabilities; 0 past a row's packed tokens,
        # where scores_out holds residual scores or nothing at all
        p = torch.exp2(scores[..., :tq] - lse[..., None]).reshape(B, Hkv, -1, tq)
        p = torch.where(packed[:, None, None], p, 0.0)
        out = out.reshape(B, Hkv, -1, D) + self._value_terms(p, blk)
        return out.reshape(B, Hq, D).to(query.dtype)

    def _score_bias(self, q: torch.Tensor, tq: int, blk: torch.Tensor) -> torch.Tensor:
        """q (B, Hkv, g, D) fp32 -> q . S_K[t] + U_K[t] . (W_K q) for packed t, (B, Hkv, g, tq)."""
        B, Hkv, g, D = q.shape
        bias = q.new_zeros(B, Hkv, g, tq)
        ns = max(self.n_slots)
        if ns:
            idx = self.k_sidx[:, :, :ns].long()[:, :, None].expand(-1, -1, g, -1)   # (B, Hkv, g, ns)
            val = self.k_sval[:, :, :ns].float()[:, :, None]
            bias.scatter_add_(-1, idx // D, q.gather(-1, idx % D) * val)
        nblk = max(len(bl) for bl in self.blocks)
        if self._low_rank():
            R = self.rank_cap
            # (B, Hkv, nblk, R, D) x (B, Hkv, g, D) -> (B, Hkv, g, nblk, R), then per token
            wq = torch.einsum("bhjrd,bhgd->bhgjr", self.k_w[:, :, :nblk].float(), q)
            wq = wq.gather(3, blk[:, None, None, :, None].expand(B, Hkv, g, tq, R))
            bias += torch.einsum("bhtr,bhgtr->bhgt", self.k_u[:, :, :tq].float(), wq)
        return bias

    def _value_terms(self, p: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
        """p (B, Hkv, g, tq) -> sum_t p_t S_V[t] + (sum_t p_t U_V[t]) W_V, (B, Hkv, g, D) fp32."""
        B, Hkv, g, tq = p.shape
        D = self.k_res.shape[3]
        out = p.new_zeros(B, Hkv, g, D)
        ns = max(self.n_slots)
        if ns:
            idx = self.v_sidx[:, :, :ns].long()[:, :, None].expand(-1, -1, g, -1)   # (B, Hkv, g, ns)
            val = self.v_sval[:, :, :ns].float()[:, :, None]
            out.scatter_add_(-1, idx % D, p.gather(-1, idx // D) * val)
        nblk = max(len(bl) for bl in self.blocks)
        if self._low_rank():
            R = self.rank_cap
            # sum over each block's tokens of p_t U_V[t]: (B, Hkv, g, nblk, R)
            pu = p[..., None] * self.v_u[:, :, None, :tq].float()
            pu = p.new_zeros(B, Hkv, g, nblk, R).scatter_add_(
                3, blk[:, None, None, :, None].expand(B, Hkv, g, tq, R), pu)
            out += torch.einsum("bhgjr,bhjrd->bhgd", pu, self.v_w[:, :, :nblk].float())
        return out

    def packed_bytes(self) -> int:
        """The packed-layout formula, as the torch backend counts it: per block codes + scale/zero
        + outliers + factors (the method's figure), and the fp16 residual tail of K and V."""
        if not self.is_initialized:
            return 0
        self.settle()
        self._count_bytes()
        _, H, _, D = self.k_res.shape
        tail = sum(2 * (self._n(b) - self.dk[b]) for b in range(len(self.start)))
        return sum(self.packed) + tail * H * D * 2

    # -- batch rows ----------------------------------------------------------------------------
    def _select_rows(self, idx: torch.Tensor) -> None:
        self._count_bytes()   # the uncounted blocks name rows by their old index
        super()._select_rows(idx)
        order = idx.tolist()
        self.n_slots, self.blocks, self.packed = ([xs[i] for i in order]
                                                for xs in (self.n_slots, self.blocks, self.packed))
