"""One dataclass per service, filled from flags, then `SPLITSERVE_*` environment variables, then defaults.

Flags win over env so that a container's env can be overridden on its command line. Field metadata `help`
documents each setting; the resolved settings are logged at start so an operator sees what the process runs with.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from typing import Any, Optional, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
ENV_PREFIX = "SPLITSERVE_"

log = logging.getLogger(__name__)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as Optional[int] or list[str]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _convert(raw: str, kind: type, is_list: bool, name: str) -> Any:
    if is_list:
        return [_convert(part.strip(), kind, False, name) for part in raw.split(",") if part.strip()]
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    try:
        return kind(raw)
    except ValueError as exc:
        if kind in (int, float):
            raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from exc
        raise ValueError(f"{name}: {exc}") from exc  # a parsing type (ByteSize) says what it expects itself


def _flag_value(raw: str, kind: type, is_list: bool, name: str) -> Any:
    """argparse shows an ArgumentTypeError's own message; for a ValueError it says only "invalid <lambda> value"."""
    try:
        return _convert(raw, kind, is_list, name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_settings(cls: type[T], argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
                   description: Optional[str] = None) -> T:
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        kind, is_list = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" [env {env_name(f.name)}]"
        if kind is bool and not is_list:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text,
                                type=lambda raw, k=kind, l=is_list, n=f.name: _flag_value(raw, k, l, n))
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is None and env_name(f.name) in os.environ:
            kind, is_list = _base_type(hints[f.name])
            try:
                value = _convert(os.environ[env_name(f.name)], kind, is_list, env_name(f.name))
            except ValueError as exc:
                parser.error(str(exc))
        if value is not None:
            values[f.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


_SECRET_FIELDS = ("key", "token", "password")


def _is_secret(field_name: str) -> bool:
    """api_key, cluster_token, redis_password: a name that ends in a secret's word (max_num_batched_tokens is
    not one)."""
    return field_name.rsplit("_", 1)[-1] in _SECRET_FIELDS


def log_settings(name: str, settings: Any) -> None:
    """Logs the settings with secrets masked: API keys, tokens, and passwords inside URLs."""
    shown = {k: ("***" if v and _is_secret(k) else
                 redact_url(v) if isinstance(v, str) and k.endswith("url") else v)
             for k, v in dataclasses.asdict(settings).items()}
    log.info("%s settings: %s", name, shown)


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***" if parts.username else ":***"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))
