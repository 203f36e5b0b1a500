"""The documentation stays true to the code: generated pages are current, examples compile,
links resolve, and the example plugins declare entry points that exist."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
PLUGIN_EXAMPLES = sorted(p.parent for p in (EXAMPLES / "plugins").glob("*/pyproject.toml"))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current(tmp_path):
    generated = tmp_path / "configuration.md"
    assert _generator().main(["--output", str(generated)]) == 0
    assert generated.read_text() == (DOCS / "configuration.md").read_text(), (
        "docs/configuration.md is stale; run: .venv/bin/python docs/gen_config_reference.py")


def test_configuration_reference_covers_every_field():
    from mii_core.config.models import (
        GenerateParamsConfig,
        MIIConfig,
        ModelConfig,
        ReplicaConfig,
    )

    text = (DOCS / "configuration.md").read_text()
    for model in (ModelConfig, MIIConfig, GenerateParamsConfig, ReplicaConfig):
        assert f"## {model.__name__}" in text
        for name, info in model.model_fields.items():
            assert f"| `{info.alias or name}`" in text, f"{model.__name__}.{name}"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_example_compiles(path):
    compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("package", PLUGIN_EXAMPLES, ids=lambda p: p.name)
def test_example_plugin_entry_points_exist(package):
    """Every entry point names a module of the package and, for drivers, a class defined in it."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    groups = project["entry-points"]
    assert set(groups) <= {"mii.engines", "mii.schedulers", "mii.transports", "mii.plugins"}
    for group, entries in groups.items():
        for name, target in entries.items():
            module, _, attribute = target.partition(":")
            source = package / f"{module}.py"
            assert source.is_file(), f"{group} {name}: {source} is missing"
            if attribute:
                tree = ast.parse(source.read_text())
                defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
                assert attribute in defined, f"{group} {name}: {attribute} not defined in {source}"


@pytest.mark.parametrize("package", PLUGIN_EXAMPLES, ids=lambda p: p.name)
def test_example_plugin_is_one_small_module(package):
    """A plugin is one module of under 60 lines (see STYLE.md), with a README."""
    modules = list(package.glob("*.py"))
    assert len(modules) == 1 and len(modules[0].read_text().splitlines()) < 60
    assert (package / "README.md").is_file()


def test_relative_links_in_docs_resolve():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"] + sorted(EXAMPLES.rglob("README.md"))
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
