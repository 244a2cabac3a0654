"""Who may import whom, read from the source (every import statement, function-level ones included): the engine
talks to KV movement only through its port (engine/kv_connector.py), and what a block is (kv_blocks) stays
torch-free so the kv-store and the gateway can share it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "splitserve"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(paths, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(name for name in imports(path) if any(name == f or name.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(SHARED))] = bad
    return found


def test_the_engine_imports_no_transport_and_no_service_code():
    engine = sorted((SHARED / "engine").glob("*.py")) + [SHARED / "llm.py", SHARED / "config.py"]
    assert len(engine) > 10
    assert offending(engine, ("splitserve.kv_transfer", "splitserve.serving", "splitserve.services",
                              "splitserve.v1", "grpc", "ucxx", "libucx")) == {}


def test_transports_reach_the_engine_only_through_its_port():
    transports = sorted((SHARED / "kv_transfer").glob("*.py"))
    used = {name for path in transports for name in imports(path) if name.startswith("splitserve.engine")}
    assert used <= {"splitserve.engine.kv_connector", "splitserve.engine.kv_connector.KVLoadError"}, used


@pytest.mark.parametrize("part", ["kv_blocks", "config.py", "kv_transfer/__init__.py", "proto_convert.py"])
def test_what_the_kv_store_and_the_launcher_share_is_torch_free(part):
    target = SHARED / part
    paths = sorted(target.glob("*.py")) if target.is_dir() else [target]
    assert offending(paths, ("torch", "splitserve.engine")) == {}
