"""`splitserve tokenizer`: the process that owns the model's tokenizer and chat template.

The tokenizer is loaded before the port opens, so health turns SERVING only once every call can be answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from splitserve.setting import setting
from splitserve.v1 import tokenizer_pb2_grpc
from splitserve.serving import tracing
from splitserve.serving.grpc_service import GrpcService
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.services.tokenizer.servicer import TokenizerServicer
from splitserve.services.tokenizer.tokenizer_model import TokenizerLoadError, TokenizerModel

log = logging.getLogger(__name__)

SERVICE_NAME = "splitserve.v1.Tokenizer"


@dataclass
class TokenizerSettings:
    """Serves tokenize/detokenize/chat templates for one model over gRPC."""

    model: Optional[str] = setting(None,
        "hub id or checkpoint folder whose tokenizer to serve (default: the tiny offline demo model)")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50051, "gRPC port (0: any free port)")
    metrics_port: Optional[int] = setting(None, "Prometheus /metrics port (unset: none)")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    grace_s: float = setting(30.0, "seconds in-flight calls get to finish on SIGTERM")
    otlp_traces_endpoint: Optional[str] = tracing.endpoint_field()


async def serve(settings: TokenizerSettings, model: TokenizerModel) -> None:
    servicer = TokenizerServicer(model)
    service = GrpcService("tokenizer", settings.host, settings.port, settings.metrics_port, [SERVICE_NAME],
                          grace_s=settings.grace_s)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, service.server)
    await service.run(drain=servicer.wait_idle)


def _without_torch() -> None:
    """Tokenizing needs no torch, but transformers imports it whenever it is installed: 318 MiB RSS per replica
    with it, 70 MiB without (demo model). A None entry in sys.modules makes the import fail, so transformers
    runs tokenizer-only. Not when torch is already loaded (building the demo model needs it)."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
        # Else transformers warns at import that PyTorch was not found, which here is the intent.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    settings = parse_settings(TokenizerSettings, argv, prog="splitserve tokenizer")
    setup_logging("tokenizer", settings.log_level)
    log_settings("tokenizer", settings)
    tracing.setup_service("tokenizer", settings)
    model_name = settings.model
    if model_name is None:
        from splitserve.demo_model import demo_checkpoint

        model_name = str(demo_checkpoint())
        log.info("no --model given: serving the tokenizer of the offline demo model at %s", model_name)
    _without_torch()
    try:
        model = TokenizerModel.load(model_name)
    except TokenizerLoadError as exc:
        log.error("%s", exc)
        return 1
    info = model.info
    log.info("tokenizer of %s: vocab %d, eos %s, context %d, chat template: %s", info.model, info.vocab_size,
             list(info.eos_token_ids), info.max_context_length, "yes" if info.has_chat_template else "no")
    asyncio.run(serve(settings, model))
    return 0
