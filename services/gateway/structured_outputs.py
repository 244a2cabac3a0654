"""Structured output in the request bodies: OpenAI's `response_format`, vLLM's `structured_outputs` extra body and
its older `guided_*` keys, read into the one StructuredOutput the engines enforce (engine/guided.py).

One constraint per request: two (say a response_format and a guided_regex) are a 400, never one silently
winning. The gateway has no model, so it cannot compile a grammar: it checks what it can (a JSON schema is a
JSON object), and the worker's compile error comes back as INVALID_ARGUMENT, a 400 naming `structured_outputs`.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from splitserve.sampling_params import InvalidRequestError, StructuredOutput

_FORMAT_TYPES = ("text", "json_object", "json_schema")


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema (OpenAI): `strict` is accepted either way; the schema is always enforced."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` extra body: set exactly one."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: Optional[Union[dict[str, Any], str]] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class StructuredOutputFields(BaseModel):
    """The request fields that ask for structured output, shared by both endpoints."""
    model_config = ConfigDict(extra="ignore")
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsBody] = None
    # vLLM's older names for the same constraints
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def structured_output(self) -> Optional[StructuredOutput]:
        """The request's one constraint, or None; InvalidRequestError (naming the field) for anything else."""
        given: list[tuple[str, StructuredOutput]] = []
        if self.response_format is not None:
            spec = _from_response_format(self.response_format)
            if spec is not None:
                given.append(("response_format", spec))
        body = self.structured_outputs
        if body is not None:
            given += [(f"structured_outputs.{name}", spec) for name, spec in _constraints(
                "structured_outputs", body.json_, body.regex, body.choice, body.grammar, body.json_object)]
        given += _constraints("guided", self.guided_json, self.guided_regex, self.guided_choice,
                              self.guided_grammar, None)
        if len(given) > 1:
            raise InvalidRequestError("only one structured output constraint per request, got "
                                      + ", ".join(name for name, _ in given), given[1][0].split(".")[0])
        return given[0][1] if given else None


def _from_response_format(fmt: ResponseFormat) -> Optional[StructuredOutput]:
    if fmt.type not in _FORMAT_TYPES:
        raise InvalidRequestError(f"response_format.type must be one of {', '.join(_FORMAT_TYPES)}, got "
                                  f"{fmt.type!r}", "response_format")
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError("response_format of type json_schema needs json_schema.schema", "response_format")
    return StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_))


def _constraints(prefix: str, schema: Union[dict, str, None], regex: Optional[str], choice: Optional[list[str]],
                 grammar: Optional[str], json_object: Optional[bool]) -> list[tuple[str, StructuredOutput]]:
    """(field, constraint) for each one set, named as vLLM names them: `guided_regex`, `structured_outputs.regex`."""
    sep = "_" if prefix == "guided" else "."
    found = []
    for name, value in (("json", schema), ("regex", regex), ("choice", choice), ("grammar", grammar),
                        ("json_object", json_object or None)):
        if value is None:
            continue
        field = f"{prefix}{sep}{name}"
        param = field.split(".")[0]
        try:
            if name == "json":
                spec = StructuredOutput(json_schema=_schema_text(value, field, param))
            elif name == "choice":
                spec = StructuredOutput(choice=tuple(value))
            else:
                spec = StructuredOutput(**{name: value})
        except InvalidRequestError as exc:   # StructuredOutput's own checks, naming the request's field
            raise InvalidRequestError(f"{field}: {exc}", param) from None
        found.append((field, spec))
    return found


def _schema_text(schema: Union[dict, str], field: str, param: str) -> str:
    """A JSON schema as JSON text; given as text, it must parse to a JSON object."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{field} is not valid JSON: {exc}", param) from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(f"{field} must be a JSON schema (an object), got {type(parsed).__name__}", param)
    return schema
