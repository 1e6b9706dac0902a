"""``python -m qeval [overrides]``: the Hydra entry point and nothing else.

Nothing heavy is imported until a run is certain: ``--help``, ``--version``, ``--cfg``, ``--info``
and every refused override answer without torch, transformers or lm-eval (a test reads
``python -X importtime``). A single run is validated whole (method, model architecture, tasks)
before Hydra starts, so a refused run leaves no run folder behind.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qeval import CONFIG_DIR
from qeval.errors import ConfigError

log = logging.getLogger("qeval")

# Hydra's flags that take a value (``--cfg job``); ``--info`` takes one optionally
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}
INFO_FLAGS = {"--info", "-i"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# flags after which Hydra composes nothing (help) or runs nothing (--cfg)
HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
SHOW_FLAGS = {"--cfg", "-c"}
# libraries whose versions change qeval's numbers (or what it can run)
VERSIONED = ("torch", "transformers", "triton", "lm-eval", "datasets", "accelerate", "hydra-core",
             "hydra-submitit-launcher", "numpy")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    """One cell. Returns what it did (``ok``/``skipped``/``failed``/``interrupted``, the run
    directory, the error), which the sweep callback records; in a sweep it never raises, so the
    sweep goes on (or, stopped by a signal, summarises and ends). A single run ends with one line
    on stderr, not a traceback, for bad input (exit 2), a full disk (exit 1) and SIGINT or SIGTERM
    (130 or 143, its cell recorded as ``interrupted``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qeval import results
    from qeval.report.console import rows_table
    from qeval.run import run
    from qeval.sweep import signals

    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    signals.noting()   # a signal after the run (or before it) is noted, never a traceback
    try:
        with signals.raising():
            result = run(cfg)
    except signals.Interrupted as e:
        where = (f"{e.run_dir} records the cell as interrupted; running it again computes it" if e.run_dir
                 else "the cell was not computed and nothing was recorded")
        if sweeping:
            log.info(f"qeval: interrupted by {e}: {where}")
            return {"status": "interrupted", "error": f"interrupted: {e}", "run_dir": e.run_dir}
        log.error(f"qeval: interrupted by {e}: {where}")
        sys.exit(signals.exit_status(e.signum))
    except ConfigError as e:
        log.error(f"qeval: error: {e}")
        sys.exit(2)
    except Exception as e:
        if results.disk_full(e):
            logging.raiseExceptions = False   # the job's log file is on that disk too: no traceback for it
            log.error(f"qeval: error: {e}")
            if not sweeping:
                sys.exit(1)
            return {"status": "failed", "error": f"DiskFull: {e}", "run_dir": None}
        if not sweeping:
            raise
        # run() writes a failed row for every failure it can see; this is one it could not
        # (say an unwritable results directory): the cell's marker still records it
        log.exception(f"qeval: cell failed outside its run: {type(e).__name__}: {e}")
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": None}
    said = {"status": result["status"], "error": result.get("error"), "run_dir": result["run_dir"]}
    if result["status"] == "skipped":
        return said
    if table := rows_table(result["rows"]):
        log.info(table)
    log.info(f"qeval: {result['status']}: {result['run_dir']}")
    if result["status"] == "failed" and not sweeping:
        sys.exit(1)
    return said


def versions() -> str:
    """qeval's version and those of the libraries that change its numbers, read from package
    metadata (nothing is imported)."""
    from importlib import metadata

    from qeval import __version__

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    libs = ", ".join(f"{name} {version(name)}" for name in VERSIONED)
    return f"qeval {__version__} (python {sys.version.split()[0]}; {libs})"


def split_argv(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides), wherever each was typed: Hydra's parser takes
    its overrides as one run of positionals, so ``-m`` or ``--cfg job`` between two overrides
    would end it (``unrecognized arguments``)."""
    flags, overrides = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and "=" not in a:
            flags.append(a)
            if a in VALUE_FLAGS and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
            elif a in INFO_FLAGS and i + 1 < len(args) and args[i + 1] in INFO_TOPICS:
                flags.append(args[i + 1])
                i += 1
        elif a.startswith("-"):        # --cfg=job and the like
            flags.append(a)
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def with_defaults(overrides: list[str]) -> list[str]:
    """The overrides qeval adds: an absolute ``results_dir`` (launcher jobs may start elsewhere)
    and a user's model named after its folder or hub id, never after the default model."""
    from qeval.overrides import model_path_given

    keys = {a.lstrip("+~").partition("=")[0] for a in overrides}
    added = []
    if "results_dir" not in keys:
        added.append(f"results_dir={Path.cwd() / 'results'}")
    path = model_path_given(overrides)
    if path and "model.name" not in keys:
        name = Path(path.rstrip("/")).name or path
        # quoted for Hydra's grammar, so a folder named like a list or a sweep stays one string
        added.append("model.name='" + name.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return overrides + added


def check(flags: list[str], overrides: list[str]) -> None:
    """Everything that can refuse the command before Hydra starts: the overrides against the
    config tree (light), the launcher, and for a single run the whole config against its method,
    model architecture and tasks (this imports torch, once the light checks have passed)."""
    from qeval.overrides import check_composes, check_launcher, check_overrides, single_run_config

    given = {f.partition("=")[0] for f in flags}
    check_overrides(overrides)
    if given & HELP_FLAGS:
        return
    check_composes(flags + overrides)
    if given & SHOW_FLAGS:
        return
    check_launcher(flags, overrides)
    cfg = single_run_config(flags, overrides)
    if cfg is not None:
        from qeval.validate import validate
        validate(cfg)


def for_showing(flags: list[str], overrides: list[str]) -> tuple[list[str], list[str]] | None:
    """``--help``/``--info`` on a sweep line: Hydra allows neither beside ``-m`` nor a sweep
    value, so they see the line without its sweep (the same groups and keys). ``--cfg`` on a sweep
    returns None: :func:`show_cells` prints every cell's config instead."""
    from qeval.overrides import fixed_overrides, is_sweep

    given = {f.partition("=")[0] for f in flags}
    if not given & (HELP_FLAGS | SHOW_FLAGS) or not is_sweep(flags, overrides):
        return flags, overrides
    if given & SHOW_FLAGS and not given & HELP_FLAGS:
        return None
    return [f for f in flags if f not in ("-m", "--multirun")], fixed_overrides(overrides)


def show_cells(flags: list[str], overrides: list[str]) -> None:
    """``--cfg job|hydra|all`` on a sweep: each cell's composed config, headed by its overrides."""
    from omegaconf import OmegaConf

    from qeval.overrides import cell_configs

    part = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in SHOW_FLAGS), None)
    part = part or next((f.partition("=")[2] for f in flags if f.partition("=")[0] in SHOW_FLAGS), "job")
    resolve = "--resolve" in flags
    for i, (cell, cfg) in enumerate(cell_configs(overrides, with_hydra=part != "job")):
        shown = cfg.hydra if part == "hydra" else cfg
        print(f"# cell {i}: {' '.join(cell)}\n{OmegaConf.to_yaml(shown, resolve=resolve)}")


def entry() -> None:
    args = sys.argv[1:]
    if any(a in ("--version", "-V") for a in args):
        print(versions())
        return
    if not args:  # no arguments: the demo (qeval/configs/experiment/demo.yaml)
        args = ["experiment=demo"]
    from qeval.sweep import signals

    flags, overrides = split_argv(args)
    overrides = with_defaults(overrides)
    try:
        # validation imports torch and may read a tokenizer: seconds in which a Ctrl-C or a
        # SIGTERM ends the command with one line, not a traceback (nothing is written yet)
        with signals.raising():
            check(flags, overrides)
            shown = for_showing(flags, overrides)
            if shown is None:
                show_cells(flags, overrides)
                return
    except ConfigError as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        sys.exit(2)
    except signals.Interrupted as e:
        print(f"qeval: interrupted by {e} before the run started; nothing was written", file=sys.stderr)
        sys.exit(signals.exit_status(e.signum))
    sys.argv[1:] = shown[0] + shown[1]
    main()


if __name__ == "__main__":
    entry()
