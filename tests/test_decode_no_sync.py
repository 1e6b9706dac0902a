"""A decode step of a packed KV layer (KIVI, GEAR with backend=triton) never waits for the device.

On a GPU, reading a tensor on the host (``int(t)``, ``t.item()``, ``t.tolist()``, ...) waits for
every queued kernel, and so does building a tensor from Python data straight onto the device
(``torch.tensor(xs, device=cuda)`` copies from pageable memory); either one per layer per step
serializes the host with the GPU. On the CPU neither is a wait, so the test makes both raise while
a packed layer runs the update and the fused decode of a one-token step (transformers' own code
outside the layer is left alone), with every Triton launch replaced by a no-op: the interpreter
itself reads tensors on the host, and what the kernels compute is tested elsewhere. The steps
cover blocks packed in a decode step, for one row of a left-padded batch while the other waits.
"""

import pytest
import torch
from method_configs import from_knobs, method_params
from packed_backend_helpers import DEV, load_tiny
from triton.runtime.jit import KernelInterface

from qeval.kernels import kv_decode_attention, kv_pack
from qeval.kv.cache import cache_kwarg
from qeval.methods.base import Bits, Knobs
from qeval.methods.gear_packed import PackedGEARLayer
from qeval.methods.kivi_packed import PackedKIVILayer
from qeval.model.handle import Handle

HOST_READS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__")
PROMPT, PADDED, STEPS = 40, 13, 8   # with blocks of 16: row 1 packs a block at step 6, row 0 waits


class DeviceReadInStep(AssertionError):
    pass


@pytest.fixture
def no_device_reads(monkeypatch):
    """``armed(fn)`` runs ``fn`` with every host read of a tensor and every tensor built from
    Python data onto a device raising ``DeviceReadInStep``."""
    state = {"on": False}

    def guard(name, original):
        def guarded(*args, **kwargs):
            if state["on"]:
                raise DeviceReadInStep(f"{name} in a decode step")
            return original(*args, **kwargs)
        return guarded

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def build(*args, _original=original, _name=name, **kwargs):
            if state["on"] and kwargs.get("device") is not None:
                raise DeviceReadInStep(f"torch.{_name}(..., device=) in a decode step")
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch, name, build)

    def armed(fn):
        def run(*args, **kwargs):
            state["on"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                state["on"] = False
        return run
    return armed


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel of the packed-KV modules replaced by a no-op (found by type, so a
    renamed kernel is stubbed too); returns the launch log."""
    log = []

    class NoLaunch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(self.name)

    for mod in (kv_decode_attention, kv_pack):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface):
                monkeypatch.setattr(mod, name, NoLaunch(name))
    return log


def kivi():
    return from_knobs("kivi", method_params("kivi", group_size=16, residual_length=16),
                      Knobs(Bits(16, 16, 2, 2), kv_semantics="cache", backend="triton"))


def gear():
    return from_knobs("gear", method_params("gear", group_size=16, stream_block=16),
                      Knobs(Bits(16, 16, 2, 2), kv_semantics="cache", backend="triton"))


@pytest.mark.parametrize("make,layer_cls", [(kivi, PackedKIVILayer), (gear, PackedGEARLayer)],
                         ids=["kivi", "gear"])
def test_decode_step_reads_nothing_back_from_the_device(make, layer_cls, no_device_reads, launches,
                                                         monkeypatch):
    model, tok = load_tiny()
    method = make()
    model.set_attn_implementation(method.attention_implementation("sdpa"))
    steps = []
    update, decode = layer_cls.update, layer_cls.decode

    def one_token_update(self, k, v, *args, **kwargs):
        if k.shape[2] != 1:
            return update(self, k, v, *args, **kwargs)   # prefill may read back: it is not a step
        steps.append((list(self.dk), list(self.dv)))
        return no_device_reads(update)(self, k, v, *args, **kwargs)
    monkeypatch.setattr(layer_cls, "update", one_token_update)
    decoded = []
    monkeypatch.setattr(layer_cls, "decode", lambda self, *a: decoded.append(1) or no_device_reads(decode)(self, *a))
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, PROMPT), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :PADDED] = 0
    cache = Handle(model, tok, method, "cache").new_cache(mask)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
        for _ in range(STEPS):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            model(ids[:, -1:], attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    layers = len(cache.layers)
    assert all(isinstance(layer, layer_cls) for layer in cache.layers)
    assert len(steps) == layers * STEPS and len(decoded) == layers * STEPS, (len(steps), len(decoded))
    assert launches, "the fused path launched nothing"
    # a decode step packed a block of row 1 alone (its rows grouped apart: an index of rows built)
    first, last = steps[layers - 1][0], cache.layers[-1].dk
    assert last[1] > first[1] and last[0] == first[0], (first, last)
