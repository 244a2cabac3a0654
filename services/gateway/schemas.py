"""The OpenAI request bodies the gateway accepts, and their translation into a GenerationRequest.

Unknown fields are ignored, as OpenAI does; known OpenAI features this server does not implement (suffix)
are refused with a 400 that says so rather than ignored. Tools: see tool_choice.py; structured output
(response_format and vLLM's structured_outputs): structured_outputs.py.
Sampling values are checked by SamplingParams, whose errors name the offending parameter.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from splitserve.sampling_params import InvalidRequestError, SamplingParams
from splitserve.services.gateway.errors import UnsupportedFeatureError
from splitserve.services.gateway.pipeline import GenerationRequest, Prompt
from splitserve.services.gateway.structured_outputs import StructuredOutputFields
from splitserve.services.gateway.tool_choice import ToolChoice, forced_tool_schema
from splitserve.v1 import common_pb2

MAX_TOP_LOGPROBS = 20
# A batch of prompts is one request to admission but prompts × n sequences to the workers: bounded like the
# number of requests in flight (max_in_flight's default), so one request cannot take more than a full gateway.
MAX_BATCH_SEQUENCES = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationBody(StructuredOutputFields):
    """Fields both endpoints share, including vLLM's sampling extras and structured output."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    min_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    # each prompt token's logprob and this many alternatives, as the choice's `prompt_logprobs`
    prompt_logprobs: Optional[int] = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                         echo_logprobs: Optional[int] = None) -> SamplingParams:
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "prompt_logprobs")
        # One computation serves both views of the prompt (echo's logprobs, vLLM's prompt_logprobs): the larger k.
        wanted = [k for k in (self.prompt_logprobs, echo_logprobs) if k is not None]
        given = dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                     min_p=self.min_p, seed=self.seed, presence_penalty=self.presence_penalty,
                     frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                     logprobs=logprobs, min_tokens=self.min_tokens, prompt_logprobs=max(wanted, default=None))
        values = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(n=self.n, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, logit_bias=self._logit_bias(),
                              structured_output=self.structured_output(), **values)

    def _logit_bias(self) -> Optional[dict[int, float]]:
        """OpenAI's JSON keys are strings: {"50256": -100}. The ids are checked against the vocabulary by the
        pipeline, which knows its size."""
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError:
            raise InvalidRequestError('logit_bias keys must be token ids, e.g. {"50256": -100}',
                                      "logit_bias") from None


class CompletionRequest(_GenerationBody):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None

    @property
    def echo_logprobs(self) -> Optional[int]:
        """How many alternatives the prompt tokens' entries in `logprobs` show (echo with logprobs), or None."""
        return self.logprobs if self.echo else None

    def to_generation_requests(self) -> list[GenerationRequest]:
        """One request per prompt of the batch (OpenAI's list of strings or of token-id lists), alike but for the
        prompt; the response numbers prompt i's choice j as i * n + j.

        `echo` puts the prompt before each choice's text (and, with logprobs, its tokens before the generated
        ones); max_tokens 0 with echo asks for the prompt alone (lm-eval's loglikelihood), as vLLM allows."""
        self._check_common()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo: the prompt alone)",
                                      "max_tokens")
        if self.suffix:
            raise UnsupportedFeatureError("suffix is not supported by this server (no model it serves is trained "
                                          "to fill in the middle): put all the text in the prompt", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        prompt_only = self.max_tokens == 0
        # Prefill samples one token whatever happens: a prompt-only request lets it, and drops it (pipeline.py).
        max_tokens = 16 if self.max_tokens is None else 1 if prompt_only else self.max_tokens
        params = self._sampling_params(max_tokens, self.logprobs, self.echo_logprobs)
        prompts = _prompts(self.prompt)
        if len(prompts) * params.n > MAX_BATCH_SEQUENCES:
            raise InvalidRequestError(f"{len(prompts)} prompts with n={params.n} make {len(prompts) * params.n} "
                                      f"sequences; at most {MAX_BATCH_SEQUENCES} per request", "prompt")
        return [GenerationRequest(prompt=prompt, params=params, model=self.model,
                                  skip_special_tokens=self.skip_special_tokens, echo=self.echo,
                                  prompt_only=prompt_only) for prompt in prompts]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    """A call an earlier assistant turn made, sent back in the conversation."""
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    tool_calls: Optional[list[ToolCall]] = None          # assistant turns
    tool_call_id: Optional[str] = None                   # tool turns: the call answered
    name: Optional[str] = None

    def to_proto(self, index: int) -> common_pb2.ChatMessage:
        message = common_pb2.ChatMessage(role=self.role, content=self.text(index), tool_call_id=self.tool_call_id or "",
                                         name=self.name or "")
        if self.tool_calls:
            message.tool_calls = json.dumps([call.model_dump() for call in self.tool_calls], ensure_ascii=False)
        return message

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise UnsupportedFeatureError(f"content parts of type {part.type!r} are not supported; only text",
                                              f"messages[{index}].content")
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="a JSON Schema object")
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


def checked_tools(tools: Optional[list[Tool]], choice: Optional[str] = None, named: Optional[str] = None,
                  parallel_tool_calls: bool = True) -> ToolChoice:
    functions = [tool.function.model_dump(exclude_none=True) for tool in tools or []]
    return ToolChoice.check(functions, choice, named, parallel_tool_calls, tools_given=tools is not None)


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None

    def tool_choice_plan(self) -> ToolChoice:
        """The request's tools and tool_choice, checked (400 for tools that cannot be, an unknown function)."""
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        choice = "function" if named is not None else self.tool_choice
        return checked_tools(self.tools, choice, named, self.parallel_tool_calls is not False)

    def to_generation_requests(self) -> list[GenerationRequest]:
        return [self.to_generation_request()]

    def to_generation_request(self) -> GenerationRequest:
        self._check_common()
        if not self.messages:
            raise InvalidRequestError("messages must hold at least one message", "messages")
        tools = self.tool_choice_plan()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                                          "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # Without max_tokens the pipeline fills the context; until then any value that passes validation.
        placeholder = max(1, self.min_tokens or 0)
        params = forced_tool_schema(self._sampling_params(max_tokens if max_tokens is not None else placeholder,
                                                          logprobs), tools)
        prompt = Prompt(messages=chat_turns(self.messages), tools=tools.template_json())
        return GenerationRequest(prompt=prompt, params=params, model=self.model,
                                 skip_special_tokens=self.skip_special_tokens,
                                 max_tokens_fills_context=max_tokens is None)


def chat_turns(messages: list[ChatMessage]) -> list[common_pb2.ChatMessage]:
    """The messages as the tokenizer's chat template gets them."""
    return [m.to_proto(i) for i, m in enumerate(messages)]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a text `prompt` or chat `messages` (rendered with the chat template)."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[Tool]] = None                  # chat: rendered by the template, as for generation
    add_special_tokens: Optional[bool] = None           # text: default true; chat: the template places them
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    def to_prompt(self) -> Prompt:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give either prompt or messages", "prompt")
        if self.messages is None:
            if self.tools is not None:
                raise InvalidRequestError("tools go with chat messages, not a text prompt", "tools")
            return Prompt(text=self.prompt)
        if not self.messages:
            raise InvalidRequestError("messages must hold at least one message", "messages")
        if self.add_special_tokens:
            raise UnsupportedFeatureError("add_special_tokens applies to a text prompt; the chat template places "
                                          "special tokens itself", "add_special_tokens")
        if self.continue_final_message:
            raise UnsupportedFeatureError("continue_final_message is not supported by this server",
                                          "continue_final_message")
        return Prompt(messages=chat_turns(self.messages), tools=checked_tools(self.tools).template_json())


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: list[int]


def _prompts(prompt: Union[str, list[int], list[str], list[list[int]]]) -> list[Prompt]:
    """OpenAI's four forms: a text, one prompt's token ids, a batch of texts, a batch of token-id lists."""
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [Prompt(token_ids=list(prompt))]
    return [Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=list(p)) for p in prompt]
