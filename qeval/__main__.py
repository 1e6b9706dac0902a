"""``python -m qeval [overrides]``: the Hydra entry point and nothing else."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qeval.errors import ConfigError
from qeval.report.console import print_rows
from qeval.run import run
from qeval.validate import CONFIG_DIR, check_composes, check_overrides


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    """One cell. Returns what it did (``ok``/``skipped``/``failed``, the run directory, the
    error), which the sweep callback records; in a sweep it never raises, so the sweep goes on."""
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not sweeping:
            raise
        # run() writes a failed row for every failure it can see; this is one it could not
        # (say an unwritable results directory): the cell's marker still records it
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": None}
    said = {"status": result["status"], "error": result.get("error"), "run_dir": result["run_dir"]}
    if result["status"] == "skipped":
        return said
    print_rows(result["rows"])
    print(f"qeval: {result['status']}: {result['run_dir']}")
    if result["status"] == "failed" and not sweeping:
        sys.exit(1)
    return said


def entry() -> None:
    args = sys.argv[1:]
    if not args:  # no arguments: the demo (configs/experiment/demo.yaml)
        args = ["experiment=demo"]
    keys = {a.lstrip("+~").partition("=")[0] for a in args if "=" in a and not a.startswith("-")}
    if "results_dir" not in keys:
        # an absolute path, fixed where the command is typed: launcher jobs may start elsewhere.
        # Put first, so flags such as --cfg job or --help keep their own arguments.
        args.insert(0, f"results_dir={Path.cwd() / 'results'}")
    path = next((a.partition("=")[2] for a in args if a.lstrip("+").startswith("model.path=")), None)
    if path and "model.name" not in keys:
        # a user's model is named after its folder (or hub id), never after the default model
        args.insert(0, f"model.name={Path(path.rstrip('/')).name or path}")
    sys.argv[1:] = args
    try:
        check_overrides(args)
        if not any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in args):
            check_composes(args)
    except ConfigError as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
