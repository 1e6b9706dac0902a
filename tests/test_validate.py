"""Bad input exits with one line naming the key, the value and what is allowed — before any model
loads. The table below is the README's table of bad inputs."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from qeval.methods.base import Method
from qeval.run import validate
from qeval.validate import CONFIG_DIR, ConfigError, check_composes, check_config, check_overrides

# (command-line overrides, text the one-line error must contain)
BAD_INPUTS = [
    (["method=unifrom"], "method=unifrom: unknown method; did you mean 'uniform'?"),
    (["model=llama-7b"], "model=llama-7b: unknown model; did you mean 'llama2-7b'?"),
    (["task=paskey"], "task=paskey: unknown task; did you mean 'passkey'?"),
    (["kv_bit=2"], "kv_bit=2: unknown key; did you mean 'kv_bits'?"),
    (["w_bits=9"], "w_bits=9: method uniform supports 1, 2, 3, 4, 5, 6, 7, 8, 16 bits"),
    (["method=group", "kv_bits=1"], "kv_bits=1: method group supports 2, 3, 4, 5, 6, 7, 8, 16 bits"),
    (["method=group", "w_bits=4", "w_group_size=96"], "w_group_size=96: does not divide the Linear input width"),
    (["method=group", "kv_bits=4", "kv_group_size=24"], "kv_group_size=24: does not divide head_dim=32"),
    (["kv_semantics=serving"], "kv_semantics=serving: method uniform supports cache, simulated"),
    (["method.kv_granularity=per_channel", "kv_bits=2"], "method.kv_granularity=per_channel: with kv_semantics=cache"),
    (["method.w_granularity=per_row", "w_bits=4"], "method.w_granularity=per_row: allowed: per_tensor, per_channel"),
    (["dtype=fp8"], "dtype=fp8: allowed: auto, float32, float16, bfloat16"),
    (["method=kivi", "kv_bits=2", "method.group_size=24", "method.residual_length=48"],
     "method.group_size=24: does not divide head_dim=32 of model tiny-random"),
    (["method=kivi", "w_bits=4"], "w_bits=4: method kivi quantizes only the KV cache"),
    (["method=kivi", "kv_bits=3"], "kv_bits=3: method kivi supports"),
    (["model=llama2-7b"], "model.path=meta-llama/Llama-2-7b-hf: not a local directory and not in the Hugging Face cache"),
    (["model.path=/nonexistent/model"], "model.path=/nonexistent/model: does not exist; allowed: a directory"),
    (["model.path=EMPTY_DIR"], "has no config.json; allowed: a directory holding a Hugging Face model"),
    (["model.path=A_FILE"], "is not a directory; allowed: a directory holding a Hugging Face model"),
    (["results_dir=A_FILE"], "exists and is not a directory; allowed: a directory"),
    (["seed=abc"], "seed=abc: allowed: an integer"),
    (["force=maybe"], "force=maybe: allowed: true, false"),
    (["task=[]"], "task=[]: at least one task (allowed: "),
    (["kv_bits=2,4"], "kv_bits=2,4: a sweep needs -m"),
    (["method.foo=1"], "method.foo=1: unknown key (method has: a_granularity"),
    (["+method.foo=1"], "method.foo=1: unknown key (method has: a_granularity"),
    (["+kv_bit=2"], "kv_bit=2: unknown key; did you mean 'kv_bits'?"),
    (["+task.passkey.lenghts=[256]"], "task.passkey.lenghts=[256]: unknown key; did you mean 'lengths'?"),
    (["task.passkey.lenghts=[256]"], "task.passkey.lenghts=[256]: unknown key; did you mean 'lengths'?"),
    (["task.passkey.lengths=[-5]"], "task.passkey.lengths=[-5]: -5 is out of range; allowed: integers from 1 to"),
    (["task.passkey.lengths=[100000]"], "task.passkey.lengths=[100000]: 100000 is out of range; allowed: integers from 1 to 4088"),
    # the shortest prompt (no filler) is 229 characters: the tiny model tokenizes by character
    (["task.passkey.lengths=[5]"], "task.passkey.lengths=5: shorter than the prompt without filler (229 tokens"),
    (["task=gsm8k", "task.gsm8k.seed=[0,1]"], "task.gsm8k.seed=[0, 1]: allowed: an integer >= 0 (all four of lm-eval's"),
    (["method.zero_point=half"], "method.zero_point=half: allowed: real, integer, gptq"),
    (["method=gptq", "a_bits=8"], "a_bits=8: method gptq quantizes weights only; allowed: 16"),
    (["method=gptq", "w_bits=4", "calibration.seq_len=9000"],
     "calibration.seq_len=9000: allowed: integers from 2 to 4096 (the model's positions)"),
    (["task.passkey.depths=[1.5]"], "task.passkey.depths=[1.5]: allowed: a non-empty list of numbers in [0, 1]"),
    (["task.passkey.depths=[-0.5]"], "task.passkey.depths=[-0.5]: allowed: a non-empty list of numbers in [0, 1]"),
    (["task.passkey.samples_per_cell=0"], "task.passkey.samples_per_cell=0: allowed: an integer >= 1"),
    (["task.passkey.batch_size=0"], "task.passkey.batch_size=0: allowed: an integer >= 1"),
    (["task.passkey.key_digits=0"], "task.passkey.key_digits=0: allowed: an integer from 1 to 18"),
    (["task=toy_arith", "task.toy_arith.n_samples=0"], "task.toy_arith.n_samples=0: allowed: an integer >= 1"),
    (["task=quant_error", "task.quant_error.context_tokens=300"],
     "task.quant_error.context_tokens=300: allowed: an integer from 1 to 255"),
    (["task=gsm8k", "task.gsm8k.scoring=fast"], "task.gsm8k.scoring=fast: allowed: prefill, stock"),
    (["task=mmlu", "task.mmlu.limit=-1"], "task.mmlu.limit=-1: allowed: null, an integer >= 1"),
    (["w_format=fp8_e4m4"], ("w_format=fp8_e4m4: unknown format; did you mean 'fp8_e4m3'? (allowed: int, fp8_e4m3, "
                             "fp8_e5m2, mxfp8, mxfp4, nvfp4)")),
    (["w_format=fp8_e4m3", "w_bits=4"], ("w_bits=4: w_format=fp8_e4m3 has 8-bit elements; allowed: 16 (the format "
                                         "decides) or 8")),
    (["kv_format=fp8_e5m2", "k_bits=4"], "k_bits=4: kv_format=fp8_e5m2 has 8-bit elements; allowed: 16"),
    (["method=kivi", "kv_format=mxfp4"], ("kv_format=mxfp4: method kivi supports int (mxfp4's 32-element blocks are "
                                          "its own grouping; mxfp4 runs with method=uniform)")),
    (["method=h2o", "kv_format=fp8_e4m3"], ("kv_format=fp8_e4m3: method h2o supports int (fp8_e4m3 runs with "
                                            "method=uniform or method=group)")),
    (["method=group", "w_format=nvfp4"], ("w_format=nvfp4: method group supports int, fp8_e4m3, fp8_e5m2 (nvfp4's "
                                          "16-element blocks are its own grouping; nvfp4 runs with method=uniform)")),
    (["model.random_config.hidden_size=80", "kv_format=nvfp4"],
     ("kv_format=nvfp4: its 16-element blocks do not divide head_dim=20 of model tiny-random; allowed: int, "
      "fp8_e4m3, fp8_e5m2")),
    (["method=kivi", "kv_bits=2", "backend=triton", "model.random_config.model_type=bloom"],
     ("backend=triton: method kivi decodes on packed words in a registered attention function, which model "
      "tiny-random (bloom) never calls; allowed: backend=torch or auto")),
    (["kv_bits=4", "kv_semantics=simulated", "model.random_config.model_type=bloom"],
     ("kv_semantics=simulated: model tiny-random (bloom) runs its own attention code, not transformers' "
      "AttentionInterface, so K/V would not be quantized; allowed: kv_semantics=cache")),
    (["method=h2o", "model.random_config.model_type=bloom"],
     ("method=h2o: model tiny-random (bloom) runs its own attention code, not transformers' AttentionInterface, "
      "which this method's attention function needs; allowed: a method that only quantizes K/V (gear, group, "
      "kivi, uniform)")),
    (["method=awq", "w_bits=4", "method.scales_file=/no/such/awq.pt"],
     "method.scales_file=/no/such/awq.pt: no such file; allowed: an llm-awq cache"),
    (["method=smoothquant", "w_bits=8", "a_bits=8", "method.scales_file=A_FILE"],
     "a_file: not loadable with torch.load(weights_only=True)"),
    (["method=gptq", "w_bits=4", "backend=triton", "method.act_order=true"],
     "backend=triton: method.act_order=true with w_group_size=128: act-order's groups are not contiguous"),
    (["backend=triton", "w_format=fp8_e4m3"], ("backend=triton: w_format=fp8_e4m3: the Triton kernels hold integer "
                                               "codes; allowed: backend=torch or backend=auto")),
    (["kv_scale=fixed"], "kv_scale=fixed: allowed: dynamic, static, static_per_head"),
    (["kv_scale=static"], ("kv_scale=static: kv_format=int has no fixed scale to calibrate (int keeps a min-max "
                           "scale per group, mx/nvfp4 their block scales); allowed: kv_format=fp8_e4m3 or "
                           "kv_format=fp8_e5m2, or kv_scale=dynamic")),
    (["kv_scale=static_per_head", "kv_format=mxfp4"], "kv_scale=static_per_head: kv_format=mxfp4 has no fixed scale"),
    (["method=group", "kv_format=fp8_e4m3", "kv_scale=static", "kv_group_size=8"],
     "kv_group_size=8: kv_scale=static holds one scale per layer (per_tensor), not per group; allowed: null"),
    # tiny-random names no calibration preset: K/V scales fall back to SmoothQuant's pile-val, absent offline
    (["kv_format=fp8_e4m3", "kv_scale=static"],
     "calibration: dataset mit-han-lab/pile-val-backup (split validation) could not be loaded"),
]


def error_for(overrides: list[str], tmp_path) -> str:
    """What ``python -m qeval <overrides>`` reports, run in-process up to validation."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    overrides = [o.replace("EMPTY_DIR", str(tmp_path / "empty")).replace("A_FILE", str(tmp_path / "a_file"))
                 for o in overrides]
    # the tiny random model, unless the case is about a model's path (the default toy model's then)
    base = [] if any(o.startswith("model.path=") for o in overrides) else ["model=tiny-random"]
    try:
        check_overrides(overrides)
        check_composes([*base, f"results_dir={tmp_path}", *overrides])
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*base, f"results_dir={tmp_path}", *overrides])
        validate(cfg)
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_key_and_value(overrides, expected, tmp_path):
    msg = error_for(overrides, tmp_path)
    assert expected in msg, msg
    assert "\n" not in msg


def test_kv_only_methods_refuse_weights():
    class KVOnly(Method):
        name = "kvonly"
        targets = frozenset({"KV"})

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["w_bits=4"])
    with pytest.raises(ConfigError, match="w_bits=4: method kvonly quantizes only the KV cache"):
        check_config(cfg, KVOnly)


@pytest.mark.parametrize("args,expected", [(["method=unifrom"], "did you mean 'uniform'"),
                                           (["w_bits=9", "model=tiny-random"], "w_bits=9"),
                                           (["task.passkey.lengths=[-5]"], "task.passkey.lengths=[-5]"),
                                           (["task.passkey.lengths=[5]"], "lengths >= "),
                                           (["+method.foo=1"], "method.foo=1: unknown key"),
                                           (["method.foo=1"], "method.foo=1: unknown key"),
                                           (["kv_bits=2,4"], "a sweep needs -m")])
def test_command_line_exits_2_with_one_line_and_no_traceback(args, expected, tmp_path):
    p = subprocess.run([sys.executable, "-m", "qeval", *args, f"results_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("qeval: error:") and expected in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("model_type,expected", [("bloom", "torch"), ("llama", "triton")])
def test_auto_backend_keeps_the_cache_on_torch_where_attention_ignores_registered_functions(
        model_type, expected, monkeypatch, tmp_path):
    # backend=auto on CUDA resolves to triton; a model whose attention never runs the registered
    # decode-on-packed-words function (BLOOM) must then keep KIVI's cache on torch, not crash
    from qeval.methods import build
    monkeypatch.setattr(build, "resolve_backend", lambda backend, device: "triton")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["model=tiny-random", "method=kivi", "kv_bits=2",
                                           f"model.random_config.model_type={model_type}",
                                           f"results_dir={tmp_path}"])
    assert build.build_method(cfg).kv_backend == expected
