"""`setting(default, help)`: one settings field, its default and the help its flag shows.

The services', the engine's and the launcher's settings dataclasses declare every field this way; parse_settings
(splitserve.serving.settings) turns them into flags and `SPLITSERVE_*` environment variables.
"""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any


def setting(default: Any, help: str) -> Any:
    """A dataclass field; a list default is copied for each instance, as dataclasses require."""
    if isinstance(default, list):
        return field(default_factory=lambda: copy.copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
