"""lm-eval-harness's `local-completions` against the server, offline: a multiple-choice task
(loglikelihood requests: the prompt echoed with its log-probs) and a generate_until task, on local
JSONL data, the tokenizer the server's own (/tokenize). The scores are the model's own log-probs of
the continuations from one full forward; the generations, greedy decoding cut at `until`."""

import ipaddress
import json
import socket

import pytest
import torch
from infer_helpers import byte_tokenizer
from server_helpers import KEY, MODEL, running

from ringlinear.generate import generate
from ringlinear.infer import EngineConfig

QUESTIONS = ["The cat", "def f(x):", "1 + 1 =", "Q: why?\nA:", "Hi there", "zz", "hello", "abcabc"]
PRINTABLE = [chr(c) for c in range(0x21, 0x7f)]
MAX_GEN_TOKS = 10


def task_yaml(name: str, data: str, fields: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\n{fields}")


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection beyond this machine fails the test: lm-eval and datasets must stay offline."""
    connect = socket.socket.connect

    def checked(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"a connection to {address}"
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", checked)


def test_lm_eval_scores_and_generates_as_the_model_does(tmp_path, monkeypatch, loopback_only):
    for name, value in {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                        "OPENAI_API_KEY": KEY}.items():  # lm-eval sends OPENAI_API_KEY to the completions
        monkeypatch.setenv(name, value)
    import lm_eval  # here: datasets reads HF_HOME and the offline switches when it is imported
    from lm_eval.tasks import TaskManager

    tokenizer = byte_tokenizer()
    with running(EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, page_size=8, num_pages=256,
                              max_model_len=256)) as (url, engine):
        model = engine.model

        @torch.no_grad()
        def logprobs(text: str) -> torch.Tensor:
            """The model's next-token log-probs after every prefix of `text`, from one forward."""
            return model(torch.tensor([tokenizer.encode(text).ids])).logits[0].double().log_softmax(-1)

        # each question's choices: two fixed ones, and its greedy next character where that is one
        greedy_next = {q: tokenizer.decode([logprobs(q)[-1].argmax().item()]) for q in QUESTIONS}
        docs = [{"question": q, "choices": ["A", "b", *[greedy_next[q]] * (greedy_next[q] in PRINTABLE)],
                 "answer": 1} for q in QUESTIONS]
        greedy_ids = generate(model, [tokenizer.encode(q).ids for q in QUESTIONS], MAX_GEN_TOKS, temperature=0,
                              eos_token_ids=model.config.eos_token_ids)
        greedy = [tokenizer.decode(ids) for ids in greedy_ids]
        until = next(c for c in greedy[0][2:] if c in PRINTABLE)  # so that at least one generation stops at it
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp_path / "mc.yaml").write_text(task_yaml("tiny_mc", data, (
            "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
            "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")))
        (tmp_path / "gen.yaml").write_text(task_yaml("tiny_gen", data, (
            f"output_type: generate_until\ndoc_to_target: 'b'\ngeneration_kwargs:\n  until: {json.dumps([until])}\n"
            f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")))
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["tiny_mc", "tiny_gen"],
            model_args=f"base_url={url}/v1/completions,model={MODEL},tokenizer_backend=remote,auth_token={KEY},"
                       "tokenized_requests=True,batch_size=2,num_concurrent=2,max_length=256",
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))

        greedy_flags = []
        for sample in sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"]):
            doc = docs[sample["doc_id"]]
            assert [tuple(a) for a in sample["arguments"]] == [(doc["question"], c) for c in doc["choices"]]
            context = len(tokenizer.encode(doc["question"]).ids)
            for choice, ((loglikelihood, is_greedy),) in zip(doc["choices"], sample["resps"], strict=True):
                ids = tokenizer.encode(doc["question"] + choice).ids
                steps, tokens = logprobs(doc["question"] + choice)[context - 1:-1], torch.tensor(ids[context:])
                assert abs(loglikelihood - steps[torch.arange(len(tokens)), tokens].sum().item()) < 1e-4
                assert is_greedy == bool((steps.argmax(-1) == tokens).all())
                greedy_flags.append(is_greedy)
    assert True in greedy_flags and False in greedy_flags
    generations = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["tiny_gen"]}
    assert [generations[i] for i in range(len(QUESTIONS))] == [text.split(until)[0] for text in greedy]
