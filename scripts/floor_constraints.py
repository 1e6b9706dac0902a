"""Print a pip constraints file pinning every direct dependency of qeval (and its test extras) at
the floor pyproject.toml declares (``name>=X`` -> ``name==X``), for ``scripts/versions.sh floor``."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement


def floors(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for spec in project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]:
        req = Requirement(spec.split("#")[0].strip())
        low = [s.version for s in req.specifier if s.operator == ">="]
        if not low:
            continue
        marker = f"; {req.marker}" if req.marker else ""
        lines.append(f"{req.name}=={low[0]}{marker}")
    return lines


if __name__ == "__main__":
    print("# floors of pyproject.toml's direct dependencies, pinned (scripts/floor_constraints.py)")
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml")))
