"""A dotted import path is a file path: readers and static tools (IDEs, pyright, dependency graphers) find a
module from its name. The rule: `splitserve.services.<rest>` lives in `services/<rest>`, every other
`splitserve.<rest>` in `shared/splitserve/<rest>`."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import splitserve

REPO = Path(__file__).resolve().parents[1]


def expected_path(dotted: str, is_package: bool) -> Path:
    parts = dotted.split(".")
    if parts[:2] == ["splitserve", "services"]:
        base = REPO / "services" / Path(*parts[2:]) if len(parts) > 2 else REPO / "services"
    else:
        base = REPO / "shared" / Path(*parts)
    return base / "__init__.py" if is_package else base.with_suffix(".py")


def _all_modules() -> list[tuple[str, bool]]:
    """Every module of the installed tree (an editable install maps splitserve.services in separately, so the
    walk starts at both roots)."""
    import splitserve.services

    found = {"splitserve": True, "splitserve.services": True}
    for package in (splitserve, splitserve.services):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            found[info.name] = info.ispkg
    return sorted(found.items())


def test_every_module_lives_where_its_name_says():
    modules = _all_modules()
    names = {name for name, _ in modules}
    # The walk must see the whole tree: the services, the generated stubs and the engine.
    assert {"splitserve.services.kv_store.server", "splitserve.v1.decode_pb2", "splitserve.engine.scheduler"} <= names
    wrong = []
    for name, is_package in modules:
        module = importlib.import_module(name)
        if Path(module.__file__).resolve() != expected_path(name, is_package):
            wrong.append(f"{name}: {module.__file__}")
    assert not wrong, "modules whose file is not where their dotted path says:\n" + "\n".join(wrong)


def test_no_folder_of_python_code_is_outside_the_rule():
    """Every package folder under shared/ and services/ is importable under its own path name."""
    for root in (REPO / "shared", REPO / "services"):
        for init in root.rglob("__init__.py"):
            assert "-" not in init.parent.name, f"{init.parent} cannot be imported under its folder name"


def test_every_package_is_installed_by_pyproject():
    """An editable install finds any folder; a wheel (the containers) ships only the packages listed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, is_package in _all_modules() if is_package}
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
