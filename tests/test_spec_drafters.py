"""Speculative decoding's configuration and drafters: vLLM's dict with its errors, the n-gram
prompt lookup, and the MTP drafter's cached chain against the MTP layers run from scratch."""

import pytest
import torch
from infer_helpers import tiny_model

from ringlinear.infer.spec.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from ringlinear.infer.spec.mtp import MTPCache, MTPDrafter
from ringlinear.infer.spec.ngram import NgramProposer
from ringlinear.infer.spec.tree import DraftTree, chain_paths
from ringlinear.model import SequenceContext


def test_vllm_dicts_parse_with_vllm_defaults():
    assert SpeculativeConfig.parse('{"method": "mtp", "num_speculative_tokens": 3}') == SpeculativeConfig("mtp", 3)
    ngram = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (ngram.prompt_lookup_min, ngram.prompt_lookup_max) == (3, 3)
    assert SpeculativeConfig("ngram", 2).prompt_lookup_min == SpeculativeConfig("ngram", 2).prompt_lookup_max == 5


@pytest.mark.parametrize("value,message", [
    ({"method": "eagle", "num_speculative_tokens": 1}, "speculative_config.method must be one of"),
    ({"method": "mtp", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 63\]"),
    ({"method": "mtp", "num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1}, "num_speculative_tokens"),
    ({"method": "mtp", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "mtp"}, "num_speculative_tokens is required"),
    ({"method": "mtp", "num_speculative_tokens": 2, "k": 1}, r"unknown field\(s\) k"),
    ({"method": "mtp", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max is a setting of"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min must be <= prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be"),
    ("{method: mtp}", "not valid JSON"),
    ("[1]", "must be a JSON object"),
])
def test_bad_configs_are_one_line_errors_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_mtp_needs_the_checkpoints_mtp_layers():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        SpeculativeConfig("mtp", 2).check_model(model.config)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        MTPDrafter(model, chain_paths(2))
    SpeculativeConfig("ngram", 2).check_model(model.config)


def test_ngram_proposes_what_followed_the_longest_most_recent_match():
    proposer = NgramProposer(chain_paths(2), prompt_lookup_min=1, prompt_lookup_max=3)
    assert proposer.propose([1, 2, 3, 4, 9, 3, 5, 1, 2, 3]).tokens == (4, 9)  # [1, 2, 3] beats the later [3]
    assert proposer.propose([5, 6, 7, 5, 6, 8, 5, 6]).tokens == (8, 5)  # the most recent [5, 6]
    assert proposer.propose([7, 1, 7]).tokens == (1, 7)
    assert proposer.propose([1, 2, 3]).tokens == ()
    assert NgramProposer(chain_paths(3), 2, 2).propose([4, 4, 1, 4]).tokens == ()  # [1, 4] never occurred before


def scratch_logits(model, ids, hidden, num_verified, path):
    """The MTP logits after the drafts `path` with every MTP layer rerun over all the inputs it has
    seen (a causal forward each step): layer 0 the verified positions' true inputs, each layer the
    chained steps it took along the path."""
    inner, layers = model.model, model.model.mtp_layers
    seen = {0: (inner.word_embeddings(ids[None, 1:num_verified + 1]), hidden[None, :num_verified],
                torch.arange(num_verified))}
    h, position = None, num_verified - 1
    for step in range(len(path) + 1):
        index = step % len(layers)
        if step:
            e, hh, p = seen.get(index, (hidden[None, :0], hidden[None, :0], torch.arange(0)))
            seen[index] = (torch.cat([e, inner.word_embeddings(torch.tensor([[path[step - 1]]]))], 1),
                           torch.cat([hh, h], 1), torch.cat([p, torch.tensor([position])]))
        e, hh, p = seen[index]
        h = layers[index](e, hh, inner.rotary(p[None]), SequenceContext())[:, -1:]
        position += 1
    return model.lm_head(layers[index].final_layernorm(h, SequenceContext().policy))[0, 0]


def from_scratch(model, ids, hidden, num_verified, k):
    drafts = []
    for _ in range(k):
        drafts.append(int(scratch_logits(model, ids, hidden, num_verified, drafts).argmax()))
    return drafts


def mtp_model(num_layers):
    return tiny_model(seed=1, num_nextn_predict_layers=num_layers, hidden_size=64, head_dim=16, intermediate_size=128,
                      moe_intermediate_size=32, moe_shared_expert_intermediate_size=32).double()


def check_two_rounds_of_chain_drafts(model, k: int = 3):
    """Chains of k drafts over two rounds (20 verified positions, then 3 more after 2 accepted drafts)
    equal the MTP layers rerun from scratch; returns the drafter's cache after them."""
    ids = torch.randint(1, 257, (30,), generator=torch.Generator().manual_seed(0))
    hidden = model(ids[None]).hidden_states[0]
    drafter = MTPDrafter(model, chain_paths(k))
    cache = MTPCache()
    for verified_before, verified in ((0, 20), (20, 23)):
        drafts = drafter.propose(cache, hidden[verified_before:verified], ids[verified_before + 1:verified + 1])
        assert list(drafts.tokens) == from_scratch(model, ids, hidden, verified, k) and drafts.is_chain
    assert cache.num_verified == 23  # the chained steps' entries are not kept
    return cache


@pytest.mark.parametrize("num_layers", [1, 2])
def test_mtp_drafts_equal_the_layers_run_from_scratch_over_two_rounds(num_layers):
    cache = check_two_rounds_of_chain_drafts(mtp_model(num_layers))
    assert cache.keys.shape[1] == 23


TREE = "[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0, 0)]"


@pytest.mark.parametrize("num_layers", [1, 2])
def test_mtp_tree_nodes_are_the_ranked_candidates_of_the_layers_run_from_scratch(num_layers):
    """Each node (c₀, ..., c_d) is the c_d-th best token after its ancestors' tokens, the MTP layers
    rerun over that path alone: branches of one depth batched in one forward see only their own
    ancestors' keys."""
    model = mtp_model(num_layers)
    ids = torch.randint(1, 257, (30,), generator=torch.Generator().manual_seed(0))
    hidden = model(ids[None]).hidden_states[0]
    paths = SpeculativeConfig("mtp", 9, speculative_token_tree=TREE).paths
    drafter = MTPDrafter(model, paths)
    cache = MTPCache()
    for verified_before, verified in ((0, 20), (20, 23)):
        tree = drafter.propose(cache, hidden[verified_before:verified], ids[verified_before + 1:verified + 1])
        token_of = dict(zip(paths, tree.tokens))
        assert [paths.index(p[:-1]) + 1 if len(p) > 1 else 0 for p in paths] == list(tree.parents)
        for path in paths:
            ancestors = [token_of[path[:d]] for d in range(1, len(path))]
            ranked = scratch_logits(model, ids, hidden, verified, ancestors).argsort(descending=True)
            assert token_of[path] == int(ranked[path[-1]]), path


def test_ngram_tree_branches_are_distinct_continuations_best_first():
    paths = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 1,
                                     "prompt_lookup_max": 2, "speculative_token_tree": TREE.replace(
                                         ", (0, 1, 0), (0, 0, 0, 0)", "").replace(", (0, 0, 0)", "")}).paths
    assert paths == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0))
    proposer = NgramProposer(paths, prompt_lookup_min=1, prompt_lookup_max=2)
    # suffix [1, 2]: followed by 3, 4 (most recent) and 3, 5; suffix [2] also by 6, 7 and 3, 4 again
    tree = proposer.propose([2, 6, 7, 1, 2, 3, 5, 9, 1, 2, 3, 4, 8, 1, 2])
    # (0,) = 3 (the most recent [1, 2]'s), its children 4 then 5; (1,) = 6 (only [2] matched it), then 7
    assert tree.tokens == (3, 6, 4, 5, 7) and tree.parents == (0, 0, 1, 1, 2)
    assert proposer.propose([1, 2, 3]) == DraftTree()


@pytest.mark.parametrize("tree,message", [
    ("[(0,), (0, 1)]", r"path \(0, 1\) has no better-ranked sibling \(0, 0\)"),
    ("[(0,), (1, 0)]", r"path \(1, 0\) has no parent \(1,\)"),
    ("[(0,), (0,)]", "names a path twice"),
    ("[[0], [-1]]", "child ranks >= 0"),
    ("[]", "non-empty list of paths"),
    ("[(0,),", "neither JSON nor a Python list"),
    (str([(i,) for i in range(64)]), "has 64 nodes; at most 63"),
])
def test_bad_trees_are_one_line_errors_naming_the_field(tree, message):
    with pytest.raises(ValueError, match="speculative_config.speculative_token_tree.*" + message):
        SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 2, "speculative_token_tree": tree})


def test_trees_parse_from_json_or_python_text_and_count_their_nodes():
    for text in ("[[1], [0], [0, 0]]", "[(1,), (0,), (0, 0)]", [[0], [1], [0, 0]]):
        config = SpeculativeConfig("ngram", 3, speculative_token_tree=text)
        assert config.paths == ((0,), (1,), (0, 0))
    assert SpeculativeConfig("mtp", 3).paths == ((0,), (0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match="num_speculative_tokens must be the number of nodes of speculative_token_tr"):
        SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 4, "speculative_token_tree": "[[0], [1]]"})


def test_mtp_drafts_for_many_sequences_in_one_call_equal_those_drafted_one_by_one():
    """The engine drafts for every sequence of a step in one call (one packed first pass, one batch
    per depth): each tree is the one its sequence gets alone, over two rounds."""
    model = mtp_model(1)
    drafter = MTPDrafter(model, SpeculativeConfig("mtp", 9, speculative_token_tree=TREE).paths)
    ids = [torch.randint(1, 257, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 30, 21)]
    hidden = [model(x[None]).hidden_states[0] for x in ids]
    rounds = [(4, 9), (20, 24), (1, 15)], [(9, 11), (24, 25), (15, 20)]  # (verified before, verified) each
    together, alone = [MTPCache() for _ in ids], [MTPCache() for _ in ids]
    for cache, (start, _) in zip(together + alone, rounds[0] * 2):
        cache.num_verified = start  # as the engine's, for a sequence started from a cached prefix
    for spans in rounds:
        requests = [(c, h[a:b], x[a + 1:b + 1]) for c, h, x, (a, b) in zip(together, hidden, ids, spans)]
        batched = drafter.propose_many(requests)
        for i, (c, h, x, (a, b)) in enumerate(zip(alone, hidden, ids, spans)):
            assert drafter.propose(c, h[a:b], x[a + 1:b + 1]) == batched[i]
