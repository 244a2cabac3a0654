"""Structured output through the disaggregated stack (prefill worker samples the first token under the grammar,
decode replays it and goes on) with the official `openai` client: 20 random JSON schemas, greedy and sampled,
every output parses and validates; json_object, regex and choice too; a grammar the worker cannot compile is a
400."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from e2e_stack import gateway_metric
from json_schemas import MAX_TOKENS, random_schemas

pytestmark = pytest.mark.timeout(300)

MESSAGES = [{"role": "user", "content": "Describe the item as JSON."}]


def _json_schema_format(schema: dict, index: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"item{index}", "schema": schema, "strict": True}}


def test_twenty_random_schemas_parse_and_validate_greedy_and_sampled(client, model_id, stack):
    schemas = random_schemas(20, seed=13)
    remote_before = gateway_metric(stack, 'splitserve_gateway_local_prefill_total')

    def ask(job):
        i, temperature = job
        response = client.chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=temperature, seed=i,
            response_format=_json_schema_format(schemas[i], i))
        return i, temperature, response.choices[0]

    jobs = [(i, t) for t in (0.0, 1.0) for i in range(len(schemas))]
    with ThreadPoolExecutor(8) as pool:
        for i, temperature, choice in pool.map(ask, jobs):
            assert choice.finish_reason == "stop", (i, temperature, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schemas[i])
    # Every request went the disaggregated way: none was prefilled by the decode worker.
    assert gateway_metric(stack, 'splitserve_gateway_local_prefill_total') == remote_before


def test_streamed_guided_output_equals_the_whole_response(client, model_id):
    [schema] = random_schemas(1, seed=99)
    fmt = _json_schema_format(schema, 0)
    whole = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                           temperature=0.0, response_format=fmt).choices[0].message.content
    chunks = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=0.0, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    jsonschema.validate(json.loads(whole), schema)


def test_json_object_regex_and_choice(client, model_id):
    objects = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                             temperature=1.0, seed=4, n=4, response_format={"type": "json_object"})
    finished = [c.message.content for c in objects.choices if c.finish_reason == "stop"]
    assert finished, "no json_object output ended within max_tokens"
    assert all(isinstance(json.loads(text), dict) for text in finished)
    assert all(c.message.content.startswith("{") for c in objects.choices)

    regex = client.completions.create(model=model_id, prompt="Code:", max_tokens=32, temperature=1.0, seed=1,
                                      extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{4}"}})
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"

    choices = ["positive", "negative", "neutral"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        answer = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16,
                                                temperature=0.0, extra_body=extra).choices[0]
        assert answer.message.content in choices and answer.finish_reason == "stop"


@pytest.mark.parametrize("extra, words", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "invalid json schema"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "invalid grammar"),
])
def test_a_grammar_the_worker_cannot_compile_is_a_400(client, model_id, extra, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, extra_body=extra)
    assert words in caught.value.body["message"] and caught.value.body["param"] == "structured_outputs"
