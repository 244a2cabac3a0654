"""The hashes a block pool made findable or dropped, in order, until someone drains them (once per engine step,
or per publish interval in the kv-store). Off until record() is called, so a pool nobody publishes keeps
nothing: the offline engine's pools would otherwise grow a list without end."""

from __future__ import annotations

from typing import Iterable, Optional

from splitserve.kv_blocks.hashing import BlockHash


class ChangeLog:
    def __init__(self) -> None:
        self._changes: Optional[list[tuple[bool, BlockHash]]] = None

    def record(self) -> None:
        if self._changes is None:
            self._changes = []

    def stored(self, hashes: Iterable[BlockHash]) -> None:
        if self._changes is not None:
            self._changes.extend((True, h) for h in hashes)

    def removed(self, hashes: Iterable[BlockHash]) -> None:
        if self._changes is not None:
            self._changes.extend((False, h) for h in hashes)

    def drain(self) -> list[tuple[bool, BlockHash]]:
        """(stored?, hash) since the last drain, oldest first."""
        if not self._changes:
            return []
        changes, self._changes = self._changes, []
        return changes
