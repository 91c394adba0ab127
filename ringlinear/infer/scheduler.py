"""Continuous batching: which sequences run in the next step, and with how many new tokens.

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
from dataclasses import dataclass
from enum import Enum

import torch

from .cache import CachePool
from .detokenizer import Detokenizer
from .params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # the prompt, then the generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order: older sequences go first and are preempted last
    generator: torch.Generator | None = None  # the request's own, when it has a seed
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys, values and state are in the cache
    slot: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length" or "abort"
    detokenizer: Detokenizer | None = None  # present when the engine has a tokenizer

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


class Scheduler:
    def __init__(self, pool: CachePool, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01):
        self.pool = pool
        self.max_num_seqs = min(max_num_seqs, pool.size.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_pages = math.ceil(watermark * pool.size.num_pages)
        self.waiting: list[Sequence] = []  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """Remove a sequence (finished with `reason`, or aborted when None) and free its cache."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.pool.free(seq.slot)
            seq.slot = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.slot)
        seq.slot, seq.num_computed, seq.status = None, 0, Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def admit(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting sequence a slot and pages for `num_tokens` tokens and start running it."""
        self.waiting.remove(seq)
        seq.slot, seq.status = self.pool.allocate_slot(), Status.RUNNING
        self.pool.reserve(seq.slot, num_tokens)
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of new tokens) for the next step, single-token ones first."""
        preempted = False
        while True:
            budget = self.max_num_batched_tokens
            scheduled: list[tuple[Sequence, int]] = []
            for seq in list(self.running):  # 1. decodes
                if seq.status != Status.RUNNING or seq.num_uncomputed != 1 or budget == 0:
                    continue
                while self.pool.reserve(seq.slot, seq.num_computed + 1) <= seq.num_computed:
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
                num_tokens = min(self.pool.reserve(seq.slot, wanted), wanted) - seq.num_computed
                if num_tokens > 0:
                    scheduled.append((seq, num_tokens))
                    budget -= num_tokens
            if scheduled or not self.running:
                break
            self._preempt(self.running[-1])  # every running sequence waits for pages: make room
            preempted = True
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3.
            seq = self.waiting[0]
            free_pages = self.pool.num_free_pages - (self.watermark_pages if self.running else 0)
            num_tokens = min(seq.num_uncomputed, budget, free_pages * self.pool.page_size)
            if num_tokens <= 0:
                break
            self.admit(seq, num_tokens)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        scheduled.sort(key=lambda item: item[1] > 1)  # stable: decodes first, each group by arrival
        return scheduled
