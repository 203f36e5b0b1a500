"""Fallback when ``pip install`` of the checkout fails on the device: write only the
``mii_serve-<version>.dist-info`` (METADATA + entry_points.txt, from pyproject.toml) into
a site dir, so that stevedore finds mii's engines, schedulers and transports while the
code itself is imported from the repo on PYTHONPATH.

    python3 bench/gpu/write_dist_info.py REPO SITE_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore


def main(repo: str, site: str) -> int:
    project = tomllib.loads((Path(repo) / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    target = Path(site) / f"{name.replace('-', '_')}-{version}.dist-info"
    target.mkdir(parents=True, exist_ok=True)
    (target / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    if project.get("scripts"):
        lines.append("[console_scripts]")
        lines += [f"{key} = {value}" for key, value in project["scripts"].items()]
    (target / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (target / "INSTALLER").write_text("bench/gpu/write_dist_info.py\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
