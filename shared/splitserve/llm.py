"""Batch generation in one process: for scripts, tests and benchmarks. The services run the same engine."""

from __future__ import annotations

import itertools
from typing import Sequence, Union

from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.sampling_params import InvalidRequestError, SamplingParams

Prompt = Union[str, list[int]]


class LLM:
    def __init__(self, model: str, **engine_settings):
        """`engine_settings`: any EngineConfig field (dtype, device, block_size, num_kv_blocks, max_num_seqs, ...)."""
        self.engine = LLMEngine(EngineConfig(model=model, **engine_settings))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the order of the prompts.

        Every prompt is validated before any is queued, so one bad prompt leaves the engine untouched.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        for prompt, params in zip(prompts, params_list):
            _, token_ids = engine.validate_prompt(prompt)
            engine.validate_params(params, len(token_ids))
        request_ids = [f"offline-{next(self._ids)}" for _ in prompts]
        results: dict[str, RequestOutput] = {}
        try:
            for request_id, prompt, params in zip(request_ids, prompts, params_list):
                engine.add_request(request_id, prompt, params)
            while engine.has_unfinished_requests():
                for output in engine.step():
                    results[output.request_id] = output
        finally:
            for request_id in request_ids:
                if request_id not in results:
                    engine.abort_request(request_id)
        return [results[r] for r in request_ids]
