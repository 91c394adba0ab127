"""Continuous batching. The scheduler owns every state change of a sequence: `schedule()` decides
what the next step runs (and advances what it computes), `update()` takes the sampled tokens and
appends them, finishes sequences and frees their cache.

Policy, first come first served:
1. Running sequences that decode (one new token) go first, oldest first. One that finds no free
   page preempts the newest running sequence, itself if it is the newest.
2. Running sequences still in their prompt get a chunk each, oldest first, as far as the step's
   token budget and the free pages go.
3. Waiting requests are admitted, oldest first, while a slot, the budget and the pages (above a
   watermark left for the running decodes) allow, their first chunk cut to the pages there are;
   never in a step that had to preempt.

A preempted sequence gives back its slot and pages and waits at the head of the queue (by
arrival) to be recomputed: prompt and generated tokens prefilled again as one prompt. Swapping
would keep its Lightning state (small, fixed size) but must also move every KV page of its
softmax layers, which grows with the context; recompute reuses the chunked prefill and needs no
second copy of the cache, and the watermark keeps preemption rare.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch

from .cache import CacheManager, PageEntry
from .detokenizer import Detokenizer
from .outputs import RequestOutput, TokenLogprob
from .params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's state. The engine makes it; from then on only the scheduler changes it."""
    request_id: str
    token_ids: list[int]  # the prompt, then the generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order: older sequences go first and are preempted last
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    detokenizer: Detokenizer | None = None  # present when the engine has a tokenizer
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys, values and state are in the cache (or scheduled into it)
    slot: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length" or "abort"

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` new tokens of `seq` from position `start` on; `sample`: they end its known tokens,
    so the step samples its next one."""
    seq: Sequence
    start: int
    num_tokens: int
    sample: bool


@dataclass
class SchedulerOutput:
    """What one step runs, and the cache decisions the model runner applies before it."""
    chunks: list[ScheduledChunk]  # single-token chunks (decodes) first, each group by arrival
    new_slots: list[int] = field(default_factory=list)  # slots handed out: their states start at zero
    new_pages: list[PageEntry] = field(default_factory=list)  # block-table entries added

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences whose next token this step samples, in the order of the logits rows."""
        return [chunk.seq for chunk in self.chunks if chunk.sample]


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: Iterable[int], watermark: float = 0.01):
        self.cache = cache
        self.max_num_seqs = min(max_num_seqs, cache.size.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.watermark_pages = math.ceil(watermark * cache.size.num_pages)
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence by request id
        self.waiting: list[Sequence] = []  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # computed so far, recomputation included
        self.num_generated_tokens = 0

    # -- requests -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self._enqueue(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request at once, freeing its slot and pages; unknown or finished ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step's chunks; every scheduled token counts as computed from here on."""
        chunks = [ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == len(seq.token_ids))
                  for seq, n in self._pick()]
        for chunk in chunks:
            seq = chunk.seq
            self.num_prompt_tokens += min(chunk.num_tokens, max(0, seq.num_prompt_tokens - seq.num_computed))
            seq.num_computed += chunk.num_tokens
        new_slots, new_pages = self.cache.take_changes()
        return SchedulerOutput(chunks, new_slots, new_pages)

    def update(self, output: SchedulerOutput, tokens: list[int],
               logprobs: list[TokenLogprob | None]) -> list[RequestOutput]:
        """Take the token sampled for each of `output.sampled` (and its log-probs if asked): append it,
        or finish the sequence at a stop token, a stop string or its length; return what each gained."""
        return [self._append(seq, token, logprob) for seq, token, logprob in zip(output.sampled, tokens, logprobs)]

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
            self._finish(seq, reason)
        text = "" if seq.detokenizer is None else seq.detokenizer.new_text(final=reason is not None)
        logprobs = None if params.logprobs is None else ([logprob] if new_ids else [])
        return RequestOutput(seq.request_id, new_ids, text, logprobs, reason, seq.num_prompt_tokens,
                             len(seq.token_ids) - seq.num_prompt_tokens, None if new_ids else logprob)

    # -- state changes --------------------------------------------------------------------------

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished with `reason`: stop, length or abort) and free its cache."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot)
            seq.slot = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        del self.requests[seq.request_id]
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.slot)
        seq.slot, seq.num_computed, seq.status = None, 0, Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def admit(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting sequence a slot and pages for `num_tokens` tokens and start running it."""
        self.waiting.remove(seq)
        seq.slot, seq.status = self.cache.allocate_slot(), Status.RUNNING
        self.cache.reserve(seq.slot, num_tokens)
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def _pick(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens) for the next step, single-token ones first."""
        cache = self.cache
        preempted = False
        while True:
            budget = self.max_num_batched_tokens
            scheduled: list[tuple[Sequence, int]] = []
            for seq in list(self.running):  # 1. decodes
                if seq.status != Status.RUNNING or seq.num_uncomputed != 1 or budget == 0:
                    continue
                while cache.reserve(seq.slot, seq.num_computed + 1) <= seq.num_computed:
                    self._preempt(self.running[-1])
                    preempted = True
                    if seq.status != Status.RUNNING:
                        break
                else:
                    scheduled.append((seq, 1))
                    budget -= 1
            for seq in self.running:  # 2. prompt chunks
                if seq.num_uncomputed <= 1 or budget == 0:
                    continue
                wanted = seq.num_computed + min(seq.num_uncomputed, budget)
                num_tokens = min(cache.reserve(seq.slot, wanted), wanted) - seq.num_computed
                if num_tokens > 0:
                    scheduled.append((seq, num_tokens))
                    budget -= num_tokens
            if scheduled or not self.running:
                break
            self._preempt(self.running[-1])  # every running sequence waits for pages: make room
            preempted = True
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3.
            seq = self.waiting[0]
            free_pages = cache.num_free_pages - (self.watermark_pages if self.running else 0)
            num_tokens = min(seq.num_uncomputed, budget, free_pages * cache.page_size)
            if num_tokens <= 0:
                break
            self.admit(seq, num_tokens)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        scheduled.sort(key=lambda item: item[1] > 1)  # stable: decodes first, each group by arrival
        return scheduled
