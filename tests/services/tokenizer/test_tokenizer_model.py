"""TokenizerModel: what the service reads from a checkpoint, and the typed errors it raises for bad input."""

from __future__ import annotations

import json

import pytest

from splitserve.demo_model import build_tokenizer
from splitserve.sampling_params import InvalidRequestError
from splitserve.services.tokenizer.tokenizer_model import (ChatTemplateMissingError, TokenizerLoadError,
                                                           TokenizerModel)

# Rejects a conversation that does not start with a user turn, the way many real templates do.
STRICT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'user' -%}{{ raise_exception('Conversations must start with a user turn') }}"
    "{%- endif -%}{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor -%}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The demo tokenizer with configs that list extra EOS ids, as chat models' configs do."""
    path = tmp_path_factory.mktemp("chat-model")
    build_tokenizer(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2,
                                                  "max_position_embeddings": 4096}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1, 0]}))
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return TokenizerModel.load(str(checkpoint))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """Tokenizer files only: no configs, no chat template."""
    path = tmp_path_factory.mktemp("base-model")
    build_tokenizer(path)
    (path / "chat_template.jinja").unlink()
    return TokenizerModel.load(str(path))


def test_info_merges_eos_ids_and_reads_the_context_length(model, checkpoint):
    info = model.info
    assert info.model == str(checkpoint)
    assert info.vocab_size == len(model.tokenizer) == 1000
    assert info.eos_token_ids == (0, 1, 2)  # tokenizer 0, config 2, generation_config [2, 1, 0]
    assert info.bos_token_id is None
    assert info.max_context_length == 4096
    assert info.has_chat_template


def test_without_configs_info_comes_from_the_tokenizer(base_model):
    info = base_model.info
    assert info.eos_token_ids == (0,)
    assert not info.has_chat_template
    assert info.max_context_length == 0  # unknown, and said so in the log


def test_chat_is_rendered_with_the_template_and_encoded_once(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich 🙂"}]
    ids, rendered = model.encode_chat(messages, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüß dich 🙂<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert ids == model.tokenizer.encode(rendered, add_special_tokens=False)
    assert model.tokenizer.decode(ids) == rendered
    _, without_prompt = model.encode_chat(messages, add_generation_prompt=False)
    assert not without_prompt.endswith("assistant\n")


@pytest.mark.parametrize("messages, words", [
    ([], "empty"),
    ([{"role": "wizard", "content": "hi"}], "'wizard'"),
    ([{"role": "", "content": "hi"}], "messages[0].role"),
])
def test_bad_messages_name_the_messages_param(model, messages, words):
    with pytest.raises(InvalidRequestError) as caught:
        model.encode_chat(messages, add_generation_prompt=True)
    assert caught.value.param == "messages"
    assert words in str(caught.value)


def test_a_template_that_rejects_the_conversation_is_a_bad_request(model):
    model.tokenizer.chat_template, original = STRICT_TEMPLATE, model.tokenizer.chat_template
    try:
        with pytest.raises(InvalidRequestError, match="must start with a user turn") as caught:
            model.encode_chat([{"role": "assistant", "content": "hi"}], add_generation_prompt=False)
        assert caught.value.param == "messages"
    finally:
        model.tokenizer.chat_template = original


def test_chat_without_a_template_is_refused(base_model):
    with pytest.raises(ChatTemplateMissingError, match="no chat template"):
        base_model.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_empty_text_names_the_prompt_param(model):
    with pytest.raises(InvalidRequestError) as caught:
        model.encode_text("", add_special_tokens=True)
    assert caught.value.param == "prompt"


def test_ids_outside_the_vocabulary_are_named(model):
    assert model.decode([5, 999], skip_special_tokens=False) == model.tokenizer.decode([5, 999])
    with pytest.raises(InvalidRequestError, match=r"token_ids\[1\] = 1000 is outside") as caught:
        model.decode([5, 1000], skip_special_tokens=False)
    assert caught.value.param == "token_ids"


def test_a_missing_model_is_a_load_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="cannot load a tokenizer"):
        TokenizerModel.load(str(tmp_path / "nowhere"))
