"""The reward-model server (tools/serve_reward_model.py) and its client, over real HTTP on localhost.

A tiny random Qwen2ForSequenceClassification (the text kind) is saved to a temporary
folder and served by the tool in a subprocess started with --port 0; the test reads the
URL from the tool's startup line (no sleeps). The image-aware kinds are in
test_vl_reward_model.py. Retry behavior is tested against a closed port, a
socket that never answers, and small in-thread stub servers; sleeps are recorded by an
injected ``sleep`` instead of being slept.
"""

import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from megatron_r1v.config import RewardConfig
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.rewards import HybridReward, RewardItem, RewardModelClient, RewardServerError

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300
# Varied lengths, so every server batch pads some rows.
TEXTS = [
    "What is 3 + 4?\n\nr</think> The answer is \\boxed{7}.",
    "a",
    "Think step by step. " * 6,
    "The answer is \\boxed{12}",
    "<think>\n",
    "system user assistant",
    "x y z",
]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, reward_tools):
    """A saved tiny Qwen2 reward model (one label) with a BPE tokenizer of this project."""
    return reward_tools.save_model(tmp_path_factory.mktemp("tiny_rm"), VOCAB, TEXTS * 2)


@pytest.fixture(scope="module")
def server(tiny_rm, tmp_path_factory, reward_tools):
    """The tool serving tiny_rm; yields its URL (read from the startup line)."""
    log = tmp_path_factory.mktemp("rm_server") / "stderr.txt"
    with reward_tools.serve(tiny_rm, log, "--batch-size", "3", "--max-texts", "8") as info:
        assert info["event"] == "listening" and info["url"].startswith("http://127.0.0.1:")
        assert (info["kind"], info["num_labels"], info["score_index"]) == ("text", 1, 0)
        yield info["url"]


@pytest.fixture(scope="module")
def reference_scores(tiny_rm):
    """Each text scored alone, in this process, with plain transformers (no padding)."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_rm).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_rm)
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS]


def post(url, body: bytes):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --- the real server --------------------------------------------------------------------


def items(*prompts, response="r", images=()):
    return [RewardItem(p, response, images) for p in prompts]


def test_scores_match_the_model_in_process(server, reference_scores):
    sleeps = []
    # Client batches of 4 (4 + 3 texts); the server runs forward batches of at most 3.
    client = RewardModelClient(server, timeout_s=30, retry_s=0, batch_size=4, sleep=sleeps.append)
    scores = client.score_texts(TEXTS)
    # fp32, padded batch vs a text alone: only summation order differs (~1e-7).
    assert max(abs(a - b) for a, b in zip(scores, reference_scores)) < 1e-5
    assert max(reference_scores) - min(reference_scores) > 0.1  # distinct texts, distinct scores
    assert len(scores) == len(TEXTS) and sleeps == []
    assert client.score([]) == [] and client.score_texts([]) == []


def test_a_text_model_reads_items_as_text_without_opening_images(server, reference_scores):
    """An item is read as prompt + blank line + response; its images (here missing files) are never opened."""
    client = RewardModelClient(server, timeout_s=30, retry_s=0)
    prompt, _, response = TEXTS[0].partition("\n\n")
    scores = client.score([RewardItem(prompt, response, ("/no/such/image.png",)), RewardItem(prompt, response)])
    assert scores == pytest.approx([reference_scores[0]] * 2, abs=1e-5)


def test_health(server, tiny_rm):
    health = RewardModelClient(server).health()
    assert health == {"status": "ok", "model": str(tiny_rm), "kind": "text", "images": False, "num_labels": 1,
                      "score_index": 0, "max_texts": 8, "max_items": 8, "max_images": 16}


def test_hybrid_reward_through_the_server(server, reference_scores):
    # Eq. 7 with w_theta = 0.5: total = r_rule + r_format + 0.5 * s, with s from the server.
    reward = HybridReward.from_config(RewardConfig(model_weight=0.5, reward_model_url=server))
    record = PromptRecord("p", (), "What is 3 + 4?", "7", "number", None)
    completion = "r</think> The answer is \\boxed{7}."
    out = reward.score_batch([record], [completion])[0]
    assert TEXTS[0] == f"{record.question}\n\n{completion}"  # the text the reward model sees
    assert (out.rule, out.format) == (1.0, 1.0)
    assert out.model_raw == pytest.approx(reference_scores[0], abs=1e-5)
    assert out.total == pytest.approx(2.0 + 0.5 * reference_scores[0], abs=1e-5)


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"not json", 400, "body is not valid JSON"),
        (b'{"text": ["a"]}', 400, 'body must be a JSON object {"items": [{"prompt", "response", "images"}, ...]} '
                                  'or {"texts": [str, ...]}'),
        (b'{"texts": "abc"}', 400, '"texts" must be a list, got str'),
        (b'{"items": [{"prompt": "a"}]}', 400, "items[0].response is missing"),
        (b'{"items": [{"prompt": "a", "response": "b", "images": [1]}]}', 400,
         "items[0].images[0] must be a string (a path or base64), got int"),
        (b'{"texts": ["a", 3]}', 400, '"texts"[1] must be a string, got int'),
        (b'{"texts": ["a", ""]}', 400, "texts[1] encodes to no tokens"),
        (json.dumps({"texts": ["a"] * 9}).encode(), 400, "9 texts in one request; this server takes at most 8"),
    ],
)
def test_malformed_requests_get_400(server, body, status, message):
    code, payload = post(server + "/score", body)
    assert code == status and message in payload["error"]


def test_unknown_path_is_404(server):
    code, payload = post(server + "/scores", b'{"texts": []}')
    assert code == 404 and "unknown path '/scores'" in payload["error"]


def test_4xx_is_not_retried(server):
    sleeps = []
    client = RewardModelClient(server, retry_s=60, backoff_s=1.0, batch_size=16, sleep=sleeps.append)
    with pytest.raises(RewardServerError) as info:
        client.score(items(*["a"] * 10))
    assert sleeps == [] and info.value.attempts == 1 and info.value.status == 400
    assert str(info.value) == (
        f"reward model server at {server}/score rejected the request (not retried): HTTP 400: 10 items in one "
        "request; this server takes at most 8 (lower the client's batch size, reward.model_batch_size, or "
        "restart with --max-items)")


def test_tool_rejects_a_folder_without_a_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "serve_reward_model.py"), "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no config.json there" in proc.stderr


# --- retries, without the real server ---------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_retries_with_backoff_within_the_budget_then_raises(caplog):
    port = closed_port()
    sleeps = []
    # Budget 3.5 s: sleeps 0.5 + 1 + 2 fit, the next 4 would not.
    client = RewardModelClient(f"http://127.0.0.1:{port}", retry_s=3.5, backoff_s=0.5, sleep=sleeps.append)
    with caplog.at_level("WARNING", logger="megatron_r1v.rewards.reward_model"):
        with pytest.raises(RewardServerError) as info:
            client.score(items("a", "b"))
    assert sleeps == [0.5, 1.0, 2.0]  # doubling
    assert info.value.attempts == 4 and info.value.url == f"http://127.0.0.1:{port}/score"
    message = str(info.value)
    assert message.startswith(f"reward model server at http://127.0.0.1:{port}/score failed 4 attempt(s) over 3.5 s "
                              "(retry budget reward.model_retry_s=3.5 s); last error: cannot connect:")
    assert "Connection refused" in message
    # Every failed attempt that is retried is logged, with the wait and the budget.
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and all(f"127.0.0.1:{port}/score: attempt" in m for m in logged)
    assert "attempt 3 failed (cannot connect:" in logged[2] and "retrying in 2.0 s (1.5 of the 3.5 s" in logged[2]


def test_backoff_is_capped():
    sleeps = []
    client = RewardModelClient(f"http://127.0.0.1:{closed_port()}", retry_s=12, backoff_s=1.0,
                               max_backoff_s=3.0, sleep=sleeps.append)
    with pytest.raises(RewardServerError, match="failed 6 attempt"):
        client.health()
    assert sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_budget_counts_wall_time_of_slow_attempts():
    """Attempts that each take long (a silent server's timeouts) use up the budget too."""
    now = [0.0]

    def slow_clock():
        now[0] += 10.0  # every clock reading is 10 s later: attempts are slow
        return now[0]

    sleeps = []
    client = RewardModelClient(f"http://127.0.0.1:{closed_port()}", retry_s=25, backoff_s=1.0,
                               sleep=sleeps.append, clock=slow_clock)
    # Clock readings 10 s apart: 10 s spent after attempt 1, 20 s after 2, 30 s after 3 > 25.
    with pytest.raises(RewardServerError, match=r"failed 3 attempt\(s\) over 30\.0 s"):
        client.health()
    assert sleeps == [1.0, 2.0]


def test_silent_server_times_out_and_is_retried():
    # A listening socket that never accepts: the kernel completes the TCP handshake, the
    # request is sent, and no answer ever comes.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sleeps = []
        # Each attempt takes the 0.5 s timeout: the budget of 0.8 s holds one retry, never two.
        client = RewardModelClient(url, timeout_s=0.5, retry_s=0.8, backoff_s=0.01, sleep=sleeps.append)
        start = time.monotonic()
        with pytest.raises(RewardServerError) as info:
            client.score(items("a"))
        assert time.monotonic() - start < 10
    assert sleeps == [0.01] and info.value.attempts == 2
    assert "failed 2 attempt(s) over " in str(info.value) and "last error: timed out after 0.5 s" in str(info.value)


class StubServer:
    """An in-thread HTTP server answering POST /score from a list of (status, payload)."""

    def __init__(self, answers, port: int = 0):
        self.answers = list(answers)
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                status, payload = stub.answers[min(len(stub.requests), len(stub.answers)) - 1]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval: shutdown() waits for the serve loop to look up.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @classmethod
    def on_port(cls, port: int, answers) -> "StubServer":
        return cls(answers, port=port)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_5xx_is_retried_until_success():
    answers = [(503, {"error": "overloaded"}), (500, {"error": "CUDA OOM"}), (200, {"scores": [0.5, -1.5]})]
    sleeps = []
    with StubServer(answers) as stub:
        client = RewardModelClient(stub.url, retry_s=60, backoff_s=0.1, sleep=sleeps.append)
        assert client.score(items("a", "b")) == [0.5, -1.5]
    sent = {"items": [{"prompt": p, "response": "r", "images": []} for p in "ab"]}
    assert sleeps == [0.1, 0.2] and stub.requests == [sent] * 3


def test_5xx_that_persists_names_the_last_error():
    sleeps = []
    with StubServer([(503, {"error": "overloaded"})]) as stub:
        client = RewardModelClient(stub.url, retry_s=0.35, backoff_s=0.1, sleep=sleeps.append)  # 0.1 + 0.2 fit
        with pytest.raises(RewardServerError) as info:
            client.score(items("a"))
    assert len(stub.requests) == 3 and sleeps == [0.1, 0.2] and info.value.status == 503
    assert str(info.value) == (f"reward model server at {stub.url}/score failed 3 attempt(s) over 0.3 s (retry "
                               "budget reward.model_retry_s=0.35 s); last error: HTTP 503: overloaded")


def test_batches_and_reply_checks():
    with StubServer([(200, {"scores": [1, 2]}), (200, {"scores": [3]})]) as stub:
        client = RewardModelClient(stub.url, batch_size=2)
        assert client.score(items("a", "b", "c")) == [1.0, 2.0, 3.0]
    assert [[i["prompt"] for i in r["items"]] for r in stub.requests] == [["a", "b"], ["c"]]
    with StubServer([(200, {"scores": [1, 2]}), (200, {"scores": [3]})]) as stub:  # the old text-only form
        assert RewardModelClient(stub.url, batch_size=2).score_texts(["a", "b", "c"]) == [1.0, 2.0, 3.0]
    assert stub.requests == [{"texts": ["a", "b"]}, {"texts": ["c"]}]
    with StubServer([(200, {"scores": [1.0]})]) as stub:
        with pytest.raises(RewardServerError, match=r'answered \{"scores": \[1.0\]\}; expected \{"scores": \[2 finite'):
            RewardModelClient(stub.url).score(items("a", "b"))
    with StubServer([(200, {"scores": [float("nan")]})]) as stub:
        with pytest.raises(RewardServerError, match="expected"):
            RewardModelClient(stub.url).score(items("a"))


def test_images_travel_as_absolute_paths_or_base64(tmp_path, monkeypatch):
    image = tmp_path / "img.png"
    image.write_bytes(b"\x89PNG bytes")  # the client sends bytes; only the server decodes them
    monkeypatch.chdir(tmp_path)
    with StubServer([(200, {"scores": [0.0]})]) as stub:
        RewardModelClient(stub.url).score(items("q", images=("img.png",)))  # relative to the client's cwd
        RewardModelClient(stub.url, image_transport="base64").score(items("q", images=(image,)))
    assert stub.requests[0]["items"][0]["images"] == [str(image)]
    assert stub.requests[1]["items"][0]["images"] == [
        "data:image/png;base64," + base64.b64encode(b"\x89PNG bytes").decode()]


def test_client_argument_errors():
    with pytest.raises(ValueError, match=r"reward model url 'localhost:8000' must look like http://HOST:PORT"):
        RewardModelClient("localhost:8000")
    with pytest.raises(ValueError, match=r"RewardModelClient\.batch_size must be a finite number >= 1, got 0"):
        RewardModelClient("http://127.0.0.1:1", batch_size=0)
    with pytest.raises(TypeError, match=r"texts\[1\] is int, expected str"):
        RewardModelClient("http://127.0.0.1:1").score_texts(["a", 1])
    with pytest.raises(TypeError, match=r"items\[1\] is str, expected RewardItem"):
        RewardModelClient("http://127.0.0.1:1").score([RewardItem("a", "b"), "c"])
    with pytest.raises(TypeError, match=r"items\[0\]\.images\[0\] is int; expected a file path or a PIL image"):
        RewardModelClient("http://127.0.0.1:1").score([RewardItem("a", "b", (3,))])
    with pytest.raises(ValueError, match=r"image_transport 'ftp' is not one of path, base64"):
        RewardModelClient("http://127.0.0.1:1", image_transport="ftp")


def test_server_back_within_the_budget_is_not_a_failure():
    """A server restarting (down for ~1 s, then up on the same port) inside the retry
    budget: the request succeeds after logged retries; nothing is raised."""
    port = closed_port()
    ready = threading.Event()

    def restart_later():
        time.sleep(1.0)
        with StubServer.on_port(port, [(200, {"scores": [0.25]})]):
            ready.set()
            done.wait(30)

    done = threading.Event()
    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    client = RewardModelClient(f"http://127.0.0.1:{port}", retry_s=20, backoff_s=0.2)
    try:
        assert client.score(items("a")) == [0.25]
    finally:
        done.set()
        thread.join(30)
    assert ready.is_set()
