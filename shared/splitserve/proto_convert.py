"""Between the engine's Python types and the wire messages, in one place, so every service converts alike.

Proto3 `optional` fields are unset when the sender wants the engine's default; that is the only reading of
"unset" here.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

from splitserve.kv_blocks.layout import KVLayout, UnknownDTypeError
from splitserve.v1 import common_pb2
from splitserve.sampling_params import InvalidRequestError, SamplingParams, StructuredOutput

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}

_OPTIONAL_DEFAULTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "logprobs", "n",
                      "skip_special_tokens", "prompt_logprobs")


def sampling_params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty, n=params.n,
        min_tokens=params.min_tokens, skip_special_tokens=params.skip_special_tokens, logit_bias=params.logit_bias)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    return msg


def sampling_params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (naming the field) for values the engine refuses."""
    values = {name: getattr(msg, name) for name in _OPTIONAL_DEFAULTS if msg.HasField(name)}
    values.update(min_p=msg.min_p, stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids),
                  ignore_eos=msg.ignore_eos, presence_penalty=msg.presence_penalty,
                  frequency_penalty=msg.frequency_penalty, min_tokens=msg.min_tokens,
                  logit_bias={token: round(float(bias), 6) for token, bias in msg.logit_bias.items()},
                  structured_output=structured_output_from_proto(msg.structured_output))
    # float32 on the wire: 0.9 arrives as 0.8999999761581421; round to what a user could have meant.
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if name in values:
            values[name] = round(float(values[name]), 6)
    return SamplingParams(**values)


def structured_output_to_proto(spec: StructuredOutput) -> common_pb2.StructuredOutput:
    if spec.choice is not None:
        return common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=list(spec.choice)))
    return common_pb2.StructuredOutput(**{spec.kind: getattr(spec, spec.kind)})


def structured_output_from_proto(msg: common_pb2.StructuredOutput) -> Optional[StructuredOutput]:
    """None when no constraint is set (the oneof is empty, or json_object is false)."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        return StructuredOutput(choice=tuple(msg.choice.choices))
    return StructuredOutput(**{kind: getattr(msg, kind)})


def finish_reason_to_proto(reason: Optional[str]) -> int:
    return _FINISH_TO_PROTO[reason]


def finish_reason_from_proto(value: int) -> Optional[str]:
    return _FINISH_FROM_PROTO[value]


def layout_to_proto(layout: KVLayout, model_fingerprint: str) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(num_layers=layout.num_layers, block_size=layout.block_size,
                               num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                               model_fingerprint=model_fingerprint)


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    try:
        return KVLayout(msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, msg.dtype)
    except UnknownDTypeError as exc:
        raise InvalidRequestError(str(exc), "layout") from exc


def describe_layout(msg: common_pb2.KVLayout) -> str:
    return (f"{msg.num_layers} layers x {msg.block_size} tokens x {msg.num_kv_heads} KV heads x {msg.head_dim} "
            f"dims, {msg.dtype}, model {msg.model_fingerprint[:12]}")


def layout_mismatch(expected: common_pb2.KVLayout, got: common_pb2.KVLayout) -> Optional[str]:
    """A message naming what differs, or None when the two layouts are the same bytes for the same model."""
    if expected == got:
        return None
    return f"KV layout mismatch: expected {describe_layout(expected)}, got {describe_layout(got)}"


def token_logprob_to_proto(token_id: int, logprob: float, top: list[tuple[int, float]],
                           pieces: Callable[[int], tuple[str, bytes]]) -> common_pb2.TokenLogprob:
    """`pieces(token_id)` -> (text, bytes) of the token alone (splitserve.token_bytes.TokenPieces)."""
    text, data = pieces(token_id)
    return common_pb2.TokenLogprob(token_id=token_id, logprob=logprob, token=text, token_bytes=data,
                                   top=[token_logprob_to_proto(t, lp, [], pieces) for t, lp in top])


def prompt_logprobs_to_proto(prompt_token_ids: list[int], entries: list[tuple[float, list[tuple[int, float]]]],
                             pieces: Callable[[int], tuple[str, bytes]]) -> list[common_pb2.TokenLogprob]:
    """One entry per prompt token: the first has its text and bytes only (logprob NaN: nothing precedes it),
    the others their logprob and alternatives (engine/prompt_logprobs.py)."""
    first = token_logprob_to_proto(prompt_token_ids[0], math.nan, [], pieces)
    return [first, *(token_logprob_to_proto(token, logprob, top, pieces)
                     for token, (logprob, top) in zip(prompt_token_ids[1:], entries))]


def stop_reason_to_proto(stop_reason: Union[str, int, None]) -> Optional[common_pb2.StopReason]:
    """The stop string or stop token id that ended a sequence; None for anything else (EOS included)."""
    if isinstance(stop_reason, str):
        return common_pb2.StopReason(stop_string=stop_reason)
    if isinstance(stop_reason, int):
        return common_pb2.StopReason(stop_token_id=stop_reason)
    return None


def stop_reason_from_proto(msg: common_pb2.StopReason) -> Union[str, int, None]:
    which = msg.WhichOneof("reason")
    return getattr(msg, which) if which is not None else None
