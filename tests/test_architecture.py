"""The package's layers import only downwards (import-linter contract in pyproject.toml), every
module sits in a layer, and the contract really catches an upward import (shown on a fixture)."""
import textwrap
import tomllib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_imports_only_downwards():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_every_module_is_in_a_layer():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {m.strip() for layer in cfg["layers"] for m in layer.split("|")}
    modules = {p.stem if p.name != "__init__.py" else p.parent.name
               for p in (ROOT / "harness").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert modules <= layered, f"place these modules in a layer of pyproject.toml: {sorted(modules - layered)}"


@pytest.mark.parametrize("upward", [False, True])
def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch, upward):
    pkg = tmp_path / "fixpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from fixpkg import bottom\n")
    # a function-level import counts as much as one at the top of the file
    (pkg / "bottom.py").write_text("def f():\n    from fixpkg import top\n" if upward else "X = 1\n")
    (tmp_path / "contract.toml").write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "fixpkg"
        [[tool.importlinter.contracts]]
        name = "fixpkg layers"
        type = "layers"
        containers = ["fixpkg"]
        layers = ["top", "bottom"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lint_imports(config_filename=str(tmp_path / "contract.toml"), no_cache=True) == (1 if upward else 0)
