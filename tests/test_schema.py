"""The typed schema (qeval/schema) describes the config tree as it is: every YAML option's keys are
its node's keys and its defaults fit them, every registered method and task has a node, and the
choices the schema repeats (it must not import torch) equal the modules' own."""

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from qeval import CONFIG_DIR
from qeval.errors import ConfigError
from qeval.schema import check, check_hydra, nodes, options
from qeval.schema.types import (
    ArchConfig,
    Bool,
    Int,
    ListOf,
    Nullable,
    Number,
    Optional,
    shown,
)


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    check_hydra(cfg.hydra)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def required(schema: dict) -> set[str]:
    return {k for k, t in schema.items() if not isinstance(t, Optional)}


@pytest.mark.parametrize("group,schemas", [("method", nodes.methods()), ("task", nodes.tasks())])
def test_every_option_has_exactly_its_nodes_keys(group, schemas):
    assert set(options(group)) == set(schemas)
    for name in options(group):
        keys = set(yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())) - {"defaults", "name"}
        schema = set(schemas[name])
        assert required(schemas[name]) <= keys <= schema, (name, keys ^ schema)


@pytest.mark.parametrize("group,schema", [("model", nodes.MODEL), ("calibration", nodes.CALIBRATION)])
def test_model_and_calibration_options_fit_their_node(group, schema):
    for name in options(group):
        keys = set(yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text()))
        assert required(schema) <= keys <= set(schema), (name, keys ^ set(schema))


def test_top_level_keys_are_the_schemas():
    top = set(yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())) - {"defaults", "hydra"}
    assert top == set(nodes.TOP)


@pytest.mark.parametrize("method", options("method"))
def test_every_default_fits(method):
    # every method with every task and the three kinds of model: the shipped defaults pass
    for task in options("task"):
        for model in ("toy", "tiny-random", "llama2-7b"):
            check(composed([f"method={method}", f"task={task}", f"model={model}"]))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_fits(experiment):
    check(composed([f"experiment={experiment}"]))


def test_registered_methods_and_tasks_have_nodes():
    from qeval.methods import METHODS
    from qeval.tasks import TASKS
    assert set(METHODS) == set(nodes.methods())
    assert set(TASKS) == set(nodes.tasks())


def test_repeated_choices_equal_the_modules():
    from qeval.calibration.data import SAMPLINGS
    from qeval.data.corpus import PROTOCOLS
    from qeval.methods.gear import BACKBONES, OUTLIER_RULES
    from qeval.methods.uniform import (
        A_GRANULARITIES,
        KV_GRANULARITIES,
        W_GRANULARITIES,
        ZERO_POINTS,
    )
    from qeval.tasks.perplexity import CORPORA, SCORINGS

    m, t = nodes.methods(), nodes.tasks()
    assert set(m["uniform"]["zero_point"].values) == set(ZERO_POINTS)
    assert set(m["uniform"]["w_granularity"].values) == set(W_GRANULARITIES)
    assert set(m["uniform"]["a_granularity"].values) == set(A_GRANULARITIES)
    assert set(m["uniform"]["kv_granularity"].values) == set(KV_GRANULARITIES)
    assert set(m["gear"]["backbone"].values) == set(BACKBONES)
    assert set(m["gear"]["outlier_rule"].values) == set(OUTLIER_RULES)
    assert set(nodes.CALIBRATION["sampling"].inner.values) == set(SAMPLINGS)
    assert set(t["c4"]["protocol"].values) == set(PROTOCOLS)
    assert set(t["c4"]["corpus"].values) == set(CORPORA)
    assert set(t["c4"]["scoring"].values) == set(SCORINGS)


@pytest.mark.parametrize("t,good,bad", [
    (Int(), [0, -3, 2**70], [True, False, 1.0, "1", None, [1]]),   # a bool is never an integer
    (Number(), [0, 0.5, -2], [True, float("inf"), float("nan"), "0.5", None]),
    (Bool(), [True, False], ["true", "false", "no", "off", 0, 1, None]),
    (Nullable(Int(1)), [None, 1], [0, "1"]),
    (ListOf(Int()), [[1], [1, 2]], [[], 1, "1", [1, "2"], [True]]),
])
def test_types_take_exactly_their_values(t, good, bad):
    assert all(t.fits(v) for v in good)
    assert not any(t.fits(v) for v in bad)


def test_arch_config_counts_are_positive():
    a = ArchConfig()
    assert a.problem("m", {"model_type": "llama", "num_hidden_layers": 2, "rope_theta": 1e4}) is None
    assert "num_hidden_layers=0" in a.problem("m", {"model_type": "llama", "num_hidden_layers": 0})
    assert "hidden_size=true" in a.problem("m", {"model_type": "llama", "hidden_size": True})
    assert "model_type=null" in a.problem("m", {"hidden_size": 8})


def test_shown_values_are_one_short_line():
    assert shown(True) == "true" and shown(None) == "null" and shown([1, None]) == "[1, null]"
    long = shown("x" * 10_000_000)
    assert len(long) < 200 and long.endswith("...")
    assert "\n" not in shown("a\nb") and "\x00" not in shown("a\x00b")


def test_unknown_key_names_the_node_and_its_keys():
    cfg = composed(["method=kivi"])
    with open_dict(cfg):
        cfg.method.grup_size = 4
    with pytest.raises(ConfigError, match=r"method.grup_size=4: unknown key; did you mean 'group_size'\? "
                                          r"\(method has: group_size, name, residual_length\)"):
        check(cfg)
