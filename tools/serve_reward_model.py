"""Serve a Hugging Face sequence-classification model as the reward model r_theta of Eq. 7.

    python tools/serve_reward_model.py --model DIR [--host 127.0.0.1] [--port 0] \\
        [--batch-size 8] [--device cpu] [--score-index 0] [--max-texts 1024]

Any ``AutoModelForSequenceClassification`` checkpoint works; the score of a text is the
logit at ``--score-index`` (0: the one logit of a usual reward model). Once listening,
the server prints ONE JSON line to stdout, e.g.

    {"event": "listening", "url": "http://127.0.0.1:40123", "model": "DIR", "num_labels": 1, "score_index": 0}

so a caller can start it with ``--port 0`` (a free port) and read the URL; everything
else goes to stderr. Point ``reward.reward_model_url`` at that URL. Protocol (see
``megatron_r1v/rewards/reward_model.py``):

    GET  /health                      -> {"status": "ok", "model", "num_labels", "score_index", "max_texts"}
    POST /score {"texts": [str, ...]} -> {"scores": [float, ...]}
    malformed requests                -> 400 {"error": "..."}; unknown paths 404; scoring failures 500

Requests are served on threads, but one batch runs on the model at a time, so memory
stays bounded by ``--batch-size``. The text-only server ignores images. Stop it with
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

MAX_BODY_BYTES = 64 * 1024 * 1024


class ScoringService:
    """Request validation and scoring, apart from HTTP so the rules read in one place."""

    def __init__(self, scorer: Any, model: str, max_texts: int):
        self.scorer = scorer
        self.model = model
        self.max_texts = max_texts
        self.lock = threading.Lock()  # one forward at a time: threads would only add memory

    def health(self) -> dict:
        return {"status": "ok", "model": self.model, "num_labels": self.scorer.num_labels,
                "score_index": self.scorer.score_index, "max_texts": self.max_texts}

    def parse_texts(self, body: bytes) -> list[str]:
        """The texts of a /score body; ValueError with the message the client will see."""
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise ValueError(f"body is not valid JSON: {err}") from None
        if not isinstance(payload, dict) or "texts" not in payload:
            raise ValueError('body must be a JSON object {"texts": [str, ...]}')
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise ValueError(f'"texts" must be a list of strings, got {type(texts).__name__}')
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f'"texts"[{i}] must be a string, got {type(text).__name__}')
        if len(texts) > self.max_texts:
            raise ValueError(f"{len(texts)} texts in one request; this server takes at most {self.max_texts} "
                             "(lower the client's batch size, reward.model_batch_size, or restart with --max-texts)")
        return texts

    def score(self, texts: list[str]) -> list[float]:
        with self.lock:
            return self.scorer.score(texts)


def make_handler(service: ScoringService, log_requests: bool) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._reply(200, service.health())
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}; GET /health or POST /score"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                self.close_connection = True  # the body is not read: it must not be taken for a request
                self._reply(404, {"error": f"unknown path {self.path!r}; POST /score or GET /health"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                self._reply(411, {"error": "a Content-Length header is required"})
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the unread body would be taken for the next request
                self._reply(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
                return
            try:
                texts = service.parse_texts(self.rfile.read(length))
            except ValueError as err:
                self._reply(400, {"error": str(err)})
                return
            try:
                scores = service.score(texts)
            except ValueError as err:  # the texts cannot be scored (e.g. one encodes to no tokens)
                self._reply(400, {"error": str(err)})
                return
            except Exception as err:  # the client retries a 500; the message says what failed here
                self._reply(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
                return
            self._reply(200, {"scores": scores})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
            if log_requests:
                super().log_message(format, *args)

    return Handler


def _stop(signum: int, frame: Any) -> None:
    # SIGTERM (what launchers and tests send) ends serve_forever the way Ctrl-C does.
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder of a HF sequence-classification model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on startup)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--score-index", type=int, default=0, help="which logit is the score")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens (from the left)")
    parser.add_argument("--max-texts", type=int, default=1024, help="most texts accepted in one request")
    parser.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected a Hugging Face model folder)")
    if args.max_texts < 1:
        parser.error(f"--max-texts must be >= 1, got {args.max_texts}")

    from megatron_r1v.rewards.reward_model import HFRewardModel

    try:
        scorer = HFRewardModel(args.model, device=args.device, batch_size=args.batch_size,
                               score_index=args.score_index, max_length=args.max_length, dtype=args.dtype)
    except ValueError as err:
        parser.error(str(err))
    service = ScoringService(scorer, str(args.model), args.max_texts)
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(service, args.log_requests))
    except OSError as err:
        parser.error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    server.daemon_threads = True
    host, port = server.server_address[:2]
    shown_host = f"[{host}]" if ":" in host else host
    signal.signal(signal.SIGTERM, _stop)
    print(json.dumps({"event": "listening", "url": f"http://{shown_host}:{port}", "model": str(args.model),
                      "num_labels": scorer.num_labels, "score_index": scorer.score_index}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
