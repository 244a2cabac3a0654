"""Tiny but real Hugging Face checkpoints, built offline.

Tests and the demo mode need folders that load through ``AutoModelForCausalLM`` /
``AutoTokenizer`` exactly like a downloaded checkpoint, without network access.
Everything here is deterministic, so two builds with the same arguments are
byte-for-byte interchangeable and a cache keyed on the arguments is safe.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import shutil
import tempfile

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "SUPPORTED_ARCHS",
    "build_checkpoint",
    "build_tokenizer",
    "cached_checkpoint",
    "demo_checkpoint",
]

# Bump when the files a build produces change, so stale cache entries are not reused.
FORMAT_VERSION = 1

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
TARGET_VOCAB_SIZE = 1000

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Training text for the tokenizer. Varied on purpose (prose, dialogue, code, numbers,
# punctuation, accents, CJK, emoji) so the merges look like a real tokenizer's rather
# than overfitting one register; losslessness comes from the byte-level alphabet, not
# from this text.
_CORPUS = r"""
The morning train left the station a few minutes late, and nobody on board seemed to mind.
A woman by the window was reading a paperback with a cracked spine; the man across from her
was trying, without much success, to fold a map back along its original creases.
Outside, the fields rolled past in long green stripes, broken now and then by a farmhouse,
a water tower, or a line of poplars bending in the wind.

"Do you know when we get in?" the man asked.
"Around noon, if the weather holds," she said, not looking up. "Later, if it doesn't."
He nodded as though that answered everything, and went back to the map.

Good software is written twice: once to understand the problem, and once to solve it.
The first version teaches you what the data actually looks like, where the edge cases hide,
and which assumptions were wrong. The second version is shorter, faster, and easier to read.
Tests are the bridge between the two; they let you rewrite with confidence instead of fear.

Inference servers spend most of their time waiting on memory, not arithmetic. A request
arrives with a prompt, the server computes attention over every token in it (the prefill),
and then produces one new token at a time (the decode). Each decode step reads the whole
key/value cache, so batching many requests together is the main way to keep the hardware busy.
Paged caches split that memory into fixed-size blocks, which makes it cheap to grow, share,
and free sequences of different lengths.

Recipe for a simple bread: 500 g flour, 350 ml water, 10 g salt, 7 g dried yeast.
Mix, rest for 30 minutes, knead for 10 minutes, then let it rise for 1-2 hours.
Bake at 230 °C for 35–40 minutes, until the crust is deep brown and the loaf sounds hollow.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159 2.71828
-1 -0.5 1e-6 6.02e23 1,000,000 99.9% $19.99 €5 £20 ¥300 #1 @home 2024-01-31 12:45:07
Phone: +1 (555) 013-2468. Version 2.13.0-rc1. Ratio 16:9. Temperature 21.5°C.

def fibonacci(n: int) -> list[int]:
    '''Return the first n Fibonacci numbers.'''
    seq = [0, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]

class Counter:
    def __init__(self, start=0):
        self.value = start

    def step(self, by=1):
        self.value += by
        return self.value

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json, os
config = {"hidden_size": 64, "num_layers": 2, "dropout": 0.0, "names": ["a", "b"]}
print(json.dumps(config, indent=2, sort_keys=True))
path = os.path.join("/tmp", "model", "config.json")

fn main() {
    let xs: Vec<u32> = (1..=5).map(|x| x * x).collect();
    println!("{:?}", xs);
}

SELECT id, name, created_at FROM users WHERE active = 1 ORDER BY created_at DESC LIMIT 20;
<div class="note">Hello &amp; welcome!</div>
x = a[i][j] * (b + c) / d - e ** 2 ; y = {k: v for k, v in items} ; z = !flag && (p || q)
Punctuation: ... -- --- ?! ;; :: () [] {} <> "" '' `` ~ ^ | \ / _ = + * & % $ # @ !

Une petite histoire: le café était fermé, alors nous avons marché jusqu'à la rivière.
Ein kurzer Satz auf Deutsch: Die Straße ist nass, weil es die ganze Nacht geregnet hat.
Una frase en español: ¿Dónde está la estación? Está cerca, a la derecha del mercado.
héllo wörld, naïve façade, coöperate, résumé, São Paulo, Kraków, Ærøskøbing, Ångström.
日本語のテキストも少し含めます。今日はいい天気ですね。東京、大阪、京都。
中文句子：我们今天去公园散步。你好，世界！
한국어 문장: 안녕하세요, 만나서 반갑습니다.
Русский текст: Привет, как дела? Всё хорошо, спасибо.
Ελληνικά: Γειά σου κόσμε. עברית: שלום עולם. العربية: مرحبا بالعالم.
Emoji: 🙂 😀 🚀 🎉 👍 ❤️ 🔥 🤖 🧠 ✨ 🌍 👩‍💻 🇯🇵
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ π λ μ σ Δ ∂ ∇ → ← ⇒ ∈ ∀ ∃

The old lighthouse keeper kept a logbook for forty years. Most entries were short:
wind direction, visibility, ships sighted, the state of the lamp. But every so often he wrote
something else, a line about the color of the sea or a bird that had landed on the railing,
and those were the pages people remembered long after the light itself was automated.

Questions and answers:
Q: What is the capital of France? A: Paris.
Q: How many days are in a leap year? A: 366.
Q: What is two plus two? A: Four.
Q: Who wrote the play about a Danish prince? A: Shakespeare wrote Hamlet.
Q: Why is the sky blue? A: Because air scatters short (blue) wavelengths more than long ones.

Lists:
- apples, oranges, pears, and plums
- red, green, blue, yellow, purple
- Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday
- January, February, March, April, May, June, July, August, September, October, November, December
1. Open the file.  2. Read each line.  3. Count the words.  4. Print the total.

She said she would be there at seven, and she was, carrying two cups of coffee and an umbrella
that she never opened. They talked about work, about the city, about a book neither of them had
finished. When the rain stopped, they walked home the long way, past the bakery and the park.
"""


def _train_backend_tokenizer():
    """Train the raw ``tokenizers`` BPE model (byte-level, so every string is encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # No normalizer: anything that rewrites text would break exact round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One line per "document" keeps the counts stable and the trainer's job small.
    lines = [line + "\n" for line in _CORPUS.strip("\n").split("\n")]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _make_tokenizer():
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        # Default cleanup deletes spaces before punctuation, which is not lossless.
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_tokenizer(out_dir) -> None:
    """Write a small byte-level BPE tokenizer with a ChatML template into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _make_tokenizer().save_pretrained(str(out_dir))


_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
}


def _check_arch(arch: str) -> None:
    if arch not in _CONFIG_CLASSES:
        raise ValueError(
            f"unsupported demo architecture {arch!r}; expected one of {', '.join(SUPPORTED_ARCHS)}"
        )


def _config_class(arch: str):
    import transformers

    _check_arch(arch)
    return getattr(transformers, _CONFIG_CLASSES[arch])


def _randomize_bias_and_norms(model, seed: int) -> None:
    """Make biases and norm scales non-trivial so a loader that drops them gets caught.

    ``from_config`` leaves them at exactly 0 / 1, where skipping them is invisible.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.copy_(0.1 * noise)


def build_checkpoint(
    out_dir,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    head_dim: int | None = None,
    max_shard_size: int | str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> pathlib.Path:
    """Build a randomly initialised checkpoint folder loadable by ``from_pretrained``."""
    config_cls = _config_class(arch)  # validate before touching the disk

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}")

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _make_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)

    if head_dim is None:
        # Qwen3Config defaults head_dim to 128 regardless of hidden size; pin it.
        head_dim = hidden_size // num_attention_heads
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        if "type" in rope_scaling:  # legacy spelling
            rope_scaling.setdefault("rope_type", rope_scaling.pop("type"))

    config_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        # Legacy names on purpose: transformers 5 folds them into ``rope_parameters``,
        # transformers 4 takes them as-is.
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        head_dim=head_dim,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if arch == "mistral":
        config_kwargs["sliding_window"] = None
    config = config_cls(**config_kwargs)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32)
    _randomize_bias_and_norms(model, seed)
    # Cast last so a bf16 build is the rounded fp32 build with the same seed.
    model = model.to(torch_dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id
    )

    save_kwargs = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    # safetensors is the only format in transformers 5 and the default in 4.
    model.save_pretrained(str(out_dir), **save_kwargs)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# Captured at import so the cache key never depends on a wrapped/patched builder.
_BUILD_SIGNATURE = inspect.signature(build_checkpoint)


def _default_cache_root() -> pathlib.Path:
    env = os.environ.get("SPLITSERVE_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "splitserve" / "demo-models"


def _cache_key(arch: str, kwargs: dict) -> str:
    # The versions from package metadata: importing transformers imports torch, which finding a cached build
    # (the launcher, the tokenizer service) should not pay for (~230 MiB per process).
    from importlib.metadata import version

    # Bind against the real signature so spelled-out defaults hash like omitted ones.
    bound = _BUILD_SIGNATURE.bind(None, arch, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("out_dir")
    payload = {
        "format": FORMAT_VERSION,
        "params": params,
        # Saved files depend on the library versions (e.g. rope_parameters in v5).
        "transformers": version("transformers"),
        "tokenizers": version("tokenizers"),
    }
    blob = json.dumps(payload, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_checkpoint(arch: str = "llama", cache_root=None, **kwargs) -> pathlib.Path:
    """Build a checkpoint once per argument set and reuse it afterwards.

    The build happens in a temporary sibling folder that is renamed into place, so a
    concurrent reader sees either no folder or a complete one.
    """
    _check_arch(arch)
    root = pathlib.Path(cache_root) if cache_root is not None else _default_cache_root()
    final = root / f"{arch}-{_cache_key(arch, kwargs)}"
    if final.is_dir():
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
        build_checkpoint(tmp, arch, **kwargs)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its copy is identical.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def demo_checkpoint() -> pathlib.Path:
    """The tiny model the product serves in demo mode."""
    return cached_checkpoint(
        "llama",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=2048,
    )
