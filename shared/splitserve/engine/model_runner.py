"""Turns a scheduled step into tensors, runs the model, and picks the next tokens."""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field

import torch

from splitserve.engine.guided import GrammarMasks
from splitserve.engine.prompt_logprobs import PromptLogprob, PromptLogprobRows
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence
from splitserve.kv_blocks.layout import KVLayout
from splitserve.layers.attention import AttentionMetadata, select_backend
from splitserve.layers.packed_linear import pack_linears, packing_applies
from splitserve.layers.sampler import Sampler, SamplerOutput, SamplingRow
from splitserve.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[Sequence]
    output: SamplerOutput
    # New prompt entries of sequences that asked for prompt_logprobs and prefilled in this step.
    prompt_logprobs: list[tuple[Sequence, list[PromptLogprob]]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, block_size: int, device: torch.device, dtype: torch.dtype,
                 attention_backend: str = "auto", linear_backend: str = "auto"):
        if packing_applies(device, dtype, linear_backend):
            log.info("%d linear layers packed for oneDNN", pack_linears(model))
        self.model = model
        self.device = device
        self.dtype = dtype
        args = model.args
        self.layout = KVLayout(args.num_layers, block_size, args.num_kv_heads, args.head_dim, dtype)
        self.backend = select_backend(device, attention_backend)
        self.sampler = Sampler()
        self.grammar_masks = GrammarMasks(args.vocab_size)
        self.kv_caches: list[torch.Tensor] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        lay = self.layout
        shape = (2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
        # One tensor, a view per layer: a block's bytes across all layers can then be written in one strided copy
        # (block_io.import_blocks); each layer's view is contiguous, as the attention backends expect.
        stacked = _zeros_taken_on_write((lay.num_layers, *shape), self.dtype, self.device)
        self.kv_caches = list(stacked.unbind(0))
        self.backend.warm_up(self.kv_caches[0][0], self.kv_caches[0][1], self.model.args.num_heads)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        # Single-token rows first: the attention backends run them as one dense decode batch.
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        meta, input_ids, positions, sample_rows, sampled, prompt_rows = self._prepare(seqs, counts)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        prompt_logprobs = prompt_rows.compute(hidden, self.model.compute_logits)
        if not sampled:
            return StepResult([], SamplerOutput([], [], []), prompt_logprobs)
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        self.grammar_masks.apply(logits, [s.grammar for s in sampled])  # before the sampler: greedy obeys too
        rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in sampled]
        return StepResult(sampled, self.sampler(logits, rows), prompt_logprobs)

    def _prepare(self, seqs: list[Sequence], counts: list[int]):
        bs = self.layout.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu_seqlens = [0]
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        prompt_rows = PromptLogprobRows()
        num_decodes = 0
        for seq, n in zip(seqs, counts):
            start = seq.num_computed_tokens
            end = start + n
            tokens = seq.token_ids
            prompt_rows.add(seq, len(input_ids), start, end)
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + n)
            num_decodes += n == 1
            if end == len(tokens):
                sample_rows.append(cu_seqlens[-1] - 1)
                sampled.append(seq)
        max_blocks = max(len(s.block_ids) for s in seqs)
        tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=dev),
            num_decodes=num_decodes,
            query_lens=counts,
            context_lens_list=context_lens,
            block_size=bs,
            block_table_lists=tables,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
        return meta, ids, pos, rows, sampled, prompt_rows


def _zeros_taken_on_write(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros. On CPU in an anonymous mapping: the OS hands out zero pages as they are first written, so a KV
    cache costs RAM only for the blocks used so far (torch.zeros writes every page at start: idle workers held
    their whole budget). Zeros, not torch.empty's leftovers, because the eager decode path reads padding slots
    under a mask and 0 x NaN would still be NaN."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the mapping
