"""UCX (ucxx) is a hard dependency on Linux: a broken install must fail the tests that need it, not skip them."""

from __future__ import annotations

import importlib
import sys

import pytest


def require_ucx():
    """The UCX RMA module; skips only where splitserve does not depend on ucxx (off Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("ucxx is a dependency on Linux only", allow_module_level=True)
    return importlib.import_module("splitserve.kv_transfer.ucx_rma")
