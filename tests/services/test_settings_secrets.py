"""Settings are logged at start with their secrets masked: API keys, cluster tokens, passwords in Redis URLs."""

import logging
from dataclasses import dataclass
from typing import Optional

from splitserve.serving.settings import log_settings, parse_settings, redact_url


@dataclass
class _Settings:
    redis_url: Optional[str] = None
    cluster_token: Optional[str] = None
    api_key: Optional[str] = None
    model: str = "m"
    max_num_batched_tokens: int = 2048


def test_secrets_are_masked_in_the_logged_settings(caplog, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_REDIS_URL", "redis://splitserve:hunter2@10.0.0.1:6379/0")
    monkeypatch.setenv("SPLITSERVE_CLUSTER_TOKEN", "t0ken")
    settings = parse_settings(_Settings, ["--api-key", "k3y"])
    assert settings.redis_url.endswith("hunter2@10.0.0.1:6379/0") and settings.cluster_token == "t0ken"
    with caplog.at_level(logging.INFO):
        log_settings("test", settings)
    logged = caplog.text
    assert "redis://splitserve:***@10.0.0.1:6379/0" in logged
    assert not any(secret in logged for secret in ("hunter2", "t0ken", "k3y"))
    assert "'model': 'm'" in logged and "'max_num_batched_tokens': 2048" in logged


def test_redact_url_leaves_urls_without_a_password_alone():
    assert redact_url("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    assert redact_url("redis://:pw@h:1") == "redis://:***@h:1"
