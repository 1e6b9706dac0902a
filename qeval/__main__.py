"""``python -m qeval [overrides]``: the Hydra entry point and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qeval.errors import ConfigError
from qeval.report.console import print_rows
from qeval.run import run
from qeval.validate import CONFIG_DIR, check_overrides


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if result["status"] == "skipped":
        return
    print_rows(result["rows"])
    print(f"qeval: {result['status']}: {result['run_dir']}")
    if result["status"] == "failed" and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(1)


def entry() -> None:
    if len(sys.argv) == 1:  # no arguments: the demo (configs/experiment/demo.yaml)
        sys.argv.append("experiment=demo")
    if not any(a.lstrip("+").startswith("results_dir=") for a in sys.argv[1:]):
        # an absolute path, fixed where the command is typed: launcher jobs may start elsewhere
        sys.argv.append(f"results_dir={Path.cwd() / 'results'}")
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
