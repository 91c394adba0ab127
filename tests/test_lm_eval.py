"""lm-eval-harness's `local-completions` against the server, offline: a multiple-choice task
(loglikelihood requests: the prompt echoed with its log-probs) and a generate_until task, on local
JSONL data, the tokenizer the server's own (/tokenize). The scores are the model's own log-probs of
the continuations from one full forward; the generations, greedy decoding cut at `until`."""

import ipaddress
import json
import socket
from dataclasses import dataclass

import pytest
import torch
from infer_helpers import byte_tokenizer
from server_helpers import KEY, MODEL, running

from ringlinear.generate import generate
from ringlinear.infer import EngineConfig

QUESTIONS = ["The cat", "1 + 1 =", "def f()", "hello!!"]  # of one length: `generate` runs them as one batch
WORD = " no"
PRINTABLE = [chr(c) for c in range(0x21, 0x7f)]
MAX_GEN_TOKS = 10


@dataclass
class Expected:
    """What the model itself gives for the tasks' documents."""
    docs: list[dict]
    scores: dict[tuple[int, str], tuple[float, bool]]  # (doc, choice) -> (log-likelihood, is greedy)
    generations: list[str]


def task_yaml(name: str, data: str, fields: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\n{fields}")


@torch.no_grad()
def expected(model, tasks) -> Expected:
    """The documents, their scores and generations as the model gives them, and the tasks written to
    `tasks`. Each question's choices are a word, a character, and its greedy next character where
    that is printable: all scored from one full forward of the question and the word."""
    tokenizer = byte_tokenizer()
    docs, scores = [], {}
    for i, question in enumerate(QUESTIONS):
        context, ids = len(tokenizer.encode(question).ids), tokenizer.encode(question + WORD).ids
        steps = model(torch.tensor([ids])).logits[0, context - 1:-1].double().log_softmax(-1)
        greedy_next = tokenizer.decode([steps[0].argmax().item()])
        docs.append({"question": question, "choices": [WORD, "b", *[greedy_next] * (greedy_next in PRINTABLE)],
                     "answer": 1})
        for choice in docs[-1]["choices"]:
            tokens = torch.tensor(tokenizer.encode(choice).ids)
            chosen = steps[torch.arange(len(tokens)), tokens]
            scores[(i, choice)] = (chosen.sum().item(), bool((steps[:len(tokens)].argmax(-1) == tokens).all()))
    assert {greedy for _, greedy in scores.values()} == {True, False}, "the test must check both kinds"
    greedy = [tokenizer.decode(ids) for ids in generate(model, [tokenizer.encode(q).ids for q in QUESTIONS],
                                                        MAX_GEN_TOKS, temperature=0,
                                                        eos_token_ids=model.config.eos_token_ids)]
    until = next(c for c in greedy[0][2:] if c in PRINTABLE)  # the first generation stops there
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "mc.yaml").write_text(task_yaml("tiny_mc", data, (
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")))
    (tasks / "gen.yaml").write_text(task_yaml("tiny_gen", data, (
        f"output_type: generate_until\ndoc_to_target: 'b'\ngeneration_kwargs:\n  until: {json.dumps([until])}\n"
        f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")))
    return Expected(docs, scores, [text.split(until)[0] for text in greedy])


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """(lm-eval, the server's url, the task folder, what the model gives), offline."""
    tasks = tmp_path_factory.mktemp("tasks")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_HOME": str(tasks / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                            "OPENAI_API_KEY": KEY}.items():  # lm-eval sends OPENAI_API_KEY to the completions
            env.setenv(name, value)
        import lm_eval  # here: datasets reads HF_HOME and the offline switches when it is imported

        with running(EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, page_size=8, num_pages=256,
                                  max_model_len=256)) as (url, engine):
            yield lm_eval, url, tasks, expected(engine.model, tasks)


@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection beyond this machine fails the test: lm-eval and datasets must stay offline."""
    connect = socket.socket.connect

    def checked(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"a connection to {address}"
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", checked)


@pytest.mark.parametrize("tokenized", [True, False])  # prompts sent as token ids, or as the text of the ids
def test_lm_eval_scores_and_generates_as_the_model_does(evaluation, loopback_only, tokenized):
    lm_eval, url, tasks, want = evaluation
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_mc", "tiny_gen"],
        model_args=f"base_url={url}/v1/completions,model={MODEL},tokenizer_backend=remote,auth_token={KEY},"
                   f"tokenized_requests={tokenized},batch_size=2,num_concurrent=2,max_length=256",
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    for sample in out["samples"]["tiny_mc"]:
        doc = want.docs[sample["doc_id"]]
        assert [tuple(a) for a in sample["arguments"]] == [(doc["question"], c) for c in doc["choices"]]
        for choice, ((loglikelihood, is_greedy),) in zip(doc["choices"], sample["resps"], strict=True):
            score, greedy = want.scores[(sample["doc_id"], choice)]
            assert abs(loglikelihood - score) < 1e-4 and is_greedy == greedy
    generations = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["tiny_gen"]}
    assert [generations[i] for i in range(len(QUESTIONS))] == want.generations
