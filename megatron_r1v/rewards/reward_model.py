"""Reward-model reward r_theta of the hybrid reward (R1V2 report, Eq. 7): HTTP client and text scorer.

The report scores responses with its Skywork-VL Reward model ("a preference reward
signal r_theta, supplementing the rule-based reward r_rule"), a vision-language model
that sees the image it judges. A scorer (:class:`~.protocol.RewardScorer`) takes
:class:`~.protocol.RewardItem` s (prompt, response, images) and returns one float each:
:class:`RewardModelClient` sends them to ``tools/serve_reward_model.py``, which serves a
Skywork-VL-Reward checkpoint (``skywork_vl.py``), an R1V checkpoint with a value head
(``r1v_reward.py``) or a text-only sequence classifier (:class:`HFRewardModel`, which
also runs in-process and reads ``prompt + "\\n\\n" + response``, never the images).

HTTP protocol (JSON bodies, UTF-8; :mod:`.protocol` has the item and image rules):

    GET  /health -> 200 {"status": "ok", "model": str, "kind": "skywork-vl" | "r1v" | "text",
                         "images": bool, "num_labels": int, "score_index": int,
                         "max_texts": int, "max_items": int, "max_images": int}
    POST /score  {"items": [{"prompt": str, "response": str, "images": [str, ...]}, ...]}
                 -> 200 {"scores": [float, ...]}   (same length and order)
    POST /score  {"texts": [str, ...]} -> 200 {"scores": [...]}   (text-only models only)
    errors       -> 4xx / 5xx {"error": "message"}

Images travel as absolute paths on a filesystem the server shares
(``reward.model_image_transport: path``, the default) or as base64 data URLs of the
files' bytes (``base64``, for a server on another machine). A 4xx means the request is
wrong (malformed JSON, a missing or non-string field, a missing or undecodable image, too
many items or images): the client raises at once with the server's message, which names
the field, since repeating the request cannot help. Connection errors, timeouts and 5xx
are retried.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union
from urllib.parse import urlsplit

from .http_json import HTTPFailure, exchange
from .protocol import IMAGE_TRANSPORTS, ImageTransport, RewardItem, RewardScorer, item_to_json

if TYPE_CHECKING:
    from megatron_r1v.config import RewardConfig

__all__ = ["HFRewardModel", "RewardItem", "RewardModelClient", "RewardScorer", "RewardServerError",
           "save_random_reward_model"]

_log = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """The reward-model server could not score a request (down, failing, or refusing it)."""

    def __init__(self, message: str, url: str, attempts: int, status: Optional[int] = None):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


@dataclass
class RewardModelClient:
    """Scores items (or, for a text-only server, texts) on a reward-model server, in
    batches, retrying within a time budget.

    A request that fails with a connection error, a timeout or a 5xx is retried while
    the time spent on it stays within ``retry_s``; before retry k (k = 1, 2, ...) the
    client sleeps ``min(backoff_s * 2**(k-1), max_backoff_s)`` and logs the failed
    attempt (a warning naming the URL, the cause and the budget left). When the next
    sleep would pass the budget it raises :class:`RewardServerError` naming the URL, the
    attempts, the time spent and the last error. A 4xx is never retried.
    """

    url: str
    """Base URL of the server, e.g. ``http://127.0.0.1:8000`` (``/score`` and ``/health`` are appended)."""
    timeout_s: float = 60.0
    """Socket timeout of one request (connect and each read)."""
    retry_s: float = 300.0
    """Time budget for retrying one request (0: no retries). See ``RewardConfig.model_retry_s``."""
    backoff_s: float = 1.0
    batch_size: int = 32
    """Items per request; longer lists are split, so the server's memory stays bounded."""
    max_backoff_s: float = 30.0
    image_transport: ImageTransport = "path"
    """How images travel: ``path`` (absolute paths on a shared filesystem) or ``base64``
    (the files' bytes; the client reads them). See ``RewardConfig.model_image_transport``."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    """Injected so tests (and callers with their own clock) need not wait for real; the
    budget counts the seconds asked of it, so a fake sleep still ends the retries."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"reward model url {self.url!r} must look like http://HOST:PORT")
        self.url = self.url.rstrip("/")
        for name, minimum in (("timeout_s", 1e-9), ("retry_s", 0), ("backoff_s", 0), ("batch_size", 1),
                              ("max_backoff_s", 0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
                raise ValueError(f"RewardModelClient.{name} must be a finite number >= {minimum}, got {value!r}")
        if self.image_transport not in IMAGE_TRANSPORTS:
            raise ValueError(f"RewardModelClient.image_transport {self.image_transport!r} is not one of "
                             f"{', '.join(IMAGE_TRANSPORTS)}")

    @classmethod
    def from_config(cls, config: "RewardConfig", sleep: Callable[[float], None] = time.sleep) -> "RewardModelClient":
        """The client a run's ``reward.*`` settings describe (``reward_model_url`` must be set)."""
        return cls(config.reward_model_url, timeout_s=config.model_timeout_s, retry_s=config.model_retry_s,
                   backoff_s=config.model_backoff_s, batch_size=config.model_batch_size,
                   image_transport=config.model_image_transport, sleep=sleep)

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        """One score per item; raises RewardServerError when the server cannot answer. Every
        item is encoded before the first request, so a bad one (TypeError, or
        FileNotFoundError for an unreadable image sent as base64) sends nothing."""
        payload = [item_to_json(item, i, self.image_transport) for i, item in enumerate(items)]
        return self._score_in_batches("items", payload)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """The old text-only form (``{"texts": [...]}``), which only a text-only server takes."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        return self._score_in_batches("texts", list(texts))

    def _score_in_batches(self, form: str, entries: list) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(entries), self.batch_size):
            batch = entries[start:start + self.batch_size]
            reply = self._request("POST", "/score", {form: batch})
            scores += self._check_scores(reply, len(batch))
        return scores

    def health(self) -> dict:
        """The server's /health answer (same retries as score)."""
        reply = self._request("GET", "/health", None)
        if not isinstance(reply, dict):
            raise RewardServerError(f"reward model server at {self.url}/health answered {reply!r}, not an object",
                                    self.url + "/health", 1)
        return reply

    def _check_scores(self, reply: Any, expected: int) -> list[float]:
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if (not isinstance(scores, list) or len(scores) != expected
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           for s in scores)):
            shown = json.dumps(reply)[:300]
            raise RewardServerError(
                f"reward model server at {self.url}/score answered {shown}; expected "
                f'{{"scores": [{expected} finite numbers]}}', self.url + "/score", 1)
        return [float(s) for s in scores]

    def _request(self, method: str, path: str, payload: Optional[dict]) -> Any:
        url = self.url + path
        start, slept, attempt = self.clock(), 0.0, 0
        while True:
            attempt += 1
            try:
                return self._once(method, url, payload)
            except HTTPFailure as failure:
                if not failure.retry:
                    raise RewardServerError(f"reward model server at {url} rejected the request (not retried): "
                                            f"{failure}", url, attempt, failure.status) from None
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                spent = max(self.clock() - start, slept)
                if spent + delay > self.retry_s:
                    raise RewardServerError(
                        f"reward model server at {url} failed {attempt} attempt(s) over {spent:.1f} s (retry budget "
                        f"reward.model_retry_s={self.retry_s:g} s); last error: {failure}",
                        url, attempt, failure.status) from None
                _log.warning("reward model server at %s: attempt %d failed (%s); retrying in %.1f s "
                             "(%.1f of the %g s retry budget used)", url, attempt, failure, delay, spent, self.retry_s)
                self.sleep(delay)
                slept += delay

    def _once(self, method: str, url: str, payload: Optional[dict]) -> Any:
        """One HTTP exchange: the decoded JSON answer, or HTTPFailure."""
        return exchange(method, url, payload, self.timeout_s)


class HFRewardModel:
    """A Hugging Face ``AutoModelForSequenceClassification`` scoring texts in-process.

    A text-only model: an item is read as ``item.text`` (prompt, blank line, response) and
    its images are never opened. The score of a text is the logit at ``score_index`` (0 for the usual one-label reward
    model). Batches are padded on the right: decoder classifiers (Qwen2...) read the last
    non-pad token, and with right padding every real token keeps the position it has in
    the text alone, also in models with absolute position embeddings, so a text scores
    the same in any batch. Texts longer than ``max_length`` tokens lose their
    beginning, not their end, because the end holds the answer being judged.
    torch and transformers are imported here, not at module import.
    """

    kind = "text"
    sees_images = False

    def __init__(self, model_dir: Union[str, Path], device: str = "cpu", batch_size: int = 8,
                 score_index: int = 0, max_length: Optional[int] = None, dtype: str = "fp32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(dtypes)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._torch = torch
        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=dtypes[dtype])
        self.model.to(self.device).eval()
        self.num_labels = int(self.model.config.num_labels)
        if not 0 <= score_index < self.num_labels:
            raise ValueError(f"score_index {score_index} is out of range for a model with "
                             f"num_labels={self.num_labels}")
        self.score_index = score_index
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        if getattr(config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            config.pad_token_id = self.tokenizer.pad_token_id
        # Without a pad token no batch can be padded: score one text at a time.
        self.batch_size = batch_size if self.tokenizer.pad_token_id is not None else 1
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length) if isinstance(n, int) and 0 < n < 10**9]
        self.max_length = min(limits) if limits else None

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        """One score per item, from its text alone."""
        return self.score_texts([item.text for item in items])

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        torch = self._torch
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start:start + self.batch_size])
                encoded = self.tokenizer(batch, return_tensors="pt", padding=True,
                                         truncation=self.max_length is not None, max_length=self.max_length)
                empty = (encoded["attention_mask"].sum(dim=1) == 0).nonzero().flatten().tolist()
                if empty:
                    # A classifier reading the last token has nothing to read: a caller's bug, not a score.
                    raise ValueError(f"texts[{start + empty[0]}] encodes to no tokens; nothing to score")
                encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
                logits_BL = self.model(**encoded).logits  # [B, num_labels]
                scores += logits_BL[:, self.score_index].float().cpu().tolist()
        return scores


def save_random_reward_model(out_dir: Union[str, Path], vocab_size: int, seed: int = 0) -> Path:
    """A tiny random Qwen2 sequence classifier (one label) for demos and tests, saved next to
    the project tokenizer already in ``out_dir`` (``data/tokenizer.py``, ``vocab_size`` tokens).

    Its scores carry no meaning, but they are graded, so GRPO groups of a random policy get
    non-zero advantages and the whole loop can be exercised.
    """
    import torch
    import transformers

    from megatron_r1v.data.tokenizer import ENDOFTEXT, special_token_ids

    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, num_labels=1,
        pad_token_id=special_token_ids(vocab_size)[ENDOFTEXT],
        # A wide init so the scores are O(1) and differ between texts.
        initializer_range=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.Qwen2ForSequenceClassification(config).save_pretrained(str(out_dir))
    return Path(out_dir)
