"""Bad input exits with one line naming the key, the value and what is allowed — before any model
loads. The table below is the README's table of bad inputs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from qeval.methods.kivi import KIVIKV
from qeval.methods.spec import Spec
from qeval.validate import CONFIG_DIR, ConfigError, check_config

# (command-line overrides, text the one-line error must contain)
BAD_INPUTS = [
    # recipes: combinations refused in one line naming both parts
    (["method=kivi", "kv=gear", "kv_bits=2"], "method=kivi: kv=gear takes every target it quantizes; allowed: one of them"),
    (["method=kivi", "weight=gptq", "w_bits=4", "a_bits=8"],
     "a_bits=8: no part of this recipe quantizes activations (weight=gptq, method=kivi); allowed: act=<group|uniform>, "
     "or a_bits=16"),
    (["evict=streaming", "kv=kivi", "kv_bits=2", "kv_semantics=simulated"],
     "kv_semantics=simulated: method streaming supports cache"),
    (["evict=h2o", "kv=gear", "kv_bits=2"], "kv=gear: with evict=h2o: it compresses streaming blocks"),
    (["evict=h2o", "kv=uniform", "kv_bits=4", "kv.kv_granularity=per_tensor"],
     "kv=uniform: with evict=h2o: its per_tensor statistics span tokens the cache may evict"),
    (["evict=h2o", "kv=kivi", "kv_bits=2", "kv_format=fp8_e4m3"], "kv_format=fp8_e4m3: method kivi supports int"),
    (["weight=kivi"], "weight=kivi: unknown weight (allowed: awq, gptq, group, uniform)"),
    # layers kept in full precision
    (["w_bits=4", "w_keep_layers=[2]"],
     "w_keep_layers=[2]: model tiny-random has 2 decoder layers, so 2 is none of them; allowed: indices from -2 to 1"),
    (["w_bits=4", "w_keep_layers=[0,-2]"], "w_keep_layers=[0, -2]: a layer is named twice"),
    (["w_keep_layers=[0]"], "w_keep_layers=[0]: nothing is quantized there to keep (w_bits and a_bits at 16); allowed: []"),
    (["method=h2o", "kv=kivi", "kv_bits=2", "kv_keep_layers=[0]"],
     "kv_keep_layers=[0]: method h2o evicts in every layer's cache; allowed: []"),
    (["w_keep_layers=first"], "w_keep_layers=first: allowed: a list of integers"),
    # a mixture of experts whose experts are fused 3-D tensors: a W row must not leave them in fp16
    (["model.random_config.model_type=mixtral", "+model.random_config.num_local_experts=4",
      "+model.random_config.num_experts_per_tok=2", "w_bits=4"],
     "w_bits=4: model tiny-random (mixtral) holds weights outside nn.Linear (model.layers.0.mlp.experts.gate_up_proj, "
     "a 4x512x128 fused expert tensor, and 3 more) that the Linear swap would leave in full precision"),
    (["transform=[rotate]"], "transform=rotate: unknown transform (allowed: smoothquant)"),
    (["kv=kivi", "kv_bits=2", "kv.group_size=24", "kv.residual_length=48"],
     "kv.group_size=24: does not divide head_dim=32 of model tiny-random"),
    (["weight=gptq", "w_bits=4", "weight.damp=abc"], "weight.damp=abc"),
    (["weight=gptq", "w_bits=4", "weight.dampp=0.1"], "weight.dampp=0.1: unknown key; did you mean 'damp'?"),
    (["kv=kivi", "kv_bits=2", "evict.heavy_ratio=0.1"], "evict.heavy_ratio=0.1: the config has no evict"),
    (["method=unifrom"], "method=unifrom: unknown method; did you mean 'uniform'?"),
    (["model=llama-7b"], "model=llama-7b: unknown model; did you mean 'llama2-7b'?"),
    (["task=paskey"], "task=paskey: unknown task; did you mean 'passkey'?"),
    (["kv_bit=2"], "kv_bit=2: unknown key; did you mean 'kv_bits'?"),
    (["w_bits=9"], "w_bits=9: method uniform supports 1, 2, 3, 4, 5, 6, 7, 8, 16 bits"),
    (["method=group", "kv_bits=1"], "kv_bits=1: method group supports 2, 3, 4, 5, 6, 7, 8, 16 bits"),
    (["method=group", "w_bits=4", "w_group_size=96"], "w_group_size=96: does not divide the Linear input width"),
    (["method=group", "kv_bits=4", "kv_group_size=24"], "kv_group_size=24: does not divide head_dim=32"),
    (["kv_semantics=serving"], "kv_semantics=serving: allowed: cache, simulated"),
    (["method=h2o", "kv_semantics=simulated"], "kv_semantics=simulated: method h2o supports cache"),
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
     ("backend=triton: method kivi decodes on packed words in an attention function of its own, and model "
      "tiny-random (bloom) never calls it (its attention code does not use transformers' AttentionInterface); "
      "allowed: backend=torch or auto")),
    (["model.random_config.model_type=gemma2", "+model.random_config.head_dim=32"],
     ("attn=sdpa: model tiny-random (gemma2) has no sdpa attention in transformers (Gemma2ForCausalLM); "
      "allowed: attn=eager")),
    (["method=h2o", "model.random_config.model_type=gemma3_text", "+model.random_config.sliding_window=8"],
     ("method=h2o: model tiny-random (gemma3_text) has sliding-window layers (window 8), whose window the "
      "evicting cache's own attention masks would not apply; allowed: a KV method that quantizes (gear, group, "
      "kivi, uniform), or a model whose layers attend to the whole sequence")),
    (["evict=streaming", "kv=kivi", "kv_bits=2", "model.random_config.model_type=mistral"],
     ("evict=streaming: model tiny-random (mistral) has sliding-window layers (window 4096)")),
    (["method=kivi", "kv_bits=2", "backend=triton", "model.random_config.model_type=gemma3_text",
      "+model.random_config.sliding_window=8"],
     ("backend=triton: method kivi decodes on packed words in an attention function of its own, and model "
      "tiny-random (gemma3_text) has sliding-window layers (window 8), which the fused decode would let attend "
      "to every held token; allowed: backend=torch or auto")),
    (["kv_bits=4", "kv_semantics=simulated", "model.random_config.model_type=bloom"],
     ("kv_semantics=simulated: model tiny-random (bloom) runs its own attention code, not transformers' "
      "AttentionInterface, so K/V would not be quantized; allowed: kv_semantics=cache")),
    (["method=h2o", "model.random_config.model_type=bloom"],
     ("method=h2o: model tiny-random (bloom) runs its own attention code, not transformers' AttentionInterface, "
      "which this method's attention function needs; allowed: a method that only quantizes K/V (gear, group, "
      "kivi, uniform)")),
    (["method=awq", "w_bits=4", "method.scales_file=/no/such/awq.pt"],
     "method.scales_file=/no/such/awq.pt: no such file; allowed: an llm-awq cache"),
    (["method=awq", "method.scales_file=A_FILE"],
     "method.scales_file=A_FILE: method awq applies it only when it quantizes (w_bits=16, a_bits=16)"),
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
    # --- the typed schema: wrong types, nulls, deletions, unknown names (qeval/schema) ---
    (["kv_bits=true"], "kv_bits=true: allowed: an integer"),          # not 1 bit
    (["kv_bits=1e400"], "kv_bits=inf: allowed: an integer"),
    (["w_group_size=0"], "w_group_size=0: allowed: null or an integer >= 1"),
    (["method.symmetric=maybe"], "method.symmetric=maybe: allowed: true, false"),   # not bool("maybe")
    (["method=gear", "method.rank_ratio=abc"], "method.rank_ratio=abc: allowed: null or a number"),
    (["method=gear", "method.outlier_ratio=nan"], "method.outlier_ratio=nan: allowed: a number"),
    (["method=gptq", "method.calibration=../model/toy"], "method.calibration=../model/toy: allowed: awq_pile, "),
    (["task.passkey.depths=0.5"], "task.passkey.depths=0.5: allowed: a non-empty list of numbers"),
    (["task.passkey.lengths=256"], "task.passkey.lengths=256: allowed: a non-empty list of integers"),
    (["task.passkey=null"], "task.passkey=null: allowed: task passkey's keys (lengths, depths"),
    (["task=toy_mc", "task.toy_mc.seed=[1]"], "task.toy_mc.seed=[1]: allowed: an integer"),
    (["~model"], "model: missing; allowed: model=<one of falcon-7b"),
    (["~task"], "~task: at least one task (allowed: "),
    (["~w_bits"], "w_bits: missing; allowed: an integer"),
    (["~method.symmetric"], "method.symmetric: missing; allowed: true, false"),
    (["method.name=no_such_method"], "method.name=no_such_method: unknown method (allowed: awq, gear"),
    (["method.name=../model/toy"], "method.name=../model/toy: unknown method (allowed: "),
    (["method=uniform", "method.name=group"], "method.w_granularity=per_channel: unknown key (method has: name"),
    (["model.path=[a,b]"], "model.path=[a, b]: allowed: null or a hub id (org/name) or a local model directory"),
    (["model.name=../x"], "model.name=../x: allowed: a model name of 1 to 100 printable characters"),
    (["model.path=NULL_CONFIG"], "model.path=NULL_CONFIG: not a readable model config (TypeError"),
    (["model.random_config.num_hidden_layers=0"], "model.random_config.num_hidden_layers=0: allowed: null or an integer >= 1"),
    (["model.random_config.model_type=nonsense"], "model.random_config.model_type=nonsense: transformers cannot build"),
    (["seed=99999999999999999999999"], "seed=99999999999999999999999: allowed: an integer from 0 to 4294967295"),
    (["seed=-1"], "seed=-1: allowed: an integer from 0 to 4294967295"),
    (["device=tpu"], "device=tpu: allowed: auto, cpu, cuda, cuda:N"),
    (["kv_bits=${kv_bits}"], "kv_bits=${kv_bits}: Recursive interpolation detected"),
    (["kv_bits=${nope}"], "kv_bits=${nope}: Interpolation key 'nope' not found"),
    (["kv_bits=["], "kv_bits=[: not an override"),
    (["kv_bits=2", "kv_bits=4"], "kv_bits=4: kv_bits is given twice (kv_bits=2, kv_bits=4); allowed: once"),
    (["-m", "kv_bits=range(16,0,0)"], "kv_bits=range(16,0,0): ValueError: range() arg 3 must not be zero"),
    (["-m", "kv_bits=range(0,16,-1)"], "kv_bits=range(0,16,-1): a sweep of no values"),
    (["-m", "task=[passkey],[nope]"], "task=nope: unknown task"),
    (["-m", "task=[passkey],[toy_mc]", "task.passkey.lengths=[256]"],
     "task.passkey.lengths=[256]: the cell model=tiny-random task=[toy_mc] task.passkey.lengths=[256]"),
    (["task.nope.x=1"], "task.nope.x=1: the config has no task.nope (task has: passkey)"),
    (["task=quant_error", "task.quant_error.text=abc"],
     "task.quant_error.n_tokens=256: the text has only 3 tokens; allowed: n_tokens <= 3"),
    # lm-eval's task names and (offline: the tests run with HF_HUB_OFFLINE=1) its data, before loading
    (["task=gsm8k"], "task=gsm8k: dataset openai/gsm8k/main could not be loaded"),
    (["task=mmlu", "task.mmlu.lm_eval_tasks=[nope]"],
     "task.mmlu.lm_eval_tasks=['nope']: 'nope' is not an lm-eval task, group or tag under lm_eval_dirs=['mmlu']"),
    (["method=h2o", "method.heavy_ratio=0.6", "method.recent_ratio=0.6"],
     "method.heavy_ratio=0.6: with method.recent_ratio=0.6 the budget is 1.2 of the prompt"),
    # --- names that become paths, and trust_remote_code (security) ---
    (["model.trust_remote_code=no"], "model.trust_remote_code=no: allowed: true, false"),
    (["model.trust_remote_code='false'"], "model.trust_remote_code=false: allowed: true, false"),
    (["model.trust_remote_code=off"], "model.trust_remote_code=off: allowed: true, false"),
    (["model.trust_remote_code=null"], "model.trust_remote_code=null: allowed: true, false"),
    (["model.trust_remote_code=1"], "model.trust_remote_code=1: allowed: true, false"),
    (["model.path=REMOTE_CODE"], "contains custom code"),              # false: its code never runs
    (["hydra.job.name=../../.."], "hydra.job.name=../../..: allowed: a name"),
    (["hydra.sweep.dir="], "hydra.sweep.dir=: allowed: a folder (a non-empty path)"),
    (["hydra.run.dir="], "hydra.run.dir=: allowed: a folder (a non-empty path)"),
    (["hydra.sweep.subdir=../x"], "hydra.sweep.subdir=../x: allowed: a relative folder inside the run's folder"),
    (["model=../method/kivi"], "model=../method/kivi: unknown model"),
    (["hydra/launcher=../../model/toy"], "hydra/launcher=../../model/toy: allowed: the name of one of"),
    (["hydra.output_subdir=../../x"], "hydra.output_subdir=../../x: allowed: a relative folder inside the run's"),
    (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe; Value 'maybe' is not a valid bool"),
    (["results_dir=LOOP/x"], "is a symlink that loops or points nowhere"),
    (["results_dir=/proc/qeval-results"], "results_dir=/proc/qeval-results: /proc is not writable"),
]


def placeholders(tmp_path) -> dict[str, str]:
    """The paths the table's placeholders stand for, outside the folder the command runs in."""
    d = tmp_path / "fixtures"
    return {"EMPTY_DIR": str(d / "empty"), "A_FILE": str(d / "a_file"), "NULL_CONFIG": str(d / "null_config"),
            "LOOP": str(d / "loop"), "REMOTE_CODE": str(d / "remote_code")}


def fixtures(tmp_path) -> dict[str, str]:
    """Makes the placeholders' files and folders; returns :func:`placeholders`."""
    d = tmp_path / "fixtures"
    (d / "empty").mkdir(parents=True)
    (d / "a_file").write_text("x")
    (d / "null_config").mkdir()
    (d / "null_config" / "config.json").write_text("null")
    (d / "loop").symlink_to(d / "loop")
    remote = d / "remote_code"
    remote.mkdir()
    # a model folder whose config names its own code: running it leaves a mark beside it
    (remote / "config.json").write_text('{"model_type": "qeval_remote", "auto_map": '
                                        '{"AutoConfig": "configuration_remote.RemoteConfig"}}')
    # (transformers runs a copy of the file from its modules cache, so the mark's path is absolute)
    (remote / "configuration_remote.py").write_text(
        f"import pathlib\npathlib.Path({str(remote / 'CODE_RAN')!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'qeval_remote'\n")
    return placeholders(tmp_path)


def refusal(args: list[str], tmp_path, monkeypatch, capsys) -> str:
    """``python -m qeval <args>`` run in-process from an empty folder: it must exit 2 with one
    line, load no model and leave the folder empty (no results, no Hydra run folder, no log).
    Returns the line."""
    from qeval.__main__ import entry
    from qeval.model import loading

    places = fixtures(tmp_path)
    args = [next((a.replace(k, v) for k, v in places.items() if k in a), a) for a in args]
    # the tiny random model, unless the case is about a model's path (the default toy model's then)
    base = [] if any(a.startswith(("model.path=", "~model", "model=")) for a in args) else ["model=tiny-random"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["qeval", *base, *args])

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(loading, "load", no_load)
    with pytest.raises(SystemExit) as exit_:
        entry()
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert exit_.value.code == 2, out
    assert len(lines) == 1 and lines[0].startswith("qeval: error: "), out.err
    assert "Traceback" not in out.err + out.out
    assert sorted(p.name for p in work.iterdir()) == [], "the refusal wrote files"
    assert not (tmp_path / "fixtures" / "remote_code" / "CODE_RAN").exists(), "a model folder's code ran"
    return lines[0].removeprefix("qeval: error: ")


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_key_and_value(overrides, expected, tmp_path, monkeypatch, capsys):
    msg = refusal(overrides, tmp_path, monkeypatch, capsys)
    for placeholder, path in placeholders(tmp_path).items():
        expected = expected.replace(placeholder, path)
    assert expected in msg, msg


def test_remote_code_runs_only_with_exactly_true(tmp_path):
    # the other half of the REMOTE_CODE case: the flag means what it says
    from omegaconf import OmegaConf

    from qeval.model import loading
    remote = Path(fixtures(tmp_path)["REMOTE_CODE"])
    node = OmegaConf.create({"path": str(remote), "revision": None, "trust_remote_code": "false"})
    assert not loading.trusts_remote_code(node)    # a truthy string is not true
    with pytest.raises(ValueError, match="custom code"):
        loading.model_config(node)
    assert not (remote / "CODE_RAN").exists()
    node.trust_remote_code = True
    assert type(loading.model_config(node)).__name__ == "RemoteConfig"
    assert (remote / "CODE_RAN").exists()


def test_a_sweep_of_lists_is_parsed_by_hydras_grammar(tmp_path, monkeypatch, capsys):
    # task=[passkey],[toy_mc] is two cells of one task each, not the values "[passkey" and "toy_mc]"
    from qeval.__main__ import entry
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["qeval", "-m", "task=[passkey],[toy_mc]", "--cfg", "job"])
    entry()
    out = capsys.readouterr().out
    assert "# cell 0: task=[passkey]" in out and "# cell 1: task=[toy_mc]" in out
    assert list(tmp_path.iterdir()) == []


def test_kv_only_methods_refuse_weights():
    kv_only = Spec("kvonly", {"kv": KIVIKV})

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["w_bits=4"])
    with pytest.raises(ConfigError, match="w_bits=4: method kvonly quantizes only the KV cache"):
        check_config(cfg, kv_only)


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


@pytest.mark.parametrize("model_type,expected", [("bloom", "torch"), ("llama", "triton"), ("gemma3_text", "torch")])
def test_auto_backend_keeps_the_cache_on_torch_where_the_fused_decode_cannot_serve(
        model_type, expected, monkeypatch, tmp_path):
    # backend=auto on CUDA resolves to triton; a model whose attention never runs the registered
    # decode-on-packed-words function (BLOOM), or whose sliding-window layers it would let attend
    # past their window (Gemma-3), must then keep KIVI's cache on torch, not crash or miscompute
    from qeval.methods import build
    monkeypatch.setattr(build, "resolve_backend", lambda backend, device: "triton")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["model=tiny-random", "method=kivi", "kv_bits=2",
                                           f"model.random_config.model_type={model_type}",
                                           f"results_dir={tmp_path}"])
    assert build.build_parts(cfg, ("kv",))["kv"].columns()["kv_backend"] == expected
