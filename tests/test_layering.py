"""The package's structure: imports point one way, model files stay pure torch/transformers (they ship
as remote code), every package is in the wheel, and the README's layout matches the tree."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "histomim"
REPO_ROOT = PACKAGE.parent
# what a file saved next to a model may import: it runs where only torch and transformers exist
REMOTE_CODE_ALLOWED = {"torch", "transformers", "safetensors", "numpy"} | set(sys.stdlib_module_names)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file; level 0 is absolute, 1 is ``from .x``, 2 ``from ..x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def histomim_modules_imported(path: Path) -> set[str]:
    """The histomim subpackages/modules a file imports, as names under histomim (e.g. 'training')."""
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    names = set()
    for level, module in imports_of(path):
        if level == 0:
            if module.split(".")[0] == "histomim":
                names.add(module.split(".")[1] if "." in module else "")
            continue
        base = list(package_parts[: len(package_parts) - (level - 1)])
        target = base + (module.split(".") if module else [])
        names.add(target[0] if target else "")
    return names


def remote_code_files(folder: str) -> list[Path]:
    """The configuration/modeling files of a model package and the sibling modules they import."""
    todo = sorted((PACKAGE / folder).glob("configuration_*.py")) + sorted((PACKAGE / folder).glob("modeling_*.py"))
    seen: dict[Path, None] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        todo += [path.parent / f"{module}.py" for level, module in imports_of(path) if level == 1 and module]
    return list(seen)


@pytest.mark.parametrize("lower, higher", [("survival", "training"), ("mim", "training"), ("data", "training"),
                                           ("mim", "data"), ("multimodal", "training"), ("data", "survival")])
def test_no_import_from_a_lower_layer_to_a_higher_one(lower, higher):
    offenders = [str(p.relative_to(REPO_ROOT)) for p in (PACKAGE / lower).rglob("*.py")
                 if higher in histomim_modules_imported(p)]  # fmt: skip
    assert not offenders, f"{lower}/ imports {higher}/: {offenders}"


@pytest.mark.parametrize("folder", ["mim", "multimodal"])
def test_model_files_import_only_torch_and_transformers(folder):
    for path in remote_code_files(folder):
        for level, module in imports_of(path):
            if level == 0:
                assert module.split(".")[0] in REMOTE_CODE_ALLOWED, f"{path.name} imports {module}"
            else:
                assert level == 1, f"{path.name}: `from {'.' * level}{module}` leaves the model folder"


def test_every_package_ships_in_the_wheel():
    on_disk = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert on_disk <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert {"histomim.hub_configs", "histomim.model_cards"} <= listed


def test_readme_layout_names_every_module():
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    entries = [p for p in PACKAGE.iterdir() if (p.is_dir() and (p / "__init__.py").exists())
               or (p.suffix == ".py" and p.name != "__init__.py")]  # fmt: skip
    missing = [p.name for p in entries if f"histomim/{p.name}{'/' if p.is_dir() else ''}" not in layout]
    assert not missing, f"README layout lacks {missing}"
