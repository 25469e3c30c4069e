"""A stand-in reward-model server (the HTTP protocol of rewards/protocol.py) in a thread, for
tests of tools that score with a run's reward: fast, no model, scores chosen by the test."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class StandInRewardServer:
    """Answers ``/health`` and ``/score`` (``score(response text) -> float`` per item); after
    ``fail_after`` /score requests it answers 500. ``items`` records what it was asked to judge."""

    def __init__(self, score: Callable[[str], float], fail_after: Optional[int] = None):
        self.requests, self.fail_after, self.items = 0, fail_after, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(200, {"status": "ok", "model": "fake", "num_labels": 1, "score_index": 0,
                                   "max_texts": 64})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.items += body["items"]
                if server.fail_after is not None and server.requests > server.fail_after:
                    return self._answer(500, {"error": "out of memory"})
                self._answer(200, {"scores": [score(item["response"]) for item in body["items"]]})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()
