"""What can go wrong when starting the local stack, as typed errors the command turns into one clear message."""

from __future__ import annotations


class LauncherError(Exception):
    """Base of the launcher's errors; `splitserve up` prints the message and exits non-zero."""


class ToolNotInstalled(LauncherError):
    """A binary the stack runs (redis-server, envoy) is not on this machine."""


class PortInUse(LauncherError):
    """A public port the user asked for is already taken."""


class StackStartError(LauncherError):
    """A child process died, or did not become ready in time, while the stack was starting."""
