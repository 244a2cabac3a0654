"""The public gRPC API through Envoy's gRPC listener, with the package's own client: the same tokens as the
offline engine and the same text and usage as the REST API."""

from __future__ import annotations

import httpx
import pytest

from e2e_stack import API_KEY
from splitserve import SamplingParams
from splitserve.client import GatewayError, SyncClient

pytestmark = pytest.mark.timeout(300)


def test_grpc_generate_matches_offline_tokens_and_rest(stack, reference_llm):
    prompt = "blocks move between workers and the model serves tokens quickly"
    [reference] = reference_llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0))
    with SyncClient(stack.grpc_address, api_key=API_KEY) as client:
        result = client.generate(prompt, max_tokens=20, temperature=0.0)
        streamed = list(client.generate(prompt, max_tokens=20, temperature=0.0, stream=True))
        by_ids = client.generate(reference.prompt_token_ids, max_tokens=20, temperature=0.0)
    assert result.token_ids == reference.outputs[0].token_ids
    assert result.text == reference.outputs[0].text
    assert result.finish_reason == reference.outputs[0].finish_reason
    assert result.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert result.usage.completion_tokens == len(reference.outputs[0].token_ids)
    assert [t for c in streamed for t in c.token_ids] == result.token_ids
    assert "".join(c.text for c in streamed) == result.text
    assert by_ids.token_ids == result.token_ids

    rest = httpx.post(f"{stack.base_url}/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                      json={"prompt": prompt, "max_tokens": 20, "temperature": 0.0,
                            "model": httpx.get(f"{stack.base_url}/models", timeout=10,
                                               headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]})
    body = rest.json()
    assert body["choices"][0]["text"] == result.text
    assert body["usage"]["completion_tokens"] == result.usage.completion_tokens


def test_grpc_errors_are_statuses(stack):
    import grpc

    with SyncClient(stack.grpc_address, api_key="wrong") as client:
        with pytest.raises(GatewayError) as info:
            client.generate("hello", max_tokens=2)
        assert info.value.status_code == grpc.StatusCode.UNAUTHENTICATED
    with SyncClient(stack.grpc_address, api_key=API_KEY) as client:
        with pytest.raises(GatewayError) as info:
            client.generate("hello", max_tokens=2, top_p=1.5)
        assert info.value.status_code == grpc.StatusCode.INVALID_ARGUMENT and info.value.param == "top_p"
