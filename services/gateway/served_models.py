"""The names clients use for the model: what `model` may say in a request and what /v1/models lists.

The tokenizer reports the model as it was given to the services (`--model`): a hub id, or a checkpoint folder's
path, which for the demo model is a cache path no client should have to type. So, as vLLM's
`--served-model-name`, the names are configurable (several allowed, the first is the one responses carry) and
default to the hub id or, for a folder, the folder's name.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Optional, Sequence

from splitserve.services.gateway.errors import ModelNotFoundError


def default_name(model: str) -> str:
    """A hub id as it is ("org/name"); a folder's path as the folder's name."""
    stripped = model.rstrip("/\\") or model
    looks_like_path = (stripped.startswith(("/", ".", "~")) or stripped.count("/") > 1 or "\\" in stripped
                       or os.path.isdir(stripped))
    return PurePath(stripped).name or stripped if looks_like_path else stripped


class ServedModels:
    def __init__(self, names: Sequence[str] = ()):
        self._configured = [n for n in names if n]

    def names(self, tokenizer_model: str) -> list[str]:
        """Every name the model answers to; the first is the one responses carry."""
        return list(self._configured) or [default_name(tokenizer_model)]

    def resolve(self, requested: Optional[str], tokenizer_model: str) -> str:
        """The name a response carries for a request that asked for `requested` (None or "": the first);
        ModelNotFoundError when it is not one of the names."""
        names = self.names(tokenizer_model)
        if not requested:
            return names[0]
        if requested not in names:
            raise ModelNotFoundError(requested, ", ".join(names))
        return requested
