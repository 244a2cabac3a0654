"""One model's tokenizer, loaded once: text and chat to ids, ids to text, and the facts other services need.

The EOS ids and the context length come from the checkpoint's config.json and generation_config.json, not from
the tokenizer alone: chat models often stop on a turn-end token that only generation_config lists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from splitserve.sampling_params import InvalidRequestError
from splitserve.stop_tokens import eos_token_ids
from splitserve.token_bytes import TokenPieces

log = logging.getLogger(__name__)

# OpenAI's chat roles; a template may accept fewer, and then says so itself.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# Config keys that name the context window, across architectures (Llama/Mistral/Qwen, GPT-2, others).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")

# Tokenizers without a real limit report this sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 10**9


class TokenizerLoadError(RuntimeError):
    """The model's tokenizer could not be loaded; the service cannot start."""


class ChatTemplateMissingError(RuntimeError):
    """Chat input for a model whose tokenizer has no chat template (a base model): the request cannot succeed
    on this deployment whatever its content."""


@dataclass(frozen=True)
class TokenizerInfo:
    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: Optional[int]
    max_context_length: int
    has_chat_template: bool


class TokenizerModel:
    def __init__(self, model: str, tokenizer, config: dict[str, Any], generation_config: dict[str, Any]):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._token_pieces = TokenPieces(tokenizer)
        self.info = TokenizerInfo(
            model=model,
            vocab_size=self.vocab_size,
            eos_token_ids=eos_token_ids(tokenizer, config, generation_config),
            bos_token_id=tokenizer.bos_token_id,
            max_context_length=_max_context_length(model, tokenizer, config),
            has_chat_template=bool(tokenizer.chat_template),
        )

    @classmethod
    def load(cls, model: str) -> "TokenizerModel":
        """`model` is a checkpoint folder or a Hugging Face hub id."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as exc:  # hub, file and format errors come in many classes; all mean "cannot start"
            raise TokenizerLoadError(f"cannot load a tokenizer for {model!r}: {exc}") from exc
        return cls(model, tokenizer, _read_json(model, "config.json"),
                   _read_json(model, "generation_config.json"))

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                    tools: Optional[list[dict[str, Any]]] = None) -> tuple[list[int], str]:
        """Renders the messages (and the tools the model may call, for templates that show them) with the model's
        chat template; returns (ids, rendered prompt)."""
        if not self.info.has_chat_template:
            raise ChatTemplateMissingError(
                f"model {self.info.model!r} has no chat template (a base model?); send a text prompt instead")
        _check_messages(messages)
        from jinja2 import TemplateError

        try:
            rendered = self.tokenizer.apply_chat_template(
                list(messages), tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:  # templates reject e.g. non-alternating roles with raise_exception()
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}",
                                      param="messages") from exc
        # The template already placed BOS and turn markers; adding special tokens again would double BOS.
        return self.tokenizer.encode(rendered, add_special_tokens=False), rendered

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
        self.check_ids(token_ids, param="token_ids")
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_pieces(self, token_ids: Sequence[int]) -> list[tuple[str, bytes]]:
        """(text, bytes) of each id on its own: the text as users see it, the bytes the token really holds."""
        self.check_ids(token_ids, param="token_ids")
        return [self._token_pieces(t) for t in token_ids]

    def check_ids(self, token_ids: Iterable[int], param: str) -> None:
        """Decoders silently drop unknown ids; a caller sending one has a bug it should hear about."""
        for position, token_id in enumerate(token_ids):
            if token_id >= self.vocab_size:
                raise InvalidRequestError(
                    f"{param}[{position}] = {token_id} is outside the vocabulary (ids 0..{self.vocab_size - 1})",
                    param=param)


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise InvalidRequestError("messages is empty: a chat needs at least one message", param="messages")
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}",
                param="messages")


def _max_context_length(model: str, tokenizer, config: dict[str, Any]) -> int:
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _NO_LIMIT:
        log.warning("%s: no context length in config.json; using the tokenizer's model_max_length %d", model, limit)
        return limit
    log.warning("%s: context length unknown (no config.json entry, no tokenizer limit); reporting 0", model)
    return 0


def _read_json(model: str, filename: str) -> dict[str, Any]:
    """A checkpoint file from the folder or the hub; {} when the checkpoint has none."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / filename
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(model, filename)).read_text())
    except EntryNotFoundError:
        return {}
    except Exception as exc:  # offline with an incomplete cache: the tokenizer works, the extras are unknown
        log.warning("%s: cannot read %s (%s); EOS ids and context length come from the tokenizer alone",
                    model, filename, exc)
        return {}
