"""Print a pip constraints file pinning every direct dependency of qeval (and its test extras) at
the floor pyproject.toml declares (``name>=X`` -> ``name==X``), for ``scripts/versions.sh floor``."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

# name[extras] specifiers ; marker  (only what pyproject.toml writes: >=, <, ==, !=)
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")


def floors(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for spec in project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]:
        name, specifiers, marker = REQUIREMENT.match(spec.split("#")[0]).groups()
        low = [v.strip() for op, v in re.findall(r"(>=|<=|==|!=|<|>)\s*([^,\s]+)", specifiers) if op == ">="]
        if low:
            lines.append(f"{name}=={low[0]}" + (f"; {marker}" if marker else ""))
    return lines


if __name__ == "__main__":
    print("# floors of pyproject.toml's direct dependencies, pinned (scripts/floor_constraints.py)")
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml")))
