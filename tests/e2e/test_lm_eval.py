"""lm-evaluation-harness against the gateway (`local-completions`) scores like lm-eval's own `hf` model on the same
checkpoint: a multiple-choice task (loglikelihood: echo, max_tokens 1, logprobs 1, batched token-id prompts) and a
generate_until task (greedy strings). The tasks are YAML over jsonl files this test writes: nothing downloaded."""

from __future__ import annotations

import json

import pytest

from e2e_stack import API_KEY

pytestmark = pytest.mark.timeout(600)

# Loglikelihoods: float32 both sides, different kernels and batch shapes; 1e-3 nats over a few tokens.
TOL = 1e-3

_MC = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two makes", "choices": [" four", " seven and a half", " blocks"], "answer": 0},
    {"question": "Workers move", "choices": [" tokens", " the model serves", " quickly"], "answer": 1},
    {"question": "A gateway formats", "choices": [" answers", " nothing", " every block quickly"], "answer": 2},
]
_GEN = [{"question": "Once upon a time", "answer": "x"}, {"question": "The model serves", "answer": "y"},
        {"question": "Tokens move between", "answer": "z"}]


def _write_tasks(folder) -> None:
    for name, rows in (("mc", _MC), ("gen", _GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\n"
    (folder / "splitserve_mc.yaml").write_text(
        f"task: splitserve_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "splitserve_gen.yaml").write_text(
        f"task: splitserve_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture
def offline_lm_eval(tmp_path, monkeypatch):
    """lm-eval with its tasks in `tmp_path`, kept off the network and out of the user's caches."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)   # local-completions' bearer token
    _write_tasks(tmp_path)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def run(model: str, model_args: dict):
        return simple_evaluate(model=model, model_args=model_args, tasks=["splitserve_mc", "splitserve_gen"],
                               task_manager=manager, log_samples=True, cache_requests=False,
                               random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)

    return run


def test_local_completions_scores_like_hf(stack, llama_ckpt, offline_lm_eval):
    hf = offline_lm_eval("hf", dict(pretrained=str(llama_ckpt), dtype="float32", device="cpu", batch_size=1))
    model_id = llama_ckpt.name   # the served name: the checkpoint folder's
    api = offline_lm_eval("local-completions", dict(
        model=model_id, base_url=f"{stack.base_url}/completions", tokenizer=str(llama_ckpt),
        tokenizer_backend="huggingface", tokenized_requests=True, batch_size=4, num_concurrent=1, max_retries=1,
        max_length=1024))
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"]["splitserve_mc"][metric] == hf["results"]["splitserve_mc"][metric]
    assert api["results"]["splitserve_gen"]["exact_match,none"] == hf["results"]["splitserve_gen"]["exact_match,none"]

    def by_doc(result, task):
        return {s["doc_id"]: s for s in result["samples"][task]}

    hf_mc, api_mc = by_doc(hf, "splitserve_mc"), by_doc(api, "splitserve_mc")
    assert sorted(hf_mc) == sorted(api_mc) == list(range(len(_MC)))
    for doc_id, sample in hf_mc.items():
        hf_ll = [resp[0][0] for resp in sample["resps"]]
        api_ll = [resp[0][0] for resp in api_mc[doc_id]["resps"]]
        assert api_ll == pytest.approx(hf_ll, abs=TOL)
    hf_gen, api_gen = by_doc(hf, "splitserve_gen"), by_doc(api, "splitserve_gen")
    assert len(hf_gen) == len(_GEN)
    for doc_id, sample in hf_gen.items():
        assert api_gen[doc_id]["filtered_resps"] == sample["filtered_resps"]
        assert sample["filtered_resps"][0]   # something was generated to compare
