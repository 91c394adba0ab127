"""Drafting inside the engine: after every step, the draft tree (a chain, or the configured shape)
each running sequence proposes to verify in its next one. The n-gram drafter reads the sequence's
tokens; the MTP drafter reads the target's hidden states at the positions the step computed for good
(a prompt chunk's, a verify chunk's root and accepted path), holding a sequence's prompt chunks until
the last one has sampled a token. Penalised requests draft nothing: their penalties change with
every token a verify step accepts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ...model import RingLinearForCausalLM
from ...ops.policy import KernelPolicy
from ..scheduler import SchedulerOutput, Sequence, Status
from .config import SpeculativeConfig
from .mtp import MTPCache, MTPDrafter
from .ngram import NgramProposer
from .tree import DraftTree


@dataclass
class _MTPState:
    cache: MTPCache
    hidden: list[Tensor] = field(default_factory=list)  # rows of prompt chunks the MTP layers have not seen
    tokens: list[int] = field(default_factory=list)  # the token after each

    @property
    def next_position(self) -> int:
        return self.cache.num_verified + len(self.tokens)

    def copy(self) -> _MTPState:
        return _MTPState(self.cache.copy(), list(self.hidden), list(self.tokens))


class Speculator:
    def __init__(self, config: SpeculativeConfig, model: RingLinearForCausalLM, policy: KernelPolicy):
        config.check_model(model.config)
        self.mtp = MTPDrafter(model, config.paths, policy) if config.method == "mtp" else None
        self.ngram = None if self.mtp else NgramProposer(config.paths, config.prompt_lookup_min,
                                                         config.prompt_lookup_max)
        self._states: dict[Sequence, _MTPState] = {}

    @property
    def needs_hidden_states(self) -> bool:
        return self.mtp is not None

    def propose(self, output: SchedulerOutput, hidden: Tensor | None,
                accepted: list[list[int]] = ()) -> dict[Sequence, DraftTree]:
        """The draft tree of every sequence that gained a token in this step (after `Scheduler.update`);
        `hidden` [T, hidden]: the step's final hidden states (MTP); `accepted`: for each of
        `output.verifies`, its accepted draft nodes (their rows hold the hidden states of tokens now
        verified)."""
        drafts: dict[Sequence, DraftTree] = {}
        starts = np.cumsum([0] + [chunk.num_tokens for chunk in output.chunks]).tolist()
        paths = {id(chunk): path for (chunk, _), path in zip(output.verifies, accepted)}
        ready: list[tuple[Sequence, _MTPState]] = []  # MTP: the sequences to draft for, with their states
        for chunk, row in zip(output.chunks, starts):
            seqs = [s for s in (chunk.seq, *chunk.forks) if s.status == Status.RUNNING and not s.params.penalised]
            if self.ngram is not None:
                drafts.update((s, self.ngram.propose(s.token_ids)) for s in seqs if chunk.sample)
                continue
            parent = self._state(chunk.seq, chunk.start)
            states = {s: parent if s is chunk.seq else parent.copy() for s in seqs}  # forks copy the prompt's
            for seq, state in states.items():
                self._states[seq] = state
                if chunk.drafts:  # the root and the accepted nodes (a verified sequence has no forks)
                    state.hidden.append(hidden[[row + node for node in (0, *paths[id(chunk)])]])
                else:
                    state.hidden.append(hidden[row:row + seq.num_computed - chunk.start])
                state.tokens += seq.token_ids[chunk.start + 1:seq.num_computed + 1]
                if chunk.sample:
                    ready.append((seq, state))
        if ready:  # one MTP call for every sequence of the step
            requests = [(state.cache, torch.cat(state.hidden), torch.tensor(state.tokens, device=hidden.device))
                        for _, state in ready]
            drafts.update(zip((seq for seq, _ in ready), self.mtp.propose_many(requests)))
            for _, state in ready:
                state.hidden, state.tokens = [], []
        self._states = {s: state for s, state in self._states.items() if s.status != Status.FINISHED}
        return drafts

    def _state(self, seq: Sequence, start: int) -> _MTPState:
        """The sequence's MTP state if it continues at `start`; else (new, recomputed, or started
        from a cached prefix whose MTP keys no one kept) a fresh one from `start` on."""
        state = self._states.get(seq)
        if state is None or state.next_position != start:
            state = _MTPState(MTPCache())
            state.cache.num_verified = start
        return state
