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

Prefix caching (`cache.prefix_caching`): an admitted sequence first takes the longest cached
prefix of its tokens (pages and a Lightning-state snapshot) and computes only the rest; a recomputed
one usually finds its own pages there. Every chunk registers the full pages it computes, and asks for
a snapshot at each snapshot position it reaches; both become visible to admissions from the next
step on, when they are written.

Parallel sampling (`n > 1`): the step that completes the prompt forks `n - 1` more sequences from
it, sampled from the same logits row; they share its full pages and copy its state and partial page.

Speculative decoding: a decoding sequence with drafts (`set_drafts`: a draft tree, a chain being a
tree of one branch) gets a verify chunk instead, its last sampled token (the root) and its draft
nodes, in pages reserved for all of them (node i's keys and values at position prefix + i). The
drafts never enter `token_ids` until the target accepts them, so preemption and recompute are
unchanged; `update` appends the accepted path and the token after it, counts the accepted as computed
(the runner has folded them into the states and moved their keys and values to consecutive positions),
registers their pages, snapshots the state at a snapshot position they reach, and gives back the
pages past them. A verify chunk ends at the next snapshot position at the latest, so that one is
reached only as the state after every accepted token, which is the only state the step leaves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from .cache import CacheChanges, CacheManager, page_hashes
from .detokenizer import Detokenizer
from .outputs import RequestOutput, TokenLogprob
from .params import SamplingParams
from .spec.tree import DraftTree


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
    index: int = 0  # which of the request's `n` completions
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys, values and state are in the cache (or scheduled into it)
    slot: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_forks: int = 0  # sequences still to fork when the prompt is complete (n - 1 for the first)
    page_hashes: list[bytes] = field(default_factory=list)  # of its full pages so far
    num_registered_pages: int = 0  # pages of this sequence's slot offered to the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # [None] + one per prompt token after the first
    prompt_logprobs_sent: bool = False
    drafts: DraftTree = DraftTree()  # proposed tokens after the last one, to verify next

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` new tokens of `seq` from position `start` on; `sample`: they end its known tokens,
    so the step samples its next one (and that of the sequences in `forks`, from the same row).
    `snapshots`: (position, snapshot) pairs, the state after `position` tokens to save."""
    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    snapshots: tuple[tuple[int, int], ...] = ()
    forks: tuple[Sequence, ...] = ()
    drafts: tuple[int, ...] = ()  # a verify chunk: its token at `start` (the root), then these draft nodes
    draft_parents: tuple[int, ...] = ()  # each node's parent: 0 the root, j the j-th draft

    @property
    def tree_parents(self) -> list[int]:
        """The parent of every row of a verify chunk (-1 for the root), as `ops.tree` takes them."""
        return [-1, *self.draft_parents]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def num_logits(self) -> int:
        """Rows of the step's logits it takes: every row of a verify chunk, the last of a sampling one."""
        return self.num_tokens if self.drafts else int(self.sample)

    def input_ids(self) -> list[int]:
        if self.drafts:
            return [self.seq.token_ids[self.start], *self.drafts]
        return self.seq.token_ids[self.start:self.end]

    def prompt_logprob_positions(self) -> range:
        """Positions of this chunk whose next token is a prompt token whose log-prob is asked and not
        yet known."""
        seq = self.seq
        if seq.prompt_logprobs is None:
            return range(0)
        return range(max(self.start, len(seq.prompt_logprobs) - 1), min(self.end, seq.num_prompt_tokens - 1))


@dataclass
class SchedulerOutput:
    """What one step runs, and the cache decisions the model runner applies around it."""
    chunks: list[ScheduledChunk]  # single-token chunks (decodes) first, each group by arrival
    changes: CacheChanges = field(default_factory=CacheChanges)

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences whose next token this step samples plainly (forks right after their parent)."""
        return [s for chunk in self.chunks if chunk.sample and not chunk.drafts for s in (chunk.seq, *chunk.forks)]

    def _first_logit_rows(self) -> list[int]:
        return np.cumsum([0] + [chunk.num_logits for chunk in self.chunks])[:-1].tolist()

    @property
    def sample_rows(self) -> list[int]:
        """For each of `sampled`, its row of the step's logits."""
        return [row for row, chunk in zip(self._first_logit_rows(), self.chunks) if chunk.sample and not chunk.drafts
                for _ in range(1 + len(chunk.forks))]

    @property
    def verifies(self) -> list[tuple[ScheduledChunk, int]]:
        """The verify chunks and the first of their rows of the step's logits."""
        return [(chunk, row) for row, chunk in zip(self._first_logit_rows(), self.chunks) if chunk.drafts]


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: Iterable[int], watermark: float = 0.01):
        self.cache = cache
        self.max_num_seqs = min(max_num_seqs, cache.size.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.watermark_pages = math.ceil(watermark * cache.size.num_pages)
        self.requests: dict[str, list[Sequence]] = {}  # every request's unfinished sequences
        self.waiting: list[Sequence] = []  # by arrival
        self.running: list[Sequence] = []  # by arrival
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # computed so far, recomputation included
        self.num_generated_tokens = 0
        self.num_draft_tokens = 0  # verified
        self.num_accepted_tokens = 0  # of those, accepted

    # -- requests -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.num_forks = seq.params.n - 1
        if seq.params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self.requests.setdefault(seq.request_id, []).append(seq)
        self._enqueue(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request at once, freeing its slots and pages; unknown or finished ids are ignored."""
        for seq in list(self.requests.get(request_id, ())):
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def set_drafts(self, drafts: dict[Sequence, DraftTree]) -> None:
        """Tokens proposed to follow each running sequence's last one, verified by its next step."""
        for seq, proposed in drafts.items():
            seq.drafts = proposed

    def reset_counters(self) -> None:
        """Start the counters and the prefix cache afresh (when nothing runs)."""
        self.cache.reset_prefix_cache()
        self.num_preemptions = self.num_prompt_tokens = self.num_generated_tokens = 0
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self.cache.num_queried_tokens = self.cache.num_hit_tokens = 0

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step's chunks; every scheduled token counts as computed from here on."""
        chunks = []
        for seq, num_tokens, drafts in self._pick():
            # a verify chunk computes its root for sure; its drafts count once accepted (`update`)
            start, end = seq.num_computed, seq.num_computed + num_tokens - len(drafts)
            sample = end == len(seq.token_ids)
            snapshots = self._offer_to_cache(seq, start, end) if self.cache.prefix_caching else ()
            forks = self._fork(seq, end) if sample and seq.num_forks else ()
            chunks.append(ScheduledChunk(seq, start, num_tokens, sample, snapshots, forks, drafts.tokens,
                                         drafts.parents))
            self.num_prompt_tokens += min(num_tokens, max(0, seq.num_prompt_tokens - start))
            self.num_draft_tokens += len(drafts)
            seq.num_computed = end
        return SchedulerOutput(chunks, self.cache.take_changes())

    def update(self, output: SchedulerOutput, tokens: list[int], logprobs: list[TokenLogprob | None],
               prompt_logprobs: dict[int, list[TokenLogprob]] | None = None,
               verified: list[tuple[list[int], list[TokenLogprob | None]]] = ()) -> list[RequestOutput]:
        """Take the token sampled for each of `output.sampled` (and its log-probs if asked): append it,
        or finish the sequence at a stop token, a stop string or its length; return what each gained.
        `prompt_logprobs`: by chunk index, the log-probs of the prompt tokens its positions predict.
        `verified`: for each of `output.verifies`, the drafts it accepted and the token after them
        (with their log-probs)."""
        for i, values in (prompt_logprobs or {}).items():
            seq = output.chunks[i].seq
            seq.prompt_logprobs.extend(values)
        outputs = [self._append(seq, [token], [logprob])
                   for seq, token, logprob in zip(output.sampled, tokens, logprobs)]
        for (chunk, _), (emitted, emitted_logprobs) in zip(output.verifies, verified):
            self.num_accepted_tokens += len(emitted) - 1
            outputs.append(self._append(chunk.seq, emitted, emitted_logprobs, num_accepted=len(emitted) - 1))
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], token_logprobs: list[TokenLogprob | None],
                num_accepted: int | None = None) -> RequestOutput:
        """Append `tokens` up to a stop; after a verify chunk, the first `num_accepted` are its
        accepted drafts, computed already."""
        params = seq.params
        new_ids: list[int] = []
        reason = stop_logprob = None
        seq.drafts = DraftTree()
        for token, logprob in zip(tokens, token_logprobs):
            if params.max_tokens == 0:
                reason = "length"  # a prompt scored for its log-probs only
            elif (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
                reason, stop_logprob = "stop", logprob  # the stop token itself is not part of the output
            else:
                seq.token_ids.append(token)
                new_ids.append(token)
                self.num_generated_tokens += 1
                if seq.detokenizer is not None and seq.detokenizer.add(token):
                    reason = "stop"
                elif len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens:
                    reason = "length"
            if reason is not None:
                break
        if num_accepted is not None:
            self._accept(seq, min(num_accepted, len(new_ids)))
        if reason is not None:
            self._finish(seq, reason)
        text = "" if seq.detokenizer is None else seq.detokenizer.new_text(final=reason is not None)
        logprobs = None if params.logprobs is None else token_logprobs[:len(new_ids)]
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(seq.request_id, new_ids, text, logprobs, reason, seq.num_prompt_tokens,
                             len(seq.token_ids) - seq.num_prompt_tokens, stop_logprob, seq.index, prompt_logprobs)

    def _accept(self, seq: Sequence, num_accepted: int) -> None:
        """The verified drafts just appended are computed: register their pages, snapshot the state
        after them if they end at a snapshot position, and give back the pages past them."""
        start = seq.num_computed
        seq.num_computed += num_accepted
        if self.cache.prefix_caching:
            for _, snapshot in self._offer_to_cache(seq, start, seq.num_computed):
                self.cache.save_state(seq.slot, snapshot)
        self.cache.trim(seq.slot, seq.num_computed + 1)

    def _draft_limit(self, seq: Sequence, budget: int) -> int:
        """How many of its draft nodes a decoding sequence may verify (the first ones: a tree still):
        what its length, the step's token budget and the next snapshot position leave room for."""
        limit = min(len(seq.drafts), seq.params.max_tokens - len(seq.output_ids) - 1, budget - 1)
        interval = self.cache.snapshot_interval if self.cache.prefix_caching else 0
        if interval:
            limit = min(limit, (seq.num_computed // interval + 1) * interval - seq.num_computed - 1)
        return max(limit, 0)

    # -- state changes --------------------------------------------------------------------------

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: (s.arrival, s.index))

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished with `reason`: stop, length or abort) and free its cache."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot)
            seq.slot = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        siblings = self.requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self.requests[seq.request_id]
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.slot)
        seq.slot, seq.num_computed, seq.status = None, 0, Status.WAITING
        seq.num_registered_pages, seq.drafts = 0, DraftTree()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _start(self, seq: Sequence, slot: int) -> None:
        seq.slot, seq.status = slot, Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: (s.arrival, s.index))

    def admit(self, seq: Sequence, num_tokens: int) -> None:
        """Give a waiting sequence a slot and pages for `num_tokens` tokens and start running it."""
        self.waiting.remove(seq)
        self._start(seq, self.cache.allocate_slot())
        self.cache.reserve(seq.slot, num_tokens)

    def _admit_first_chunk(self, seq: Sequence, budget: int) -> int:
        """Admit a waiting sequence from its longest cached prefix (none when it wants prompt
        log-probs, which only a forward computes) if its first chunk finds pages (above the watermark
        while others run); returns that chunk's length, 0 if it cannot start."""
        cache = self.cache
        known = len(seq.token_ids)
        use_cache = cache.prefix_caching and seq.prompt_logprobs is None
        hashes = self._hashes(seq, known) if use_cache else []
        hit = cache.find_prefix(hashes, known) if use_cache else None
        cached = 0 if hit is None else hit.num_tokens
        free_pages = cache.num_free_pages - (0 if hit is None else hit.num_reclaimed)
        free_pages -= self.watermark_pages if self.running else 0
        num_tokens = min(known - cached, budget, free_pages * cache.page_size)
        if num_tokens <= 0:
            return 0
        self.admit(seq, 0)
        if use_cache:
            cache.take_prefix(seq.slot, hashes, hit, known)
        seq.num_computed = cached
        cache.reserve(seq.slot, cached + num_tokens)
        return num_tokens

    def _hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """The hash chain of the full pages among the first `num_tokens` tokens of `seq`."""
        return page_hashes(seq.token_ids, num_tokens // self.cache.page_size, self.cache.page_size, seq.page_hashes)

    def _offer_to_cache(self, seq: Sequence, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Register the full pages of the sequence's first `end` tokens and take a snapshot at each
        snapshot position in (start, end] that has none: returns (position, snapshot) pairs."""
        cache = self.cache
        hashes = self._hashes(seq, end)
        seq.num_registered_pages = cache.register(seq.slot, hashes, seq.num_registered_pages)
        interval, page = cache.snapshot_interval, cache.page_size
        if not interval:
            return ()
        positions = range((start // interval + 1) * interval, end + 1, interval)
        taken = ((position, cache.snapshot(hashes[position // page - 1])) for position in positions)
        return tuple((position, snapshot) for position, snapshot in taken if snapshot is not None)

    def _fork(self, seq: Sequence, num_tokens: int) -> tuple[Sequence, ...]:
        """The `seq.num_forks` other completions of its request, from its first `num_tokens` tokens
        (its prompt): running, sampled from its row, those the cache has a slot and page for; the
        rest wait to be computed on their own."""
        forks = []
        for index in range(seq.index + 1, seq.index + 1 + seq.num_forks):
            generator = seq.generator
            if generator is not None:
                generator = torch.Generator(generator.device).manual_seed((seq.params.seed + index) % 2**63)
            detokenizer = seq.detokenizer
            if detokenizer is not None:
                detokenizer = Detokenizer(detokenizer.tokenizer, seq.token_ids, detokenizer.stop)
            child = Sequence(seq.request_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params, seq.arrival,
                             generator, detokenizer, index, prompt_logprobs=seq.prompt_logprobs)
            self.requests[seq.request_id].append(child)
            slot = self.cache.fork(seq.slot, num_tokens)
            if slot is None:
                child.prompt_logprobs = None if seq.prompt_logprobs is None else [None]
                self._enqueue(child)
                continue
            child.num_computed = num_tokens
            self._start(child, slot)
            forks.append(child)
        seq.num_forks = 0
        return tuple(forks)

    def _pick(self) -> list[tuple[Sequence, int, DraftTree]]:
        """(sequence, number of new tokens, drafts verified) for the next step: single-token ones
        first, then verify chunks, then prompt chunks."""
        cache = self.cache
        preempted = False
        while True:
            budget = self.max_num_batched_tokens
            scheduled: list[tuple[Sequence, int, DraftTree]] = []
            for seq in list(self.running):  # 1. decodes, with their drafts as far as pages allow
                if seq.status != Status.RUNNING or seq.num_uncomputed != 1 or budget == 0:
                    continue
                while (held := cache.reserve(seq.slot, seq.num_computed + 1)) <= seq.num_computed:
                    self._preempt(self.running[-1])
                    preempted = True
                    if seq.status != Status.RUNNING:
                        break
                else:
                    num_tokens = 1 + self._draft_limit(seq, budget)
                    if num_tokens > 1:  # drafts never preempt: they take pages above the watermark only
                        room = max(cache.num_free_pages - self.watermark_pages, 0) * cache.page_size
                        held = cache.reserve(seq.slot, min(seq.num_computed + num_tokens, held + room))
                        num_tokens = min(num_tokens, held - seq.num_computed)
                    scheduled.append((seq, num_tokens, seq.drafts.first(num_tokens - 1)))
                    budget -= num_tokens
            for seq in self.running:  # 2. prompt chunks
                if seq.num_uncomputed <= 1 or budget == 0:
                    continue
                wanted = seq.num_computed + min(seq.num_uncomputed, budget)
                num_tokens = min(cache.reserve(seq.slot, wanted), wanted) - seq.num_computed
                if num_tokens > 0:
                    scheduled.append((seq, num_tokens, DraftTree()))
                    budget -= num_tokens
            if scheduled or not self.running:
                break
            self._preempt(self.running[-1])  # every running sequence waits for pages: make room
            preempted = True
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3.
            seq = self.waiting[0]
            num_tokens = self._admit_first_chunk(seq, budget)
            if num_tokens == 0:
                break
            scheduled.append((seq, num_tokens, DraftTree()))
            budget -= num_tokens
        # stable: decodes, verify chunks, prompt chunks, each group by arrival
        scheduled.sort(key=lambda item: 0 if item[1] == 1 else 1 if item[2] else 2)
        return scheduled
