"""Every registered method keeps the contract the runner relies on. The table is built from the
registry and the shipped YAML, so a new method is tested by adding its row to
``tests/method_configs.py`` (and fails here until it has one)."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from method_configs import (
    CHOICES,
    CONTRACT,
    check_params,
    make_contract_method,
    make_method,
    method_params,
)
from omegaconf import OmegaConf
from tiny_models import tiny_model
from transformers import DynamicCache

from qeval.errors import ConfigError
from qeval.kv.cache import (
    QevalCache,
    cache_kwarg,  # noqa: E402
    held_bytes,
    packed_layout_bytes,
)
from qeval.methods import METHODS
from qeval.methods.eviction import EvictPart
from qeval.methods.parts import ActPart, Calibrated, KVPart, TransformPart, WeightPart
from qeval.model.handle import Handle
from qeval.recipe.slot_names import ACT, EVICT, KV, TRANSFORM, WEIGHT
from qeval.validate import CONFIG_DIR, options

PROMPTS = ["The grass is green. The sky is blue. The sun is yellow. Here we go again.", "Short one."]


def test_every_method_has_a_config_and_a_contract_row():
    assert set(METHODS) == set(options("method")), "registry key = config file name"
    missing = set(METHODS) - set(CONTRACT)
    assert not missing, f"methods without a row in tests/method_configs.py CONTRACT: {sorted(missing)}"
    assert set(CONTRACT) <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_key_config_name_and_class_agree(name):
    cls = METHODS[name]
    assert cls.name == name and method_params(name).name == name
    _, bits, semantics = CONTRACT[name]
    assert bits in cls.allowed_bits and 16 in cls.allowed_bits
    assert tuple(cls.semantics) == semantics


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_shipped_config_passes_the_methods_own_checks(name):
    _, bits, _ = CONTRACT[name]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", f"kv_bits={bits}", "model=tiny-random"])
    METHODS[name].check(cfg)


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_named_choices_pass_the_check_and_anything_else_is_a_one_line_error(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = compose("config", overrides=[f"method={name}", "model=tiny-random"])
    for key, allowed in CHOICES[name].items():
        for value in (*allowed, "bogus"):
            cfg = copy.deepcopy(base)
            OmegaConf.update(cfg, f"method.{key}", value)
            if value in allowed:
                check_params(cfg)
                continue
            with pytest.raises(ConfigError) as e:
                check_params(cfg)
            assert str(e.value) == f"method.{key}=bogus: allowed: {', '.join(allowed)}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_rows_carry_parameters_and_labels(name):
    method = make_contract_method(name)
    row = method.describe()
    assert {f"method.{k}" for k in method_params(name) if k != "name"} <= set(row)
    assert {"target", "setting", "kv_budget"} <= set(row)
    if method.evict is not None:
        assert row["target"] in ("KV-evict", "fp16") and (row["kv_budget"] is not None or "tok" in row["setting"])
    elif method.quantizes_kv:
        assert row["target"] == "KV" and row["kv_budget"] is None


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("semantics", ["cache", "simulated"])
def test_the_cache_comes_from_the_method_when_it_needs_one(name, semantics):
    """A method that quantizes or evicts K/V gets its own cache under ``cache`` semantics (built
    from its layers), and generation runs through it and measures it; otherwise a plain
    DynamicCache serves, which would change nothing."""
    if semantics not in CONTRACT[name][2]:
        pytest.skip(f"{name} has no {semantics} semantics")
    method = make_contract_method(name, semantics)
    model, tok = tiny_model("llama")
    if (impl := method.attention_implementation("sdpa")) is not None and semantics == "cache":
        model.set_attn_implementation(impl)
    handle = Handle(model, tok, method, semantics)
    cache = handle.new_cache(torch.ones(1, 4, dtype=torch.long))
    if semantics == "cache" and method.needs_cache:
        assert isinstance(cache, QevalCache)
        assert all(type(layer) is type(method.make_cache_layer(0, cache.seq)) for layer in cache.layers)
    else:
        assert isinstance(cache, DynamicCache) and not isinstance(cache, QevalCache)
    out = handle.generate(PROMPTS, max_new_tokens=6)
    assert len(out) == 2
    if semantics == "cache" and method.needs_cache:
        assert handle.stats.kv_bytes_held > 0 and handle.stats.kv_bytes_packed > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sixteen_bit_quantizers_need_no_cache_and_evictors_always_do(name):
    method = make_method(name, 16, **CONTRACT[name][0])
    assert method.needs_cache == (method.evict is not None)


def test_held_and_packed_bytes_are_measured_from_the_cache():
    method = make_contract_method("kivi")
    model, tok = tiny_model("llama")
    handle = Handle(model, tok, method, "cache")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    cache = handle.new_cache(enc["attention_mask"])
    model(**enc, **{cache_kwarg(model): cache})
    assert held_bytes(cache) == sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert 0 < packed_layout_bytes(cache, method) < held_bytes(cache)


PROTOCOLS = {WEIGHT: WeightPart, ACT: ActPart, KV: KVPart, EVICT: EvictPart, TRANSFORM: TransformPart}
MAX_PUBLIC_MEMBERS = 12


def _public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_part_is_small_and_answers_only_for_its_own_target(name):
    """A method is parts, one per slot it fills: each is its slot's protocol, has at most 12 public
    members, and none of another target's (a weight part cannot be asked for a KV cache)."""
    (_, parts), = make_contract_method(name).parts
    assert tuple(parts) == METHODS[name].slots
    for slot, part in parts.items():
        mine = PROTOCOLS[slot]
        assert isinstance(part, mine)
        public = _public(part)
        assert len(public) <= MAX_PUBLIC_MEMBERS, f"{name}'s {slot} part: {sorted(public)}"
        foreign = set().union(*(_public(p) for s, p in PROTOCOLS.items() if not issubclass(mine, p)))
        foreign -= _public(mine) | (_public(Calibrated) if isinstance(part, Calibrated) else set())
        assert not public & foreign, f"{name}'s {slot} part answers for another target: {sorted(public & foreign)}"
