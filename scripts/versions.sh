#!/usr/bin/env bash
# The library versions qeval is tested against, kept true in three ways. Each builds a fresh
# virtual environment outside the checkout, installs qeval with its test extras into it, and runs
# the README's test command there.
#
#   bash scripts/versions.sh lock     CI's environment, re-resolved: the CPU build of torch that CI
#                                     installs (TORCH, default 2.13.0) and the newest release of
#                                     everything else; if the suite passes, .ci/constraints.txt is
#                                     rewritten from it (the lock .ci/run installs from, so that an
#                                     upstream release cannot turn main red between two commits)
#   bash scripts/versions.sh newest   what `pip install -e ".[test]"` gives a new user today: the
#                                     newest release of every dependency, torch included (a CUDA
#                                     build from PyPI, several GB); nothing is written
#   bash scripts/versions.sh floor    the oldest versions pyproject.toml declares: every `>=`
#                                     floor of a direct dependency pinned with `==`
#                                     (.ci/floor-constraints.txt is generated from it); nothing else
#
# Extra arguments go to pytest (e.g. `bash scripts/versions.sh newest -x tests/test_cli.py`).
# Each run prints the versions it tested and leaves its environment in $QEVAL_VERSIONS_DIR
# (default /tmp/qeval-versions/<mode>) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bash scripts/versions.sh lock|newest|floor [pytest arguments]}
shift
root=$(pwd)
venv=${QEVAL_VERSIONS_DIR:-/tmp/qeval-versions/$mode}
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install --quiet --upgrade pip
case "$mode" in
  lock)
    pip install --quiet "torch==${TORCH:-2.13.0}"
    pip install --quiet --upgrade -e ".[test]" ;;
  newest)
    # a machine-wide pip constraint (a cap on torch) would hide the newest release
    PIP_CONFIG_FILE=/dev/null pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" ;;
  floor)
    python scripts/floor_constraints.py > .ci/floor-constraints.txt
    PIP_CONSTRAINT="$root/.ci/floor-constraints.txt" PIP_CONFIG_FILE=/dev/null pip install --quiet -e ".[test]" ;;
  *) echo "usage: bash scripts/versions.sh lock|newest|floor [pytest arguments]" >&2; exit 2 ;;
esac
python -m qeval --version
python -m pytest "$@"
if [ "$mode" = lock ]; then
  { echo "# CI's lock: written by 'bash scripts/versions.sh lock' after the suite passed with exactly these"
    echo "# versions ($(date -u +%Y-%m-%d), python $(python -c 'import platform; print(platform.python_version())'))."
    echo "# .ci/run installs with PIP_CONSTRAINT pointing here; the CPU build of torch is what CI installs."
    pip freeze --exclude-editable | grep -v -i '^qeval' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
  } > .ci/constraints.txt
  echo "versions.sh: .ci/constraints.txt rewritten"
fi
