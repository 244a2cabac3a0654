"""The shapes of the gateway's responses, for its OpenAPI document (GET /openapi.json).

The responses themselves are built as plain dicts (openai_format.py: a model per stream chunk would cost time on
every token); these models say what those dicts hold, and the schemathesis test checks every response the
gateway gives against them. Names follow OpenAI's and vLLM's.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    """With echo the prompt's tokens come first; the first has no logprob and no alternatives (null)."""
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: Optional[int] = Field(None, description="1 for the most likely token; null outside the top k")
    decoded_token: str


# vLLM's prompt_logprobs: null for the first prompt token, then {token id: PromptLogprob} per prompt token.
PromptLogprobs = Optional[list[Optional[dict[str, PromptLogprob]]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    prompt_logprobs: PromptLogprobs = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = Field(None, description="the stop string or stop token id that "
                                                                      "ended the choice (vLLM)")


class CompletionResponse(BaseModel):
    """Also each event of a streamed completion (`usage` then null or absent until the last)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it (or re-serialized)")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = Field(None, description="present when the model called tools "
                                                                      "(finish_reason tool_calls)")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: PromptLogprobs = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: Optional[str] = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: str
    reason: Optional[str] = None
