"""Offline generation in the style of vLLM: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .engine import Engine
from .outputs import Completion
from .params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path | Engine, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **engine_config):
        """A checkpoint folder, or an engine to drive; `engine_config`: fields of `EngineConfig`
        (max_num_seqs, page_size, ...) for the folder's engine."""
        self.engine = (model if isinstance(model, Engine)
                       else Engine.from_pretrained(model, device, dtype, **engine_config))
        self._ids = 0

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete each prompt (a string or a list of token ids): `n` completions of each (its
        sampling params' n), in the prompts' order, then by `index`."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        results: dict[tuple[str, int], Completion] = {}
        try:
            for prompt, p in zip(prompts, params):
                request_id = f"offline-{self._ids}"
                self._ids += 1
                prompt_ids = self.engine.add_request(request_id, prompt, p)
                results.update({(request_id, i): Completion(request_id, prompt_ids, i) for i in range(p.n)})
        except ValueError:
            for request_id, _ in results:  # all or nothing
                self.engine.abort(request_id)
            raise
        while self.engine.has_unfinished():
            for output in self.engine.step():
                results[output.request_id, output.index].add(output)
        return list(results.values())
