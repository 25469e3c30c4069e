"""Serve a reward model r_theta of Eq. 7 over HTTP: image-aware, or text-only.

    python tools/serve_reward_model.py --model DIR [--host 127.0.0.1] [--port 0] \\
        [--kind auto] [--batch-size 8] [--device cpu] [--dtype fp32] [--max-items 1024] \\
        [--max-images 16] [--max-tiles 12] [--score-index 0] [--max-length N]

``--model`` is one of three kinds (``megatron_r1v/rewards/loading.py`` tells them apart
from ``config.json``):

* ``skywork-vl``: a Skywork-VL-Reward checkpoint (Qwen2.5-VL + ``value_head.safetensors``),
  e.g. ``Skywork/Skywork-VL-Reward-7B`` (``megatron_r1v/rewards/skywork_vl.py`` cites the
  names it follows);
* ``r1v``: an R1V / InternVL checkpoint + ``value_head.safetensors``
  (``megatron_r1v/rewards/r1v_reward.py``; ``--max-tiles`` applies);
* ``text``: any ``AutoModelForSequenceClassification``; the score is the logit at
  ``--score-index`` of ``prompt + "\\n\\n" + response`` (images are never opened).

``tools/make_tiny_checkpoint.py --reward-model {skywork-vl,r1v}`` writes tiny random ones.
Once listening, the server prints ONE JSON line to stdout, e.g.

    {"event": "listening", "url": "http://127.0.0.1:40123", "model": "DIR", "kind": "skywork-vl",
     "num_labels": 1, "score_index": 0}

so a caller can start it with ``--port 0`` (a free port) and read the URL; everything
else goes to stderr. Point ``reward.reward_model_url`` at that URL. Protocol
(``megatron_r1v/rewards/protocol.py`` has the rules):

    GET  /health   -> {"status": "ok", "model", "kind", "images", "num_labels", "score_index",
                       "max_texts", "max_items", "max_images"}
    POST /score {"items": [{"prompt": str, "response": str, "images": [path or base64, ...]}, ...]}
                   -> {"scores": [float, ...]}
    POST /score {"texts": [str, ...]} -> {"scores": [...]}      (text kind only)
    a bad request  -> 400 {"error": "... names the field, e.g. items[1].images[0] ..."}
    unknown paths 404; a body over --max-body-mb 413; scoring failures 500

Requests are served on threads (JSON parsing and image decoding run in parallel), but one
batch runs on the model at a time, so memory stays bounded by ``--batch-size``. Stop it
with Ctrl-C or SIGTERM.
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

from megatron_r1v.rewards.protocol import RequestError, RequestLimits, ScoreRequest, parse_score_body


class ScoringService:
    """Request validation and scoring, apart from HTTP so the rules read in one place."""

    def __init__(self, scorer: Any, model: str, limits: RequestLimits):
        self.scorer = scorer
        self.model = model
        self.limits = limits
        self.lock = threading.Lock()  # one forward at a time: threads would only add memory

    def health(self) -> dict:
        return {"status": "ok", "model": self.model, "kind": self.scorer.kind, "images": self.scorer.sees_images,
                "num_labels": self.scorer.num_labels, "score_index": self.scorer.score_index,
                "max_texts": self.limits.max_items, "max_items": self.limits.max_items,
                "max_images": self.limits.max_images}

    def parse(self, body: bytes) -> ScoreRequest:
        """The request in a /score body; RequestError with the message the client will see."""
        request = parse_score_body(body, self.limits, decode_images=self.scorer.sees_images)
        if request.texts is not None and self.scorer.kind != "text":
            raise RequestError(f'"texts" is the text-only form; this server runs a {self.scorer.kind} reward model, '
                               'which needs {"items": [{"prompt", "response", "images"}, ...]}')
        return request

    def score(self, request: ScoreRequest) -> list[float]:
        with self.lock:
            if request.texts is not None:
                return self.scorer.score_texts(request.texts)
            return self.scorer.score(request.items)


def make_handler(service: ScoringService, log_requests: bool, max_body_bytes: int) -> type:
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
            body = self._read_body()
            if body is None:
                return
            try:
                request = service.parse(body)
                scores = service.score(request)
            except ValueError as err:  # RequestError, or items the model cannot take (too long, ...)
                self._reply(400, {"error": str(err)})
                return
            except Exception as err:  # the client retries a 500; the message says what failed here
                self._reply(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
                return
            self._reply(200, {"scores": scores})

        def _read_body(self) -> Optional[bytes]:
            """The body of a POST /score, or None after answering the error."""
            if self.path != "/score":
                self.close_connection = True  # the body is not read: it must not be taken for a request
                self._reply(404, {"error": f"unknown path {self.path!r}; POST /score or GET /health"})
                return None
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                self._reply(411, {"error": "a Content-Length header is required"})
                return None
            if not 0 <= length <= max_body_bytes:
                self.close_connection = True  # the unread body would be taken for the next request
                self._reply(413, {"error": f"body of {length} bytes; at most {max_body_bytes} (--max-body-mb)"})
                return None
            return self.rfile.read(length)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
            if log_requests:
                super().log_message(format, *args)

    return Handler


def _stop(signum: int, frame: Any) -> None:
    # SIGTERM (what launchers and tests send) ends serve_forever the way Ctrl-C does.
    raise KeyboardInterrupt


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="folder of the reward model (see the kinds above)")
    parser.add_argument("--kind", default="auto", choices=["auto", "skywork-vl", "r1v", "text"],
                        help="the model's kind; auto reads config.json (an explicit kind must match it)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on startup)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--score-index", type=int, default=0, help="text kind: which logit is the score")
    parser.add_argument("--max-length", type=int, default=None,
                        help="text kind: truncate texts to this many tokens (from the left); vision-language "
                             "kinds: refuse longer items (default: the model's positions)")
    parser.add_argument("--max-items", "--max-texts", dest="max_items", type=int, default=1024,
                        help="most items (or texts) accepted in one request")
    parser.add_argument("--max-images", type=int, default=16, help="most images per item")
    parser.add_argument("--max-tiles", type=int, default=12, help="r1v kind: InternVL tiles per image (+ thumbnail)")
    parser.add_argument("--max-body-mb", type=float, default=256.0, help="largest request body (base64 images)")
    parser.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_items", "max_images", "max_tiles"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected a Hugging Face model folder)")
    return parser, args


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    from megatron_r1v.rewards.loading import ScorerOptions, load_reward_model

    options = ScorerOptions(device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                            max_length=args.max_length, score_index=args.score_index, max_tiles=args.max_tiles)
    try:
        scorer = load_reward_model(args.model, options, kind=args.kind)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: {err}")
    service = ScoringService(scorer, str(args.model), RequestLimits(args.max_items, args.max_images))
    handler = make_handler(service, args.log_requests, int(args.max_body_mb * 2**20))
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as err:
        parser.error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    server.daemon_threads = True
    host, port = server.server_address[:2]
    shown_host = f"[{host}]" if ":" in host else host
    signal.signal(signal.SIGTERM, _stop)
    print(json.dumps({"event": "listening", "url": f"http://{shown_host}:{port}", "model": str(args.model),
                      "kind": scorer.kind, "num_labels": scorer.num_labels, "score_index": scorer.score_index}),
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
