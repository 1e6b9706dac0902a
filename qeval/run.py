"""One run: validate -> load -> calibrate (if the method asks) -> apply targets -> evaluate tasks -> write rows."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qeval import results
from qeval.calibration import kv_scales
from qeval.calibration import stage as calibration
from qeval.errors import ConfigError
from qeval.kv import simulated
from qeval.methods.base import Bits, Formats, bit_labels
from qeval.model import loading
from qeval.model.handle import Handle
from qeval.model.keep import resolved
from qeval.model.linear import quantize_linears, refuse_fused_weights
from qeval.model.memory import PeakMemory
from qeval.recipe.build import build_recipe
from qeval.sweep.signals import Interrupted
from qeval.tasks import TASKS
from qeval.validate import validate, validated

log = logging.getLogger(__name__)


def prepare(cfg):
    """Load the model, calibrate where the recipe's parts ask for it, and apply every target;
    returns (handle, facts about the quantized model)."""
    method = build_recipe(cfg)
    # calibrated parts read their data (or find a saved result) before any weights load
    stage = calibration.Stage(method.calibration_view(), method.calibrator()) if method.needs_calibration else None
    # kv_scale=static: K/V scales from the same kind of stage, on the model before anything changes it
    kv_stage = (calibration.Stage(kv_scales.data_config(cfg), kv_scales.Calibration(method.kv, kv_scales.mode(cfg)))
                if kv_scales.is_static(cfg) else None)
    started = time.perf_counter()
    model, tokenizer = loading.load(cfg.model, cfg.device, cfg.dtype, cfg.attn, cfg.seed)
    log.info(f"qeval: model {cfg.model.name} loaded in {time.perf_counter() - started:.1f} s")
    facts = kv_scales.row(kv_stage.run(model)) if kv_stage else {}
    facts |= stage.run(model) if stage else {}
    refuse_fused_weights(model, method, cfg.model.name)
    facts |= quantize_linears(model, method, cfg.backend, cfg.get("w_keep_layers") or ())
    n_layers = model.config.get_text_config().num_hidden_layers
    method.keep_kv = resolved(cfg.get("kv_keep_layers"), n_layers)
    # the layers kept in full precision, as indices from 0 ("0,3"; base_row's None: every layer quantized)
    facts |= {f"{t}_keep_layers": ",".join(map(str, sorted(resolved(cfg.get(f"{t}_keep_layers"), n_layers))))
              for t in ("w", "kv") if cfg.get(f"{t}_keep_layers")}
    if cfg.kv_semantics == "simulated" and method.quantizes_kv:
        (kv_scales.install_simulated if method.kv_scales is not None else simulated.install)(model, method, cfg.attn)
    elif (attention := method.attention_implementation(cfg.attn)) is not None:
        model.set_attn_implementation(attention)
    return Handle(model, tokenizer, method, cfg.kv_semantics), facts


def base_row(cfg, method, run_id: str) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    b = method.bits
    return {
        "run_id": run_id, "model": cfg.model.name, "model_path": cfg.model.get("path"),
        "method": method.name, **method.describe(),
        # bits per element; a non-int kv_format's own width stands for kv_bits (16 there means
        # "the format decides")
        "w_bits": b.w, "a_bits": b.a, "kv_bits": cfg.kv_bits if method.formats.kv.is_integer else b.k,
        "k_bits": b.k, "v_bits": b.v,
        "w_group_size": cfg.w_group_size, "a_group_size": cfg.a_group_size,
        "kv_group_size": cfg.kv_group_size, "kv_semantics": cfg.kv_semantics,
        "w_keep_layers": None, "kv_keep_layers": None,   # prepare's facts name the kept layers
        "dtype": str(loading.resolve_dtype(cfg.dtype, loading.resolve_device(cfg.device))).removeprefix("torch."),
        "attn": cfg.attn, "seed": cfg.seed, "trust_remote_code": cfg.model.get("trust_remote_code", False),
        "config_hash": run_id, "git_commit": results.git_commit(),
        **{f"version.{k}": v for k, v in results.library_versions().items()},
        "config": c,
    }


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg, run_dir: Path, error: str, status: str = "failed", say: bool = True) -> dict:
    """Write a failed row for a cell whose method was never built (a bad config in a sweep, a cell
    killed from outside), labelled as its bits would label it; ``status="interrupted"`` for a cell
    stopped by a signal. ``say=False`` where the caller says what happened in its own line."""
    run_id = run_dir.name
    if say:
        log.error(f"qeval: {status}: {error}")
    formats = Formats.from_config(cfg)
    try:   # labels as the method would give them, where the bits themselves are valid
        b = Bits.from_config(cfg)
        target, setting = bit_labels(b.w, b.a, b.k, b.v, formats)
    except TypeError:
        target = setting = None
    try:   # the recipe's name where its parts can be built (a refused combination cannot)
        name = build_recipe(cfg, fused_decode=True).name
    except Exception:
        name = cfg.method.name
    row = {"run_id": run_id, "config_hash": run_id, "model": cfg.model.name, "method": name,
           "target": target, "setting": setting,
           "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "kv_bits": cfg.kv_bits,
           **{f"{t}_format": name for t, name in formats.names().items()},
           "kv_semantics": cfg.kv_semantics, "trust_remote_code": cfg.model.get("trust_remote_code", False),
           "task": ",".join(cfg.task), "metric": None, "value": None,
           "status": status, "error": error, "config": OmegaConf.to_container(cfg, resolve=True)}
    result = {"run_id": run_id, "status": status, "error": error, "seconds": 0.0, "rows": [row]}
    results.write_run(run_dir, result, [row], OmegaConf.to_yaml(cfg, resolve=True))
    return result | {"run_dir": str(run_dir)}


def _finished(cfg, run_id: str, run_dir: Path, say: bool = True) -> dict | None:
    """The skip result when this cell is finished and its files agree; says why it is not."""
    result, problem = results.read_finished(run_dir)
    if problem and say:
        log.warning(f"qeval: {run_id}: {problem}; recomputing")
    if problem or result is None or result.get("status") != "ok":   # failed, interrupted: computed again
        return None
    then, now = result.get("git_commit"), results.git_commit()
    if then != now:
        if cfg.get("resume", "skip") == "strict":
            if say:
                log.warning(f"qeval: {run_id} was finished by qeval at commit {then}, this is {now}; "
                            f"resume=strict: recomputing")
            return None
        log.warning(f"qeval: {run_id} was finished by qeval at commit {then}, this is {now}; kept "
                    f"(resume=strict recomputes it)")
    log.info(f"qeval: {run_id} already done in {run_dir} (force=true recomputes)")
    return {"status": "skipped", "run_dir": str(run_dir)}


def run(cfg) -> dict:
    """Run every task of one configuration; always writes result.json, ``ok`` or ``failed``, or
    ``interrupted`` when a signal stops it (:class:`Interrupted` is raised on after that row is
    written, its ``run_dir`` set).

    The cell is computed under :func:`qeval.results.cell_lock`: a second process asking for the
    same cell (another sweep on the same results directory) waits and then finds it finished."""
    container = OmegaConf.to_container(cfg, resolve=True)
    run_id = results.config_hash(container)
    run_dir = Path(cfg.results_dir) / "runs" / run_id
    if not cfg.force and (skip := _finished(cfg, run_id, run_dir)):
        return skip
    try:
        if not validated(cfg):   # a single run was validated whole before Hydra started
            validate(cfg)
        invalid = None
    except ConfigError as e:
        if not _in_sweep():
            raise   # before the lock: a single run with bad input leaves no run directory
        # one bad cell of a sweep (say a group size that does not divide one model) must not
        # stop the other cells: record it as a failed row like any other failure
        invalid = f"ConfigError: {e}"
    with results.cell_lock(run_dir):
        # finished while this process validated or waited for the lock: do not compute it twice
        if not cfg.force and (skip := _finished(cfg, run_id, run_dir, say=False)):
            return skip
        try:
            return record_failure(cfg, run_dir, invalid) if invalid else _compute(cfg, run_id, run_dir)
        except Interrupted as e:
            try:
                record_failure(cfg, run_dir, f"interrupted: {e}", status="interrupted", say=False)
                e.run_dir = str(run_dir)
            except OSError as full:   # a full disk: the cell stays unfinished, which a rerun redoes too
                log.error(f"qeval: {run_id}: its interrupted row could not be written ({full}); "
                          f"the cell is unfinished and a rerun computes it")
            raise


def _compute(cfg, run_id: str, run_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    try:
        method = build_recipe(cfg)
    except Exception as e:  # validated, so unexpected: still a failed row, never a lost cell
        log.exception("qeval: building the recipe failed")
        return record_failure(cfg, run_dir, f"{type(e).__name__}: {e}")
    rows, status, error, raised = [], "ok", None, None
    device = loading.resolve_device(cfg.device)
    start = time.perf_counter()
    try:
        handle, facts = prepare(cfg)
        handle.run_dir = run_dir
        base = base_row(cfg, method, run_id) | facts | {"device": results.device_name(handle.device)}
        for name, task_cfg in cfg.task.items():
            handle.stats.__init__()
            t0 = time.perf_counter()
            with PeakMemory(handle.device) as memory:
                task_rows = TASKS[name](handle, task_cfg)
            seconds = time.perf_counter() - t0
            peak, peak_kind = memory.bytes, memory.kind
            s = handle.stats
            for r in task_rows:
                rows.append(base | {"task": name, "split": task_cfg.get("split", "test")} | r | {
                    "seconds": seconds, "prompt_tokens": s.prompt_tokens,
                    "generated_tokens": s.generated_tokens,
                    "tokens_per_s": (s.prompt_tokens + s.generated_tokens) / seconds if seconds else None,
                    "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
                    "kv_bytes_held": s.kv_bytes_held, "kv_bytes_packed": s.kv_bytes_packed,
                    "status": "ok"})
    except Exception as e:  # a failing cell is recorded as a row, never lost
        status, error = "failed", f"{type(e).__name__}: {e}"
        if isinstance(e, ConfigError) and not _in_sweep():
            raised = e  # found only once the model is loaded (e.g. its attention code)
        elif isinstance(e, results.DiskFull):
            raised = e  # said in one line by whoever called the run, not as a traceback
        else:
            log.exception(f"qeval: {run_id} failed")
        rows.append(base_row(cfg, method, run_id) | {"device": str(device), "task": ",".join(cfg.task),
                                                      "metric": None, "value": None, "status": "failed",
                                                      "error": error})
    result = {"run_id": run_id, "status": status, "error": error,
              "seconds": time.perf_counter() - start, "rows": rows}
    try:
        results.write_run(run_dir, result, rows, OmegaConf.to_yaml(cfg, resolve=True))
    except results.DiskFull as e:
        raise _unsaved(cfg, run_dir, e, len(rows)) from None
    if isinstance(raised, results.DiskFull):
        raised.note = f": {run_id} stopped; a failed row records it (free space and run it again)"
    if raised is not None:
        raise raised
    return result | {"run_dir": str(run_dir)}


def _unsaved(cfg, run_dir: Path, full: results.DiskFull, n_rows: int) -> results.DiskFull:
    """The disk filled while the cell's rows were written: a failed row is much smaller, so it
    may still fit; ``full`` comes back saying what was kept."""
    try:
        record_failure(cfg, run_dir, f"DiskFull: {full}", say=False)
        kept = "a failed row records the cell"
    except OSError:
        kept = "nothing was recorded"
    full.note = f": the cell's {n_rows} rows were not saved; {kept} (free space and run it again)"
    return full
