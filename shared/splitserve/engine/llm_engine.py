"""The engine loop: requests in, one scheduled step at a time, finished sequences out."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from splitserve.byte_size import format_bytes
from splitserve.config import EngineConfig
from splitserve.engine.block_io import CacheBlocks, export_blocks, import_runs
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.guided import Grammars
from splitserve.engine.kv_budget import default_cpu_budget, size_kv_cache
from splitserve.engine.kv_connector import KVLoad, KVLoads
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.output_text import OutputText
from splitserve.engine.outputs import CompletionOutput, KVExport, RequestOutput, logprob_entry
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.engine.stop_checker import StopChecker
from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.layers.sampler import skip_draws
from splitserve.stop_tokens import eos_token_ids
from splitserve.token_bytes import TokenPieces
from splitserve.models.fingerprint import model_fingerprint
from splitserve.models.loader import llama_args_from_config, load_model, read_model_files
from splitserve.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    export_kv: bool = False
    kv_export: Optional[KVExport] = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if config.model is None:
            raise ValueError("EngineConfig.model is required: a hub id or checkpoint folder")
        self.config = config
        files = read_model_files(config.model)
        llama_args_from_config(files.config)  # an unsupported architecture fails here, before anything loads
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        self.model_id = model_fingerprint(files, str(self.dtype).removeprefix("torch."), config.block_size)
        self.tokenizer = _load_tokenizer(config.tokenizer or str(files.path))
        torch.manual_seed(config.seed)
        model = load_model(files, self.dtype, self.device)
        self.model_config = files.config
        max_position = model.args.max_position
        self.max_model_len = config.max_model_len or max_position
        if self.max_model_len > max_position:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {max_position} positions")
        self.vocab_size = model.args.vocab_size
        self.runner = ModelRunner(model, config.block_size, self.device, self.dtype, config.attention_backend,
                                  config.linear_backend)
        kv_size = size_kv_cache(config, self.runner.layout.bytes_per_block, self.max_model_len,
                                self._default_kv_budget)
        self.num_blocks = kv_size.num_blocks
        self.runner.allocate_kv_cache(self.num_blocks)
        log.info("KV cache: %s", kv_size.describe())
        if self.device.type == "cpu" and kv_size.nbytes > _available_host_memory():
            log.warning("the KV cache can grow to %s, more than this machine has available now (%s): the engine "
                        "may run out of memory under load; set kv_cache_memory_bytes lower",
                        format_bytes(kv_size.nbytes), format_bytes(_available_host_memory()))
        capacity = self.num_blocks * config.block_size
        if capacity < self.max_model_len:
            # A sequence longer than the whole cache could never run, not even alone: preempting it to make room
            # would only restart it. So it ends ("length") where the cache ends.
            log.warning("the KV cache holds %d tokens, fewer than max_model_len %d: sequences end at %d tokens",
                        capacity, self.max_model_len, capacity)
            self.max_model_len = capacity
        self.pool = BlockPool(self.num_blocks)
        self.kv = KVCacheManager(self.pool, config.block_size, self.model_id, config.enable_prefix_caching)
        self.kv_loads = KVLoads(config.block_size)
        self.scheduler = Scheduler(self.kv, self.kv_loads, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.eos_token_ids = set(eos_token_ids(self.tokenizer, files.config, files.generation_config))
        self.stop_checker = StopChecker(self.eos_token_ids, self.max_model_len)
        # A grammar's only way to end is one of these ids, so the engine's EOS set is the grammar's.
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        # Each token's own text and bytes, for logprob entries (cached per id).
        self.token_pieces = TokenPieces(self.tokenizer)
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens_computed = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.num_guided_sequences = 0
        self.num_guided_rejected_tokens = 0
        # Sequences that received a token in the last step (finished ones included): streaming reads these.
        self.last_step_sampled: list[Sequence] = []
        # Told each step's prompt tokens before the model runs it (a serving worker borrows idle cores with it).
        self.before_model_run: Optional[Callable[[int], None]] = None
        # lend_exports(): exports lend the cache blocks themselves instead of copying them. A release may come
        # from any thread; the ids wait here (deque appends are atomic) for this engine's thread to take them.
        self._on_lent_return: Optional[Callable[[], None]] = None
        self._returned_blocks: deque[list[int]] = deque()

    @property
    def layout(self):
        return self.runner.layout

    def _default_kv_budget(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free
            # Less 2 GiB for activations and the sampler's logits.
            budget = int(total * self.config.gpu_memory_utilization) - used_by_others - 2 * 2**30
            return budget, f"gpu_memory_utilization {self.config.gpu_memory_utilization}"
        return default_cpu_budget(_available_host_memory())

    # ---- requests ------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, request_id: str, prompt: Union[str, list[int]], params: SamplingParams,
                    arrival_time: Optional[float] = None, *, produced_token_ids: Optional[list[int]] = None,
                    kv_load: Optional[KVLoad] = None, export_kv: bool = False) -> None:
        """Queues a request.

        Disaggregation hooks: `produced_token_ids` continues a sequence that already produced these tokens
        elsewhere (a prefill worker's first token, or everything a failed decode worker streamed): they count
        towards max_tokens and penalties, their text was streamed already, and their KV is computed here.
        `kv_load` brings prompt blocks received from another process, loaded at admission (kv_connector).
        `export_kv` hands the prompt's full blocks back in the RequestOutput.
        A continued sequence computes no prompt logprobs (the worker that produced its first token returned them),
        and a request for them loads no received blocks: every prompt position needs its logits.
        """
        if produced_token_ids and params.prompt_logprobs is not None:
            params = params.replace(prompt_logprobs=None)
        try:
            if request_id in self.requests:
                raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
            text, token_ids = self.validate_prompt(prompt)
            self.validate_params(params, len(token_ids))
            produced = list(produced_token_ids or [])
            self.validate_produced(produced, params)
            if kv_load is not None and params.n != 1:
                raise InvalidRequestError("a request with received KV blocks must have n = 1", "n")
            grammars = ([self.grammars.start(params.structured_output, produced) for _ in range(params.n)]
                        if params.structured_output is not None else [None] * params.n)
            self.num_guided_sequences += params.n if params.structured_output is not None else 0
        except BaseException:
            if kv_load is not None:
                kv_load.on_done(None)
            raise
        if kv_load is not None and params.prompt_logprobs is not None:
            kv_load.on_done("prompt logprobs need every prompt position computed")
            kv_load = None
        if params.min_tokens:  # the sampler keeps this model's EOS ids out of the first min_tokens tokens
            params = params.replace(_eos_token_ids=tuple(sorted(self.eos_token_ids)))
        now = arrival_time or time.monotonic()
        seqs = []
        for index in range(params.n):
            seq = Sequence(request_id, index, token_ids, params, now)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
                if not params.greedy:
                    skip_draws(seq.generator, len(produced), self.vocab_size)
            seq.output_token_ids.extend(produced)
            seq.grammar = grammars[index]
            if params.logprobs is not None:  # streamed by the worker that produced them; kept parallel here
                seq.logprobs.extend([float("nan")] * len(produced))
                seq.top_logprobs.extend([] for _ in produced)
            seq.output_text = OutputText(self.tokenizer, token_ids, params)
            seq.output_text.replay(seq.output_token_ids)  # their text was streamed by the worker that made them
            seqs.append(seq)
        if kv_load is not None:
            self.kv_loads.add(seqs[0], kv_load)
        self.requests[request_id] = _Request(request_id, text, token_ids, seqs, now, export_kv=export_kv)
        for seq in seqs:
            self.scheduler.add(seq)

    def num_cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` this engine's prefix cache holds: the rest is worth loading."""
        if not self.config.enable_prefix_caching:
            return 0
        count = 0
        while count < len(hashes) and self.pool.lookup(hashes[count]) is not None:
            count += 1
        return count

    def _export_prompt_blocks(self, seq: Sequence) -> KVExport:
        full = min(seq.num_prompt_tokens, seq.num_computed_tokens) // self.config.block_size
        hashes = chain_block_hashes(seq.prompt_token_ids[: full * self.config.block_size], self.config.block_size,
                                    self.model_id)
        block_ids = list(seq.block_ids[:full])
        if self._on_lent_return is None:
            return KVExport(hashes, export_blocks(self.runner.kv_caches, block_ids), full * self.config.block_size)
        for block_id in block_ids:
            self.pool.touch(block_id)  # lent: not freed or reused until the saver gives them back
        lent = CacheBlocks(self.runner.kv_caches, block_ids, release=lambda: self._give_back(block_ids))
        return KVExport(hashes, lent, full * self.config.block_size)

    def lend_exports(self, on_return: Callable[[], None]) -> None:
        """From now on exports lend the prompt's cache blocks (block_io.CacheBlocks) instead of copying them.

        A lent block stays referenced until the export is released (once, from any thread); `on_return` is then
        called on that thread, and the engine's own thread must call reclaim_lent_blocks() (step() also does).
        """
        self._on_lent_return = on_return

    def _give_back(self, block_ids: list[int]) -> None:
        self._returned_blocks.append(block_ids)
        if self._on_lent_return is not None:
            self._on_lent_return()

    def reclaim_lent_blocks(self) -> None:
        """Ends the references that released exports held (on the engine's thread)."""
        while self._returned_blocks:
            for block_id in self._returned_blocks.popleft():
                self.pool.release(block_id)

    def validate_prompt(self, prompt: Union[str, list[int]]) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens, but this model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate", "prompt")
        return text, token_ids

    def validate_params(self, params: SamplingParams, prompt_len: int) -> None:
        params.validate()
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.vocab_size:
                raise InvalidRequestError(f"{name} must be <= the vocabulary size {self.vocab_size}", name)

    def validate_produced(self, produced: list[int], params: SamplingParams) -> None:
        """Tokens a continued sequence already produced elsewhere (they must be this model's; one sequence)."""
        if produced and params.n != 1:
            raise InvalidRequestError("a continued request (tokens already produced) must have n = 1", "n")
        if any(not 0 <= t < self.vocab_size for t in produced):
            raise InvalidRequestError(f"produced token ids must be in [0, {self.vocab_size})", "produced_token_ids")

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the requests that finished in it."""
        self.last_step_sampled = []  # a step that schedules nothing sampled nothing: streams must not see old tokens
        self.reclaim_lent_blocks()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._load_received_blocks()
        self.num_steps += 1
        prompt_tokens = sum(max(0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens) - seq.num_computed_tokens)
                            for seq, n in zip(batch.seqs, batch.num_new_tokens))
        if self.before_model_run is not None:
            self.before_model_run(prompt_tokens)
        result = self.runner.execute(batch)
        self.num_prompt_tokens_computed += prompt_tokens
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.commit_computed(seq)
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(entries)
        out = result.output
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for i, seq in enumerate(result.sampled):
            if seq.status != SequenceStatus.RUNNING:
                continue
            seq.output_token_ids.append(out.token_ids[i])
            refused = seq.grammar is not None and not seq.grammar.accept(out.token_ids[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.num_generation_tokens += 1
            if seq.params.logprobs is not None:
                seq.logprobs.append(out.logprobs[i])
                seq.top_logprobs.append(out.top_logprobs[i])
            self.last_step_sampled.append(seq)
            seq.new_text = seq.output_text.push(seq.output_token_ids[-1])
            reason = self.stop_checker.check(seq)
            if refused:
                self.num_guided_rejected_tokens += 1
                log.error("request %s: sampled token %d is outside its grammar's mask; ending the sequence",
                          seq.request_id, out.token_ids[i])
                reason = "error"
            elif seq.grammar is not None and seq.grammar.terminated:
                reason = "stop"    # the grammar is complete (also under ignore_eos, or at max_tokens)
            if reason is not None:
                seq.end_text = seq.output_text.finish()
                if seq.stop_reason is None and seq.output_text.stop_string is not None:
                    # The end's text (an incomplete character as U+FFFD) completed a stop string.
                    reason, seq.stop_reason = "stop", seq.output_text.stop_string
                request = self.requests[seq.request_id]
                if request.export_kv and request.kv_export is None:
                    request.kv_export = self._export_prompt_blocks(seq)
                self.scheduler.finish(seq, reason)
                touched[seq.request_id] = self.requests[seq.request_id]
        finished = []
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
                finished.append(self._request_output(request))
        return finished

    def _load_received_blocks(self) -> None:
        """The worker side of the port: this step's scheduled loads, before the forward pass reads them."""
        def write(block_ids: list[int], rows: list[int], runs) -> None:
            import_runs(self.runner.kv_caches, block_ids, rows, runs, self.layout)

        for seq, num_tokens in self.kv_loads.load(write):
            self.scheduler.compute_instead(seq, num_tokens)

    def _request_output(self, request: _Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            logprobs = cumulative = None
            if seq.params.logprobs is not None:
                logprobs = []
                for token, lp, top in zip(seq.output_token_ids, seq.logprobs, seq.top_logprobs):
                    logprobs.append(logprob_entry(token, lp, top))
                cumulative = float(sum(seq.logprobs))
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.output_text.text, token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, cumulative_logprob=cumulative,
                logprobs=logprobs))
        first = request.seqs[0]
        prompt_logprobs = None
        if first.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [logprob_entry(token, lp, top) for token, (lp, top)
                                        in zip(request.prompt_token_ids[1:], first.prompt_logprobs)]
        metrics = {"arrival_time": request.arrival_time}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, True,
                             num_cached_tokens=min(s.num_cached_tokens for s in request.seqs), metrics=metrics,
                             kv_export=request.kv_export, prompt_logprobs=prompt_logprobs)

    def stats(self) -> dict[str, int]:
        return {
            "num_blocks": self.pool.num_blocks,
            "free_blocks": self.pool.num_free,
            "used_blocks": self.pool.num_used,
            "cached_blocks": self.pool.num_cached,
            "evictions": self.pool.num_evictions,
            "prefix_query_tokens": self.kv.prefix_queries_tokens,
            "prefix_hit_tokens": self.kv.prefix_hit_tokens,
            "prompt_tokens_computed": self.num_prompt_tokens_computed,
            "generation_tokens": self.num_generation_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "kv_load_failures": self.kv_loads.num_failures,
            "attention_compile_fallbacks": self.runner.backend.compile_fallbacks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "running_tokens": sum(s.num_tokens for s in self.scheduler.running),
            "waiting_tokens": sum(s.num_tokens for s in self.scheduler.waiting),
            # Prompt tokens still to compute, waiting or mid chunked prefill: the queue a new prompt waits behind.
            "queued_prompt_tokens": sum(max(0, s.num_prompt_tokens - s.num_computed_tokens)
                                        for s in (*self.scheduler.waiting, *self.scheduler.running)),
            "steps": self.num_steps,
            "guided_sequences": self.num_guided_sequences,
            "guided_rejected_tokens": self.num_guided_rejected_tokens,
        }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
