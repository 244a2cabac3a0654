"""GET /openapi.json describes every route, and schemathesis, reading only that document, finds no 5xx and no
response that breaks its schema (status, content type, body) on the gateway in front of the fake workers.

A bounded number of generated requests per route: a few in the default run, more under `-m slow`.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from splitserve.services.gateway.response_schemas import ErrorResponse

# No 5xx, and every response documented and matching its schema. Not positive_data_acceptance: the document
# gives types, not every range SamplingParams checks, so a schema-valid body may rightly get a 400.
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/models/{model_id}"), ("GET", "/version"), ("POST", "/tokenize"), ("POST", "/detokenize"),
          ("GET", "/health"), ("GET", "/metrics")}


_FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def fuzz(gateway, method: str, path: str, examples: int) -> Counter:
    """`examples` requests schemathesis makes for one route from the document, each response checked; the
    statuses seen. Half the bodies name the served model (a random name is a 404 before anything else runs)."""
    operation = schemathesis.openapi.from_url(gateway.base_url + "/openapi.json")[path][method]
    statuses: Counter = Counter()

    @given(case=operation.as_strategy(), served=st.booleans())
    @settings(max_examples=examples, **_FUZZ)
    def check(case, served: bool) -> None:
        if served and isinstance(case.body, dict):
            case.body["model"] = "fake-model"
        if served and case.path_parameters and "model_id" in case.path_parameters:
            case.path_parameters["model_id"] = "fake-model"
        statuses[case.call_and_validate(checks=CHECKS, timeout=30).status_code] += 1

    check()
    return statuses


def test_openapi_document_describes_every_route_with_its_schemas(gateway):
    with gateway.http_client() as http:
        document = http.get("/openapi.json").json()
    operations = {(method.upper(), path): op for path, item in document["paths"].items() for method, op in item.items()}
    assert set(operations) == ROUTES
    components = document["components"]["schemas"]
    for (method, path), op in operations.items():
        ok = op["responses"]["200"]["content"]
        assert ok, (method, path)
        if method == "POST":
            body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert components[body]["properties"], body
    completion = components["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "stream", "logprobs"} <= set(completion)
    assert set(operations[("POST", "/v1/completions")]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}
    error = operations[("POST", "/v1/completions")]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/" + ErrorResponse.__name__)


@pytest.mark.parametrize("method, path", sorted(ROUTES))
def test_schemathesis_a_few_requests_per_route(gateway, method, path):
    fuzz(gateway, method, path, examples=8)


@pytest.mark.slow
@pytest.mark.parametrize("method, path", sorted(ROUTES))
def test_schemathesis_many_requests_per_route(gateway, method, path):
    statuses = fuzz(gateway, method, path, examples=150)
    print(method, path, dict(statuses))
    assert statuses[200], f"no generated request succeeded: {statuses}"
