"""A fake LLM judge: an HTTP server in a thread that speaks the OpenAI chat API (GET /v1/models,
POST /v1/chat/completions) and answers like a judge model given evaluate/judge_prompt.md:
[[CORRECT]] when the gold answer occurs in the response part of the prompt. Used by the judge
client's tests and the evaluator's suite test (an external GPU service, faked at its boundary)."""

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class FakeJudge:
    """State and behaviour of the fake server; tests set the knobs before the calls."""

    def __init__(self):
        self.models = ["judge-7b", "other"]
        self.fail_statuses = []   # statuses answered to the next chat requests, in order, before real ones
        self.style = "plain"      # plain | think | opened-think | garbage | no-choices
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self.chat_bodies = []
        self.headers = []
        self.in_flight = self.max_in_flight = 0

    def reply(self, prompt: str) -> str:
        gold = re.search(r"<reference_answer>\n(.*?)\n</reference_answer>", prompt, re.S).group(1)
        response = re.search(r"<response>\n(.*?)\n</response>", prompt, re.S).group(1)
        verdict = "[[CORRECT]]" if gold.split(" (")[0] in response else "[[INCORRECT]]"
        other = "[[INCORRECT]]" if verdict == "[[CORRECT]]" else "[[CORRECT]]"
        if self.style == "think":  # the wrong token inside the thought must be ignored
            return f"<think>Is it {other}? Let me check.</think>\nThe values agree or not.\n{verdict}"
        if self.style == "opened-think":
            return f"Maybe {other}.\n</think>\n\n{verdict}"
        if self.style == "garbage":
            return "I think the student is probably right."
        return f"The final answer matches the reference or not.\n{verdict}"


def make_handler(fake: FakeJudge):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/v1/models":
                return self._send(404, {"error": "no such route"})
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "no such route"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.chat_bodies.append(body)
                fake.headers.append(dict(self.headers))
                status = fake.fail_statuses.pop(0) if fake.fail_statuses else 200
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            prompt = body["messages"][0]["content"]
            time.sleep(fake.delay_s * (1 + len(prompt) % 3))  # uneven: answers finish out of order
            with fake.lock:  # before answering: the client may send its next request at once
                fake.in_flight -= 1
            if status != 200:
                return self._send(status, {"error": {"message": f"fake failure {status}"}})
            if fake.style == "no-choices":
                return self._send(200, {"id": "x"})
            self._send(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": fake.reply(prompt)}}]})

    return Handler


@contextlib.contextmanager
def serve_fake_judge(fake: FakeJudge) -> Iterator[FakeJudge]:
    """Serves ``fake`` on a free local port in a thread; ``fake.url`` is its base URL (``.../v1``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
