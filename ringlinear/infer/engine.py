"""The inference engine: requests in, tokens out, one scheduled step at a time.

Each `step()` asks the scheduler which sequences run and with how many new tokens, packs them
into one forward (`StepBatch`, `PagedContext`), replays a CUDA graph when the step is a pure
decode that fits one, samples the sequences whose prompt is complete and hands back what every
request gained. The same code runs on the CPU, without graphs.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import load_tokenizer
from ..model import RingLinearForCausalLM, SequenceContext
from ..ops.batch_invariant import KEY_BLOCK, batch_invariant
from ..sampling import apply_penalties, sample, token_logprobs
from .cache import CachePool, CacheSize, size_cache
from .context import PagedContext, StepBatch
from .detokenizer import Detokenizer
from .graphs import DecodeGraphs
from .outputs import RequestOutput, TokenLogprob
from .params import InvalidRequest, SamplingParams
from .scheduler import Scheduler, Sequence

CPU_CACHE_MEMORY = 2 * 2**30  # at most, on the CPU: a quarter of the available memory below that


@dataclass
class EngineConfig:
    max_num_seqs: int = 256  # sequences running at once (each holds a state slot)
    max_num_batched_tokens: int = 4096  # tokens of one step: the prefill chunk size
    page_size: int = 64  # tokens per KV page
    max_model_len: int | None = None  # default: the model's max_position_embeddings (capped by the cache)
    cache_memory: int | None = None  # bytes for the cache; default: what the GPU has left, see below
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may fill, weights included
    num_pages: int | None = None  # fixes the number of KV pages instead (tests use it to force preemption)
    cuda_graphs: bool = True  # used on CUDA with bf16 weights
    backend: str = "auto"  # kernels: "auto" (Triton on CUDA), "torch" (references; no graphs) or "triton"
    seed: int = 0  # of the generator shared by requests without a seed
    # Steps and log-probs under `batch_invariant()`: bit-identical to the training forward of the same
    # model under it, whatever shares the step (no CUDA graphs; page_size a multiple of KEY_BLOCK).
    batch_invariant: bool = False


class Engine:
    def __init__(self, model: RingLinearForCausalLM, tokenizer=None, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Captured decode steps need a forward that never waits for the host: the Triton kernels and
        # the experts' grouped GEMM (bf16).
        self.use_graphs = (self.device.type == "cuda" and self.dtype == torch.bfloat16 and config.cuda_graphs
                           and config.backend != "torch" and not config.batch_invariant)
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1 or config.page_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and page_size must be positive")
        if config.batch_invariant and config.page_size % KEY_BLOCK:
            raise ValueError(f"batch_invariant needs a page_size that is a multiple of {KEY_BLOCK}, "
                             f"got {config.page_size}")
        max_model_len = config.max_model_len or model.config.max_position_embeddings
        if config.num_pages is not None:
            size = CacheSize(config.max_num_seqs, config.num_pages, config.page_size)
        else:
            size = size_cache(model.config, self.dtype, self._cache_memory(), config.max_num_seqs, config.page_size,
                              max_model_len)
        self.max_model_len = min(max_model_len, size.capacity_tokens)
        max_pages = -(-self.max_model_len // size.page_size)
        self.pool = CachePool(model.config, size, max_pages, self.device, self.dtype)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.graphs = None
        if self.use_graphs:
            self.graphs = DecodeGraphs(model, self.pool, self.scheduler.max_num_seqs, config.backend)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.eos_token_ids = set(model.config.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_prompt_tokens = 0  # computed so far, recomputation included
        self.num_generated_tokens = 0

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **config) -> Engine:
        """Model and tokenizer (when the directory has one) of a checkpoint directory."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = RingLinearForCausalLM.from_pretrained(directory, device=device, dtype=dtype)
        tokenizer = load_tokenizer(directory) if Path(directory, "tokenizer.json").exists() else None
        return cls(model, tokenizer, EngineConfig(**config))

    @torch.no_grad()
    def _cache_memory(self) -> int:
        """Bytes for the cache. On a GPU: the share the engine may fill, less what is in use, the
        peak of one full step's activations (measured) and the sampler's logits; on the CPU a quarter
        of the available memory, at most CPU_CACHE_MEMORY."""
        config = self.config
        if config.cache_memory is not None:
            return config.cache_memory
        if self.device.type != "cuda":
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return min(CPU_CACHE_MEMORY, available // 4)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        tokens = torch.zeros(1, config.max_num_batched_tokens, dtype=torch.long, device=self.device)
        self.model(tokens, context=SequenceContext(backend=config.backend), logits_to_keep=1)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        activations *= 2 if self.use_graphs else 1  # the graphs' memory pool is their own
        free, total = torch.cuda.mem_get_info(self.device)
        logits = 4 * config.max_num_seqs * self.model.config.vocab_size * 4  # logits, sorted copies, noise
        return int(total * config.gpu_memory_utilization - (total - free) - activations - logits)

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt", "this model has no tokenizer: give the prompt as token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest (naming the field) for a request this engine can never serve."""
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest("prompt", f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest("prompt", f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                 f"{self.max_model_len} tokens, and at least one must be left to generate")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest("max_tokens", f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} "
                                 f"tokens exceed this model's context of {self.max_model_len} tokens")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop", "stop strings need a tokenizer, and this model has none")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Queue a request; returns its prompt token ids."""
        if request_id in self._sequences:
            raise InvalidRequest("request_id", f"request {request_id!r} is already running")
        params.validate()
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params, next(self._arrivals), generator)
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(self.tokenizer, prompt_ids, params.stop)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Drop a request at once, freeing its slot and pages; unknown or finished ids are ignored."""
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def abort_all(self) -> list[str]:
        """Drop every request; returns their ids."""
        request_ids = list(self._sequences)
        for request_id in request_ids:
            self.abort(request_id)
        return request_ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.pool.flush()
        batch = StepBatch.build([s.token_ids for s, _ in scheduled], [s.num_computed for s, _ in scheduled],
                                [n for _, n in scheduled], [s.slot for s, _ in scheduled], self.pool)
        for seq, n in scheduled:
            self.num_prompt_tokens += min(n, max(0, seq.num_prompt_tokens - seq.num_computed))
            seq.num_computed += n
        ready = [seq for seq, _ in scheduled if seq.num_computed == len(seq.token_ids)]
        with batch_invariant(self.config.batch_invariant):
            tokens, logprobs = self._sample(ready, self._forward(batch))
        return [self._append(seq, token, logprob) for seq, token, logprob in zip(ready, tokens, logprobs)]

    @torch.no_grad()
    def _forward(self, batch: StepBatch) -> Tensor:
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        batch = batch.to(self.device)
        context = PagedContext(self.pool, batch, self.config.backend)
        return self.model(batch.input_ids[None], context=context, logits_indices=batch.logits_indices).logits[0]

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        params = [s.params for s in seqs]
        if all(p.greedy and not p.penalised for p in params):
            tokens = logits.argmax(-1)
        else:
            def per_row(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
                return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=logits.device)

            processed = logits
            if any(p.penalised for p in params):
                counts, seen = self._token_counts(seqs, logits.shape[-1])
                processed = apply_penalties(logits, counts, seen, per_row("repetition_penalty"),
                                            per_row("presence_penalty"), per_row("frequency_penalty"))
            tokens = sample(processed, per_row("temperature"), per_row("top_k", torch.long), per_row("top_p"),
                            self.generator, min_p=per_row("min_p"),
                            row_generators={i: s.generator for i, s in enumerate(seqs) if s.generator})
        token_list = tokens.tolist()
        num_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if num_top is None:
            return token_list, [None] * len(seqs)
        chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(logits, tokens, num_top))
        logprobs = [None if p.logprobs is None else
                    TokenLogprob(token, chosen[i], list(zip(top_ids[i][:p.logprobs], top_values[i][:p.logprobs])))
                    for i, (p, token) in enumerate(zip(params, token_list))]
        return token_list, logprobs

    def _token_counts(self, seqs: list[Sequence], vocab: int) -> tuple[Tensor, Tensor]:
        """[N, V] counts of each generated token and whether each token was seen (prompt or output)."""
        counts = torch.zeros(len(seqs), vocab, device=self.device)
        seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=self.device)
        for i, seq in enumerate(seqs):
            if seq.params.penalised:
                output = torch.tensor(seq.output_ids, dtype=torch.long, device=self.device)
                counts[i].index_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
                seen[i, torch.tensor(seq.token_ids, device=self.device)] = True
        return counts, seen

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        params = seq.params
        new_ids: list[int] = []
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"  # the stop token itself is not part of the output
        else:
            seq.token_ids.append(token)
            new_ids.append(token)
            self.num_generated_tokens += 1
            if seq.detokenizer is not None and seq.detokenizer.add(token):
                reason = "stop"
            elif len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens:
                reason = "length"
        if reason is not None:
            self._sequences.pop(seq.request_id)
            self.scheduler.finish(seq, reason)
        text = "" if seq.detokenizer is None else seq.detokenizer.new_text(final=reason is not None)
        logprobs = None if params.logprobs is None else ([logprob] if new_ids else [])
        return RequestOutput(seq.request_id, new_ids, text, logprobs, reason, seq.num_prompt_tokens,
                             len(seq.token_ids) - seq.num_prompt_tokens, None if new_ids else logprob)

    # -- state ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        slots, pages = self.pool.usage()
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "slot_usage": slots, "page_usage": pages, "preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.num_prompt_tokens, "generated_tokens": self.num_generated_tokens}
