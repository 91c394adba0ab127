"""The inference engine: requests in, tokens out, one scheduled step at a time.

Three parts, as in vLLM's v1 engine core: the `Scheduler` owns every sequence and its cache
bookkeeping (what runs next, then the sampled tokens appended, stops, frees), the `ModelRunner`
turns a scheduled step into one packed forward against the paged cache (replaying a CUDA graph
for a pure decode step that fits one), and the `Sampler` picks each sampled sequence's next token.
`step()` is schedule → execute → sample → update. The same code runs on the CPU, without graphs.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_tokenizer
from ..model import RingLinearForCausalLM, SequenceContext
from ..model.fp8 import QUANTIZATIONS, is_fp8_checkpoint, quantize_weights
from ..ops.policy import Backend, KernelPolicy
from .cache import CacheManager, fixed_cache_size, size_cache
from .detokenizer import Detokenizer
from .model_runner import ModelRunner
from .outputs import RequestOutput
from .params import InvalidRequest, SamplingParams
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput, Sequence
from .spec.config import SpeculativeConfig
from .spec.drafting import Speculator
from .spec.tree import path_parents

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
    backend: Backend = "auto"  # kernels (`ops.policy`): "auto" (Triton on CUDA), "torch" (references), "triton"
    seed: int = 0  # of the generator shared by requests without a seed
    enable_prefix_caching: bool = True  # reuse the pages and Lightning states of cached prompt prefixes
    # Lightning states are kept every `prefix_snapshot_interval` tokens (a multiple of page_size; default
    # 16 pages) of a cached prefix, in `prefix_snapshot_share` of the cache memory (or `num_snapshots`
    # of them when num_pages fixes the cache)
    prefix_snapshot_interval: int | None = None
    prefix_snapshot_share: float = 0.1
    num_snapshots: int | None = None
    # Steps and log-probs batch-invariant: bit-identical to the training forward of the same model under
    # an invariant policy, whatever shares the step, graphs' padding rows included (any page_size: the
    # attention's key blocks are read through the page table).
    batch_invariant: bool = False
    # "fp8": the linear layers and experts in blockwise FP8 (`model.fp8`), quantized at load unless the
    # checkpoint holds FP8 weights already (which load as FP8 whatever this says).
    quantization: str = "none"
    # Speculative decoding, vLLM's dict (or its JSON text): {"method": "mtp" | "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_min"/"prompt_lookup_max": n-gram lengths,
    # "speculative_token_tree": a tree shape instead of a chain, e.g. "[(0,), (1,), (0, 0)]"}; None: off
    speculative_config: SpeculativeConfig | dict | str | None = None

    def validate(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.page_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and page_size must be positive")
        if not 0 <= self.prefix_snapshot_share < 1:
            raise ValueError(f"prefix_snapshot_share must be in [0, 1), got {self.prefix_snapshot_share}")
        if self.snapshot_interval % self.page_size or self.snapshot_interval < 1:
            raise ValueError(f"prefix_snapshot_interval must be a positive multiple of page_size ({self.page_size}), "
                             f"got {self.prefix_snapshot_interval}")
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)


    @property
    def snapshot_interval(self) -> int:
        return self.prefix_snapshot_interval or 16 * self.page_size

    def snapshot_args(self) -> tuple[float, int]:
        """(share of the cache memory, interval) for the snapshots; none without prefix caching."""
        return (self.prefix_snapshot_share if self.enable_prefix_caching else 0.0), self.snapshot_interval


class Engine:
    def __init__(self, model: RingLinearForCausalLM, tokenizer=None, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        config.validate()
        if config.batch_invariant and model.config.attention_type == "mla":
            raise ValueError("batch_invariant: an MLA model's absorbed attention cannot give the training "
                             "forward's bits; run it with batch_invariant=False")
        param = model.model.word_embeddings.weight  # the compute dtype (not the e4m3 of FP8 weights)
        self.device, self.dtype = param.device, param.dtype
        self.policy = KernelPolicy(config.backend, config.batch_invariant).resolve(self.device)
        if config.quantization == "fp8":
            quantize_weights(model, self.policy)
        # Captured decode steps need a forward that never waits for the host: the Triton kernels and
        # the experts' grouped GEMMs (bf16, or FP8 for e4m3 weights; the FP8 linear layers' one-time
        # cuBLAS probe runs in the eager forward before each capture). In invariant mode every kernel
        # computes a row whatever the rows beside it, so a graph's padding rows leave the real rows' bits
        # as an uncaptured step gives them; FP8 experts there loop, reading the counts on the host.
        use_graphs = (self.device.type == "cuda" and self.dtype == torch.bfloat16 and config.cuda_graphs
                      and self.policy.backend == "triton"
                      and not (self.policy.invariant and is_fp8_checkpoint(model.config)))
        max_model_len = config.max_model_len or model.config.max_position_embeddings
        share, interval = config.snapshot_args()
        if config.num_pages is not None:
            snapshots = 64 if config.num_snapshots is None else config.num_snapshots
            size = fixed_cache_size(config.max_num_seqs, config.num_pages, config.page_size, max_model_len,
                                    snapshots if config.enable_prefix_caching else 0, interval)
        else:
            memory = self._cache_memory(use_graphs, max_model_len)
            size = size_cache(model.config, self.dtype, memory, config.max_num_seqs, config.page_size, max_model_len,
                              share, interval)
        self.max_model_len = min(max_model_len, size.capacity_tokens)
        has_state = "linear" in model.config.layer_types
        cache = CacheManager(size, config.enable_prefix_caching, has_state)
        self.scheduler = Scheduler(cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   model.config.eos_token_ids)
        spec = config.speculative_config
        verify_shapes = () if spec is None else (path_parents(spec.paths),)  # the full tree every drafter fills
        self.runner = ModelRunner(model, size, self.policy, use_graphs, self.scheduler.max_num_seqs,
                                  config.max_num_batched_tokens, verify_shapes)
        self.sampler = Sampler(self.policy, self.device, config.seed)
        self.speculator = None if spec is None else Speculator(spec, model, self.policy)
        self._arrivals = itertools.count()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **config) -> Engine:
        """Model and tokenizer (when the directory has one) of a checkpoint directory."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = RingLinearForCausalLM.from_pretrained(directory, device=device, dtype=dtype)
        tokenizer = load_tokenizer(directory) if Path(directory, "tokenizer.json").exists() else None
        return cls(model, tokenizer, EngineConfig(**config))

    @torch.no_grad()
    def _cache_memory(self, use_graphs: bool, max_model_len: int) -> int:
        """Bytes for the cache. On a GPU: the share the engine may fill, less what is in use, the
        peak of one full step's activations (measured), an MLA model's longest context decompressed
        into heads (a long prompt chunk's attention) and the sampler's logits; on the CPU a quarter
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
        self.model(tokens, context=SequenceContext(policy=self.policy), logits_to_keep=1)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        activations *= 2 if use_graphs else 1  # the graphs' memory pool is their own
        c = self.model.config
        if c.attention_type == "mla":  # keys and values of every head, with the products making them
            per_token = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
            activations += 2 * max_model_len * per_token * self.dtype.itemsize
        free, total = torch.cuda.mem_get_info(self.device)
        # logits, sorted copies, noise; a verify step's logits are every row of every sequence's tree
        spec = config.speculative_config
        rows = config.max_num_seqs * (1 if spec is None else 1 + len(spec.paths))
        logits = 4 * rows * self.model.config.vocab_size * 4
        return int(total * config.gpu_memory_utilization - (total - free) - activations - logits)

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt", "this model has no tokenizer: give the prompt as token ids")
            # encode_batch releases the GIL (encode holds it): a long prompt tokenized on a worker
            # thread does not stop the server's event loop
            return self.tokenizer.encode_batch([prompt], add_special_tokens=False)[0].ids
        return list(prompt)

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids ("" without a tokenizer), special tokens left out as in outputs."""
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)

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
        if not all(t < vocab for t in params.stop_token_ids):
            raise InvalidRequest("stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop", "stop strings need a tokenizer, and this model has none")
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequest("n", f"n={params.n} is more than the {self.scheduler.max_num_seqs} sequences "
                                 "this engine runs at once")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Queue a request; returns its prompt token ids."""
        if request_id in self.scheduler.requests:
            raise InvalidRequest("request_id", f"request {request_id!r} is already running")
        params.validate()
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        generator = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        detokenizer = None if self.tokenizer is None else Detokenizer(self.tokenizer, prompt_ids, params.stop)
        self.scheduler.add(Sequence(request_id, list(prompt_ids), len(prompt_ids), params, next(self._arrivals),
                                    generator, detokenizer))
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Drop a request at once, freeing its slot and pages; unknown or finished ids are ignored."""
        self.scheduler.abort(request_id)

    def abort_all(self) -> list[str]:
        """Drop every request; returns their ids."""
        request_ids = list(self.scheduler.requests)
        for request_id in request_ids:
            self.abort(request_id)
        return request_ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; what every request whose next token it sampled gained."""
        output = self.scheduler.schedule()
        if not output.chunks:
            return []
        speculator = self.speculator
        result = self.runner.execute(output, hidden_states=speculator is not None and speculator.needs_hidden_states)
        rows = output.sample_rows
        logits = result.logits if len(rows) == result.logits.shape[0] else result.logits[rows]
        tokens, logprobs = self.sampler(logits, output.sampled)
        verified = self.sampler.verify(result.logits, output.verifies)
        accepted = [v.path for v in verified]
        self.runner.fold(output, accepted)
        outputs = self.scheduler.update(output, tokens, logprobs, self._prompt_logprobs(output, result.hidden_states),
                                        [(v.tokens, v.logprobs) for v in verified])
        if speculator is not None:
            self.scheduler.set_drafts(speculator.propose(output, result.hidden_states, accepted))
        return outputs

    def _prompt_logprobs(self, output: SchedulerOutput, hidden: torch.Tensor | None) -> dict[int, list]:
        """By chunk index, the log-probs of the prompt tokens its rows predict, where asked."""
        values, row = {}, 0
        for i, chunk in enumerate(output.chunks):
            positions = chunk.prompt_logprob_positions()
            if positions:
                rows = torch.arange(row + positions.start - chunk.start, row + positions.stop - chunk.start,
                                    device=self.device)
                targets = torch.tensor(chunk.seq.token_ids[positions.start + 1:positions.stop + 1], device=self.device)
                values[i] = self.sampler.prompt_logprobs(self.model.lm_head, hidden, rows, targets,
                                                         chunk.seq.params.prompt_logprobs)
            row += chunk.num_tokens
        return values

    def warm_up(self) -> float:
        """Run the step shapes serving meets once, so that no request waits for their kernels to
        compile: a whole chunk of one prompt, a chunk packed with many prompts, a lone short prompt,
        mixed prefill and decode steps, decodes. Then forget them (cache and counters); returns the
        seconds it took."""
        start = time.perf_counter()
        budget, vocab = self.config.max_num_batched_tokens, self.model.config.vocab_size
        short = max(1, min(1024, budget // 8))
        waves = ([budget], [short] * min(self.scheduler.max_num_seqs, budget // short), [short, 97, 3])
        generator = torch.Generator().manual_seed(0)
        for wave, lengths in enumerate(waves):
            for i, n in enumerate(lengths):
                n = max(1, min(n, self.max_model_len - 4))
                prompt = torch.randint(1, vocab, (n,), generator=generator).tolist()
                self.add_request(f"warm-up-{wave}-{i}", prompt, SamplingParams(max_tokens=3, temperature=0,
                                                                                ignore_eos=True))
                if wave == 2:  # the next prompt joins while this one decodes
                    self.step()
            while self.has_unfinished():
                self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.scheduler.reset_counters()
        return time.perf_counter() - start

    def stats(self) -> dict[str, float]:
        scheduler = self.scheduler
        slots, pages = scheduler.cache.usage()
        cache = scheduler.cache
        return {"waiting": len(scheduler.waiting), "running": len(scheduler.running), "slot_usage": slots,
                "page_usage": pages, "preemptions": scheduler.num_preemptions,
                "prompt_tokens": scheduler.num_prompt_tokens, "generated_tokens": scheduler.num_generated_tokens,
                "prefix_cache_queries": cache.num_queried_tokens, "prefix_cache_hits": cache.num_hit_tokens,
                "snapshot_bytes": cache.num_snapshots_used * self.runner.cache.snapshot_bytes,
                "spec_draft_tokens": scheduler.num_draft_tokens, "spec_accepted_tokens": scheduler.num_accepted_tokens}
