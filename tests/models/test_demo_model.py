"""The offline demo checkpoints must behave like real downloaded ones."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from splitserve import demo_model
from splitserve.demo_model import build_checkpoint, build_tokenizer, cached_checkpoint

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "héllo 日本語 🙂",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "emoji with modifiers: 👩‍💻 🇯🇵 👍🏽 ❤️",
    "never seen in training: ᚠᛇᚻ ꦲꦏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00ad\x00\x7f",
    "def f(x):\n    return {'a': [1, 2.5e-3, -7]}  # ok?",
    "spaces before punctuation , . ! ? ' s n't",
    "special text inline: <|im_start|>user\nhi<|im_end|><|endoftext|>",
]


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _safetensors_state(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _rope_theta(config):
    params = getattr(config, "rope_parameters", None)
    return params["rope_theta"] if params else config.rope_theta


@pytest.fixture(scope="module")
def mistral_ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("mistral"), "mistral", initializer_range=0.1)


@pytest.fixture(scope="module")
def tokenizer(llama_ckpt):
    return AutoTokenizer.from_pretrained(llama_ckpt)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_checkpoint_loads_like_a_real_one(arch, tiny_ckpts, mistral_ckpt):
    path = {**tiny_ckpts, "mistral": mistral_ckpt}[arch]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name

    model, info = _load(path)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert model.config.model_type == arch
    assert model.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.bos_token is None
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id

    ids = tok("The train left the station.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4


def test_arch_specific_weights(llama_ckpt, qwen2_ckpt, qwen3_ckpt, mistral_ckpt):
    qwen2 = _safetensors_state(qwen2_ckpt)
    q_bias = qwen2["model.layers.0.self_attn.q_proj.bias"]
    assert q_bias.abs().sum() > 0, "biases must be non-trivial so a loader that drops them fails"
    assert "lm_head.weight" not in qwen2  # tied: stored once
    cfg = AutoConfig.from_pretrained(qwen2_ckpt)
    assert cfg.tie_word_embeddings and cfg.num_key_value_heads == 2

    qwen3 = _safetensors_state(qwen3_ckpt)
    q_norm = qwen3["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.shape == (32,) and not torch.allclose(q_norm, torch.ones_like(q_norm))
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert qwen3["model.layers.0.self_attn.k_proj.weight"].shape == (1 * 32, 64)
    assert "lm_head.weight" in qwen3

    llama = _safetensors_state(llama_ckpt)
    norm = llama["model.norm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm))
    assert llama["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert not any(k.endswith("bias") for k in llama)
    assert "lm_head.weight" in llama
    assert llama["model.embed_tokens.weight"].std() > 0.05  # initializer_range 0.1 applied

    assert AutoConfig.from_pretrained(mistral_ckpt).sliding_window is None


def test_sharded_checkpoint(sharded_llama_ckpt, llama_ckpt):
    index = json.loads((sharded_llama_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(sharded_llama_ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (sharded_llama_ckpt / "model.safetensors").exists()

    # Same seed and shapes as the unsharded fixture, so the weights must match exactly.
    sharded, unsharded = _safetensors_state(sharded_llama_ckpt), _safetensors_state(llama_ckpt)
    assert sharded.keys() == unsharded.keys() == index["weight_map"].keys()
    for key in sharded:
        assert torch.equal(sharded[key], unsharded[key]), key

    model, info = _load(sharded_llama_ckpt)
    assert not any(info.values()), info


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert tokenizer.decode(ids) == text


def test_tokenizer_shape(tokenizer):
    assert 900 <= len(tokenizer) <= 1024
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert len(set(special)) == 3 and tokenizer.unk_token_id not in special
    assert tokenizer.encode("<|im_start|>") == [special[1]]  # one token, not spelled out
    assert len(tokenizer.encode("the station")) < len("the station")  # merges were learned
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5
    assert tokenizer.decode(ids) == prompt


def test_build_tokenizer_alone(tmp_path):
    build_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.chat_template


def test_build_is_deterministic(tmp_path):
    kwargs = dict(arch="qwen3", hidden_size=32, num_hidden_layers=1, intermediate_size=64, seed=7)
    a = build_checkpoint(tmp_path / "a", **kwargs)
    b = build_checkpoint(tmp_path / "b", **kwargs)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    c = build_checkpoint(tmp_path / "c", **{**kwargs, "seed": 8})
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_options_reach_the_checkpoint(tmp_path):
    path = build_checkpoint(
        tmp_path / "m",
        "llama",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        dtype="bfloat16",
        tie_word_embeddings=True,
    )
    cfg = AutoConfig.from_pretrained(path)
    assert _rope_theta(cfg) == 500000.0
    scaling = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert scaling["rope_type"] == "linear" and scaling["factor"] == 2.0
    state = _safetensors_state(path)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    model, info = _load(path)
    assert not any(info.values()), info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unknown_arch_raises(tmp_path):
    with pytest.raises(ValueError, match="gpt2"):
        build_checkpoint(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="falcon"):
        cached_checkpoint("falcon", cache_root=tmp_path / "cache")
    assert not (tmp_path / "x").exists() and not (tmp_path / "cache").exists()


def test_cached_checkpoint_builds_once(tmp_path, monkeypatch):
    calls = []
    real_build = demo_model.build_checkpoint

    def counting_build(*args, **kwargs):
        calls.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(demo_model, "build_checkpoint", counting_build)
    root = tmp_path / "cache"
    small = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64)

    first = cached_checkpoint("llama", cache_root=root, **small)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert len(calls) == 1
    assert _load(first)[0].config.hidden_size == 32

    # Spelling out a default must not change the key.
    again = cached_checkpoint("llama", cache_root=root, seed=0, **small)
    assert again == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime

    other = cached_checkpoint("llama", cache_root=root, seed=1, **small)
    assert other != first and len(calls) == 2
    # Only finished folders remain; the temporary build folders were renamed away.
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, other.name])


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "env-cache"))
    path = cached_checkpoint("llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    assert path.parent == tmp_path / "env-cache"
    assert (path / "config.json").is_file()


def test_finding_a_cached_build_imports_neither_transformers_nor_torch(tmp_path):
    """The launcher and the tokenizer service look the demo model up; importing transformers would import torch
    (~230 MiB of RSS in each of those processes) for nothing."""
    import subprocess
    import sys

    small = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    built = cached_checkpoint("llama", cache_root=tmp_path, **small)
    code = ("import json, sys; from splitserve.demo_model import cached_checkpoint; "
            f"path = cached_checkpoint('llama', cache_root={str(tmp_path)!r}, **{small!r}); "
            "print(json.dumps([str(path), 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == [str(built), False, False]
