"""The routes about the model: /v1/models and /v1/models/{id}, --served-model-name, /version, /tokenize and
/detokenize (vLLM's shapes), against the fake tokenizer."""

from __future__ import annotations

import openai
import pytest

from splitserve.services.gateway.served_models import default_name

from . import fakes

CACHE_PATH = "/root/.cache/splitserve/checkpoints/llama-3f2a9c/"


@pytest.mark.parametrize("model, name", [(CACHE_PATH, "llama-3f2a9c"), ("Qwen/Qwen2.5-0.5B-Instruct",
                                                                        "Qwen/Qwen2.5-0.5B-Instruct"),
                                         ("./models/tiny", "tiny"), ("gpt2", "gpt2")])
def test_default_name_is_the_hub_id_or_the_folder_name(model, name):
    assert default_name(model) == name


def test_a_checkpoint_folder_is_served_under_its_name_not_its_path(make_stack):
    workers = {"model": CACHE_PATH}   # the workers serve what the tokenizer serves
    stack = make_stack(tokenizer=workers, prefill=workers, decode=workers)
    client = stack.start_gateway().openai()
    [card] = client.models.list().data
    assert card.id == "llama-3f2a9c" and "/" not in card.id
    result = client.completions.create(model="llama-3f2a9c", prompt="x 10", max_tokens=1)
    assert result.model == "llama-3f2a9c" and result.choices[0].text == " w11"


def test_several_served_names_each_listed_and_retrievable(stack):
    gateway = stack.start_gateway(served_model_name=["org/tiny", "tiny"])
    client = gateway.openai()
    assert [m.id for m in client.models.list().data] == ["org/tiny", "tiny"]
    for name in ("org/tiny", "tiny"):
        card = client.models.retrieve(name)
        assert card.id == name and card.object == "model" and card.model_extra["max_model_len"] == 256
        assert client.completions.create(model=name, prompt="x 10", max_tokens=1).model == name
    # Without a model, the first name.
    with gateway.http_client() as http:
        assert http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 1}).json()["model"] == "org/tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("fake-model")
    assert info.value.body["code"] == "model_not_found" and info.value.body["type"] == "invalid_request_error"


def test_version(gateway):
    with gateway.http_client() as http:
        response = http.get("/version")
    assert response.status_code == 200 and response.json()["version"]


def test_tokenize_text_and_chat_in_vllm_shapes(gateway):
    with gateway.http_client() as http:
        text = http.post("/tokenize", json={"model": "fake-model", "prompt": "x 10 11", "return_token_strs": True})
        assert text.status_code == 200, text.text
        ids = fakes.tokenize("x 10 11")
        assert text.json() == {"count": 3, "max_model_len": 256, "tokens": ids,
                               "token_strs": [fakes.decode_text([t], False) for t in ids]}
        messages = [{"role": "user", "content": "hi 5"}]
        chat = http.post("/tokenize", json={"messages": messages}).json()
        assert chat["tokens"] == fakes.tokenize_chat([("user", "hi 5")]) and chat["token_strs"] is None
        bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
        assert bare["tokens"] == fakes.tokenize_chat([("user", "hi 5")], add_generation_prompt=False)
        back = http.post("/detokenize", json={"model": "fake-model", "tokens": [10, 11]})
        assert back.status_code == 200 and back.json() == {"prompt": " w10 w11"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [fakes.VOCAB]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_tokenizer_routes_refuse_bad_input_in_openai_shape(gateway, path, body, status, param):
    with gateway.http_client() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_model_routes_need_the_api_key(stack):
    gateway = stack.start_gateway(api_key="sesame")
    with gateway.http_client() as http:
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/v1/models/fake-model", None),
                                   ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]})]:
            assert http.request(method, path, json=body).status_code == 401, path
            authorized = http.request(method, path, json=body, headers={"Authorization": "Bearer sesame"})
            assert authorized.status_code == 200, path
        assert http.get("/version").status_code == 200
