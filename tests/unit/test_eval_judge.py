"""The LLM judge client (evaluate/judge.py) against a real HTTP server in a thread that speaks
the OpenAI chat API and answers like a judge model: [[CORRECT]] when the gold answer occurs in
the response part of the prompt."""

import socket

import pytest
from judge_server import FakeJudge, serve_fake_judge  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.judge import (JudgeClient, JudgeConfig, JudgeError, JudgeVerdict, check_template,
                                         load_prompt_template, parse_verdict, render_prompt, response_tail)


@pytest.fixture
def server():
    with serve_fake_judge(FakeJudge()) as fake:
        yield fake


def item(kind="number", answers=("42",), **fields) -> EvalItem:
    fields.setdefault("question", "<image>\nWhat is the value?")
    return EvalItem(id="q", images=(), answers=answers, answer_kind=kind, category="c", source="t:1", **fields)


def response(answer: str) -> str:
    return f"Long reasoning that mentions 7 and 42.\n</think>\n\nThe answer is \\boxed{{{answer}}}.<|im_end|>"


def client(fake, sleeps=None, **config) -> JudgeClient:
    sink = sleeps if sleeps is not None else []
    return JudgeClient(JudgeConfig(fake.url, **config), sleep=sink.append)


# --- config and prompt ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,flag", [
    ({"url": "localhost:30000/v1"}, "--judge-url"), ({"url": "ftp://h/v1"}, "--judge-url"),
    ({"url": "http://h/v1", "concurrency": 0}, "--judge-concurrency"),
    ({"url": "http://h/v1", "max_retries": -1}, "--judge-retries"),
    ({"url": "http://h/v1", "timeout_s": 0}, "--judge-timeout"),
    ({"url": "http://h/v1", "timeout_s": float("nan")}, "--judge-timeout"),
    ({"url": "http://h/v1", "max_tokens": 1.5}, "--judge-max-tokens"),
])
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        JudgeConfig(**kwargs)


def test_config_normalizes_url():
    assert JudgeConfig("https://judge.example:8000/v1/").url == "https://judge.example:8000/v1"


def test_packaged_template_and_prompt_fields():
    template = load_prompt_template()
    check_template(template)
    assert "<!--" not in template and "[[CORRECT]]" in template
    choice = item("choice", ("B",), choices=("7", "42 {x}"), unit="cm", raw_question="In <image 1>, what is x?")
    prompt = render_prompt(template, choice, "r</think>\nIt is \\boxed{B}.<|im_end|>")
    question = prompt.split("<question>\n")[1].split("\n</question>")[0]
    assert question == "In [image 1], what is x?"
    assert "A. 7\nB. 42 {x}" in prompt and "B. 42 {x} (unit: cm)" in prompt
    assert "It is \\boxed{B}." in prompt and "<|im_end|>" not in prompt and "r</think>" not in prompt
    assert "{{" not in prompt


def test_prompt_question_falls_back_and_golds_and_notes():
    it = item(answers=("1.5", "3/2"), precision=2, tolerance=None)
    template = "{{question}}\n--\n{{options}}\n--\n{{gold}}\n--\n{{response}}"
    prompt = render_prompt(template, it, "no think {{gold}} here")
    question, options, gold, resp = prompt.split("\n--\n")
    assert question == "What is the value?" and options.startswith("(none")
    assert gold == "any one of: 1.5 | 3/2 (compare at 2 decimal place(s))"
    assert resp == "no think {{gold}} here"  # values are not searched for placeholders


def test_response_tail():
    assert response_tail("x" * 5000 + "</think>\nAnswer: 3<|im_end|>") == "Answer: 3"
    cut = response_tail("a" * 3000 + "b" * 1990 + "END")
    assert cut.startswith("[...] ") and cut.endswith("b" * 1990 + "END") and len(cut) == 2000 + 6


@pytest.mark.parametrize("template", ["{{question}} {{response}}", "{{question}} {{gold}} {{response}} {{image}}"])
def test_bad_template(template):
    with pytest.raises(ValueError, match="placeholder"):
        check_template(template)


@pytest.mark.parametrize("reply,correct", [
    ("Fine.\n[[CORRECT]]", True), ("[[CORRECT]] at first, but no.\n[[INCORRECT]]", False),
    ("<think>[[INCORRECT]]</think>[[CORRECT]]", True), ("[[INCORRECT]]?\n</think>\n[[CORRECT]]", True),
    ("<think>[[CORRECT]] maybe", None), ("<think>x</think> no token", None), ("", None),
    ("Matches.\n[[ correct ]]", True), ("Differs.\n[[Incorrect]]", False), ("[[correct]] then [[ INCORRECT ]]", False),
])
def test_parse_verdict(reply, correct):
    verdict = parse_verdict(reply)
    assert verdict.correct is correct and verdict.reply == reply
    assert (verdict.error is None) == (correct is not None)
    if correct is None:
        assert verdict.error.startswith("no verdict")


# --- against the server --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["plain", "think", "opened-think"])
def test_verdicts_and_request(server, style):
    server.style = style
    judge = client(server, model="judge-7b", max_tokens=321)
    assert judge.check_reachable() == "judge-7b"
    pairs = [(item(question="<image>\nHow tall is the tree?"), response("42")), (item(), response("7"))]
    verdicts = judge.judge_many(pairs)
    assert [v.correct for v in verdicts] == [True, False] and all(v.error is None for v in verdicts)
    [body] = [b for b in server.chat_bodies if "tree" in b["messages"][0]["content"]]  # concurrent: any order
    assert body["model"] == "judge-7b" and body["temperature"] == 0 and body["max_tokens"] == 321
    prompt = body["messages"][0]["content"]
    assert "How tall is the tree?" in prompt and "<reference_answer>\n42\n" in prompt
    assert "The answer is \\boxed{42}." in prompt and "Long reasoning" not in prompt


def test_model_discovery_and_api_key(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "s3cret")
    judge = client(server, api_key_env="JUDGE_TEST_KEY")
    judge.judge_many([(item(), response("42"))])  # check_reachable runs first when not yet called
    assert judge.model == "judge-7b" and server.chat_bodies[0]["model"] == "judge-7b"
    assert server.headers[0]["Authorization"] == "Bearer s3cret"


def test_unserved_model(server):
    with pytest.raises(JudgeError, match=r"model 'gpt-x' is not served by the judge at http://127\.0\.0\.1:\d+/v1; "
                                         r"it serves \['judge-7b', 'other'\]"):
        client(server, model="gpt-x").check_reachable()
    assert server.chat_bodies == []


def test_unreachable_url():
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = []
    judge = JudgeClient(JudgeConfig(f"http://127.0.0.1:{port}/v1", model="m", max_retries=2), sleep=sleeps.append)
    with pytest.raises(JudgeError, match=rf"judge at http://127\.0\.0\.1:{port}/v1 is not reachable \(model m\)"):
        judge.check_reachable()
    assert sleeps == [1.0, 2.0]


def test_retries_5xx_then_succeeds(server):
    server.fail_statuses = [500, 503]
    sleeps = []
    verdicts = client(server, sleeps, concurrency=1).judge_many([(item(), response("42"))])
    assert verdicts[0].correct is True and len(server.chat_bodies) == 3 and sleeps == [1.0, 2.0]


def test_gives_up_after_max_retries(server):
    server.fail_statuses = [502] * 10
    with pytest.raises(JudgeError, match=r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions failed 2 attempt"):
        client(server, max_retries=1, concurrency=1).judge_many([(item(), response("42"))])
    assert len(server.chat_bodies) == 2


def test_no_retry_on_4xx(server):
    server.fail_statuses = [400]
    sleeps = []
    with pytest.raises(JudgeError, match=r"judge at http://127\.0\.0\.1:\d+/v1/chat/completions refused the request "
                                         r"\(not retried\): HTTP 400.*fake failure 400") as err:
        client(server, sleeps, concurrency=1).judge_many([(item(), response("42"))])
    assert err.value.status == 400 and err.value.url.startswith(server.url)
    assert len(server.chat_bodies) == 1 and sleeps == []


def test_timeout_names_the_flag(server, caplog):
    server.delay_s = 0.5
    sleeps = []
    judge = client(server, sleeps, model="judge-7b", timeout_s=0.05, max_retries=1, concurrency=1)
    with pytest.raises(JudgeError, match=r"failed 2 attempt.*timed out.*\(--judge-timeout\)"):
        judge.judge_many([(item(), response("42"))])
    assert sleeps == [1.0]
    [warning] = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert "timed out" in warning and "--judge-timeout" in warning


def test_unparseable_reply_is_no_verdict(server):
    server.style = "garbage"
    [verdict] = client(server).judge_many([(item(), response("42"))])
    assert verdict == JudgeVerdict(None, "I think the student is probably right.", verdict.error)
    assert verdict.error.startswith("no verdict")


def test_not_an_openai_answer(server):
    server.style = "no-choices"
    with pytest.raises(JudgeError, match="expected"):
        client(server).judge_many([(item(), response("42"))])


def test_concurrent_results_keep_input_order(server):
    server.delay_s = 0.02
    answers = [str(n) for n in range(24)]
    pairs = [(item(answers=(a,), question=f"Question {i} " + "x" * i), response(a if i % 3 else "none"))
             for i, a in enumerate(answers)]
    verdicts = client(server, concurrency=6).judge_many(pairs)
    assert [v.correct for v in verdicts] == [i % 3 != 0 for i in range(24)]
    assert 1 < server.max_in_flight <= 6
    assert client(server).judge_many([]) == []
