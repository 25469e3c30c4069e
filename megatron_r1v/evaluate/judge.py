"""Optional LLM judge of benchmark responses, served behind an OpenAI-compatible endpoint.

A local SGLang or vLLM server (``python -m sglang.launch_server ... --port 30000``) is the
usual judge; any server answering the two calls below works:

    GET  {url}/models            -> {"data": [{"id": MODEL}, ...]}
    POST {url}/chat/completions  {"model", "messages": [{"role": "user", "content": PROMPT}],
                                  "temperature": 0, "max_tokens"}
                                 -> {"choices": [{"message": {"content": REPLY}, "finish_reason"}]}

The prompt (``judge_prompt.md`` beside this module, or the caller's template) shows the
question, the lettered options of a choice item, the gold answer(s) with unit and
precision or tolerance, and the response's final part; the judge ends its reply with
``[[CORRECT]]`` or ``[[INCORRECT]]``. The last of those outside any ``<think>`` block is
the verdict (a reasoning judge may weigh both in its thought), read in any case and with
spaces inside the brackets ("[[ correct ]]"); a reply without one is ``correct=None`` with
an error starting "no verdict".

:meth:`JudgeClient.check_reachable` asks for the served models first, so a wrong URL or
model name fails before the evaluated model generates anything. Connection errors,
timeouts and 5xx are retried with exponential backoff up to ``max_retries`` times; a 4xx
is not (the request itself is wrong). A request that still fails raises
:class:`JudgeError` naming the URL: a missing verdict must never be recorded as "wrong".
A timeout's message, raised or logged before a retry, names ``--judge-timeout``. One
attempt is ``rewards.http_json.exchange`` (JSON body and headers, failures classed as
retryable or not), shared with the reward-model client; the retry loop is the judge's own,
counting attempts (``--judge-retries``) where the reward model budgets seconds.

The judge reads a response whose thought never closed too (its last characters); a caller
that wants to skip those asks ``evaluate.scoring.has_final_answer`` first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from megatron_r1v.data.schema import CHOICE_LETTERS
from megatron_r1v.data.tokenizer import IM_START, R1_BOS, THINK_END
from megatron_r1v.evaluate.items import EvalItem
from megatron_r1v.evaluate.scoring import strip_reply_end
from megatron_r1v.rewards.http_json import HTTPFailure, exchange

_log = logging.getLogger(__name__)

PROMPT_PATH = Path(__file__).with_name("judge_prompt.md")
PLACEHOLDERS: tuple[str, ...] = ("question", "options", "gold", "response")
REQUIRED_PLACEHOLDERS: tuple[str, ...] = ("question", "gold", "response")
JUDGE_FLAGS: dict[str, str] = {
    "url": "--judge-url", "model": "--judge-model", "timeout_s": "--judge-timeout", "max_retries": "--judge-retries",
    "concurrency": "--judge-concurrency", "max_tokens": "--judge-max-tokens", "api_key_env": "--judge-api-key-env",
}
"""The command-line flag of each :class:`JudgeConfig` field, named by its validation errors."""
RESPONSE_TAIL_CHARS = 2000
"""What the judge sees of a response whose thought never closed: its last characters."""
MAX_REGION_CHARS = 8000
"""The most of an answer region (after ``</think>``) the judge sees: its end, where the answer is."""
BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0

# Judges vary the token's case and spacing ("[[ Correct ]]"); the word, not the form, is the verdict.
_VERDICT_RE = re.compile(r"\[\[\s*(CORRECT|INCORRECT)\s*\]\]", re.IGNORECASE)
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_PLACEHOLDER_RE = re.compile(r"\{\{(\w+)\}\}")
_LEADING_COMMENT_RE = re.compile(r"\A\s*<!--.*?-->\s*", re.DOTALL)
_IMAGE_TAG_RE = re.compile(r"<image\s*(\d+)>")


class JudgeError(RuntimeError):
    """The judge server cannot be used: unreachable, failing, refusing, or not serving the model."""

    def __init__(self, message: str, url: str, status: Optional[int] = None):
        super().__init__(message)
        self.url = url
        self.status = status


def _check_number(name: str, value: Any, minimum: Optional[int]) -> None:
    """ValueError naming the flag unless ``value`` is an integer >= ``minimum`` (None: a finite number > 0)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if minimum is not None and not (is_int and value >= minimum):
        raise ValueError(f"{JUDGE_FLAGS[name]} must be an integer >= {minimum}, got {value!r}")
    if minimum is None and not ((is_int or isinstance(value, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{JUDGE_FLAGS[name]} must be a finite number of seconds > 0, got {value!r}")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how to call it; errors name the CLI flag (:data:`JUDGE_FLAGS`)."""

    url: str
    """Base URL of the OpenAI-compatible API, e.g. ``http://127.0.0.1:30000/v1``."""
    model: str = ""
    """Served model name; "" takes the first one ``GET {url}/models`` lists."""
    timeout_s: float = 120.0
    """Socket timeout of one request; a reasoning judge takes a while to answer."""
    max_retries: int = 3
    concurrency: int = 8
    """Requests in flight at once (the server batches them)."""
    max_tokens: int = 2048
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding a bearer token; unset or empty sends none (local servers)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{JUDGE_FLAGS['url']} must be http(s)://HOST:PORT/v1 (the OpenAI-compatible base URL), "
                             f"got {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))  # frozen: the normal form is set once
        for name, minimum in (("timeout_s", None), ("max_retries", 0), ("concurrency", 1), ("max_tokens", 1)):
            _check_number(name, getattr(self, name), minimum)
        if not isinstance(self.model, str) or not isinstance(self.api_key_env, str):
            raise ValueError(f"{JUDGE_FLAGS['model']} and {JUDGE_FLAGS['api_key_env']} must be strings")


@dataclass(frozen=True)
class JudgeVerdict:
    """The judge's reading of one response."""

    correct: Optional[bool]
    """None when the reply holds no verdict."""
    reply: str
    """The judge's whole reply, for the samples file."""
    error: Optional[str]
    """Why there is no verdict ("no verdict ..."); None with one."""


# --- the prompt ----------------------------------------------------------------------------


def load_prompt_template(path: Path = PROMPT_PATH) -> str:
    """The packaged prompt, its leading ``<!-- -->`` comment (notes for maintainers) removed."""
    return _LEADING_COMMENT_RE.sub("", path.read_text(encoding="utf-8"), count=1)


def check_template(template: str) -> None:
    """ValueError when ``template`` uses an unknown placeholder or lacks a required one."""
    used = set(_PLACEHOLDER_RE.findall(template))
    unknown, missing = used - set(PLACEHOLDERS), set(REQUIRED_PLACEHOLDERS) - used
    if unknown or missing:
        raise ValueError(f"judge prompt template: unknown placeholder(s) {sorted(unknown)}, missing {sorted(missing)}; "
                         f"it takes {', '.join('{{' + p + '}}' for p in PLACEHOLDERS)}")


def judge_question(item: EvalItem) -> str:
    """The question as written (else as shown), ``<image>`` removed and ``<image 2>`` as ``[image 2]``."""
    text = item.raw_question or item.question
    text = _IMAGE_TAG_RE.sub(r"[image \1]", text).replace("<image>", "")
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def options_text(item: EvalItem) -> str:
    if not item.choices:
        return "(none: not a multiple-choice question)"
    return "\n".join(f"{CHOICE_LETTERS[i]}. {option}" for i, option in enumerate(item.choices))


def gold_text(item: EvalItem) -> str:
    """The gold answer(s) as the judge reads them, with the comparison the benchmark asks for."""
    if item.answer_kind == "choice" and item.choices:
        letter = item.answers[0].strip()
        index = CHOICE_LETTERS.find(letter) if len(letter) == 1 else -1
        text = f"{letter}. {item.choices[index]}" if 0 <= index < len(item.choices) else letter
    elif len(item.answers) == 1:
        text = item.answers[0]
    else:
        text = "any one of: " + " | ".join(item.answers)
    notes = []
    if item.unit:
        notes.append(f"unit: {item.unit}")
    if item.precision is not None:
        notes.append(f"compare at {item.precision} decimal place(s)")
    if item.tolerance is not None:
        notes.append(f"an absolute error up to {item.tolerance:g} is accepted")
    return f"{text} ({'; '.join(notes)})" if notes else text


def response_tail(response: str) -> str:
    """The part of a response the judge reads: after the last ``</think>``, else its last characters."""
    text = strip_reply_end(response)
    for token in (IM_START, R1_BOS):
        text = text.replace(token, "")
    end = text.rfind(THINK_END)
    if end >= 0:
        region = text[end + len(THINK_END):].strip()
        return region if len(region) <= MAX_REGION_CHARS else "[...] " + region[-MAX_REGION_CHARS:]
    text = text.strip()
    return text if len(text) <= RESPONSE_TAIL_CHARS else "[...] " + text[-RESPONSE_TAIL_CHARS:]


def render_prompt(template: str, item: EvalItem, response: str) -> str:
    """``template`` filled for one response, in one pass (values are never searched for placeholders)."""
    fields = {"question": judge_question(item), "options": options_text(item), "gold": gold_text(item),
              "response": response_tail(response)}
    return _PLACEHOLDER_RE.sub(lambda match: fields[match.group(1)], template)


def parse_verdict(reply: str, finish_reason: Optional[str] = None) -> JudgeVerdict:
    """The verdict of a judge's reply: the last verdict token outside ``<think>`` blocks."""
    visible = _THINK_BLOCK_RE.sub("", reply)
    if THINK_END in visible:  # the thought was opened by the judge's chat template
        visible = visible[visible.rfind(THINK_END) + len(THINK_END):]
    if "<think>" in visible:
        return JudgeVerdict(None, reply, "no verdict: the judge's reply ends inside <think>")
    tokens = _VERDICT_RE.findall(visible)
    if not tokens:
        cut = " (the reply was cut at --judge-max-tokens)" if finish_reason == "length" else ""
        return JudgeVerdict(None, reply, f"no verdict: neither [[CORRECT]] nor [[INCORRECT]] in the reply{cut}")
    return JudgeVerdict(tokens[-1].upper() == "CORRECT", reply, None)


# --- the client ----------------------------------------------------------------------------


def _failure_text(failure: HTTPFailure) -> str:
    """The failure's message; a timeout's names the flag that sets it (a slow reasoning judge)."""
    message = str(failure)
    # exchange() words every timeout "timed out after ..." and has no timeout flag of its own.
    return f"{message} ({JUDGE_FLAGS['timeout_s']})" if message.startswith("timed out") else message


class JudgeClient:
    """Judges (item, response) pairs on an OpenAI-compatible server (module docstring)."""

    def __init__(self, config: JudgeConfig, prompt_template: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.url = config.url
        self.template = load_prompt_template() if prompt_template is None else prompt_template
        check_template(self.template)
        self.model: Optional[str] = None
        """The model asked; set by :meth:`check_reachable` (discovered when ``config.model`` is "")."""
        self._sleep = sleep  # injected so tests need not wait out the backoff
        self._headers: dict[str, str] = {}  # exchange() sets Content-Type
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def check_reachable(self) -> str:
        """The served model to ask (``GET {url}/models``); JudgeError when the judge cannot be used."""
        wanted = self.config.model or "(the first one served)"
        try:
            reply = self._request("GET", "/models", None)
        except JudgeError as err:
            raise JudgeError(f"judge at {self.url} is not reachable (model {wanted}): {err}", self.url,
                             err.status) from None
        entries = reply.get("data") if isinstance(reply, dict) else None
        served = [e["id"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("id"), str)]
        if not served:
            raise JudgeError(f"judge at {self.url}/models lists no model: {json.dumps(reply)[:300]}", self.url)
        if self.config.model and self.config.model not in served:
            raise JudgeError(f"model {self.config.model!r} is not served by the judge at {self.url}; it serves "
                             f"{served} ({JUDGE_FLAGS['model']})", self.url)
        self.model = self.config.model or served[0]
        return self.model

    def judge_many(self, pairs: Sequence[tuple[EvalItem, str]]) -> list[JudgeVerdict]:
        """One verdict per (item, response), in input order; ``concurrency`` requests in flight."""
        if not pairs:
            return []
        if self.model is None:
            self.check_reachable()
        prompts = [render_prompt(self.template, item, response) for item, response in pairs]
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(prompts)),
                                thread_name_prefix="judge") as pool:
            futures = [pool.submit(self.judge_prompt, prompt) for prompt in prompts]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:  # the batch has failed: send nothing more
                    future.cancel()
                raise

    def judge_prompt(self, prompt: str) -> JudgeVerdict:
        """The verdict on one rendered prompt."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                   "max_tokens": self.config.max_tokens}
        reply = self._request("POST", "/chat/completions", payload)
        try:
            choice = reply["choices"][0]
            content = choice["message"].get("content") or ""  # None when a reasoning parser took it all
            finish_reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"judge at {self.url}/chat/completions answered {json.dumps(reply)[:300]}; expected "
                             '{"choices": [{"message": {"content": ...}}]}', self.url) from None
        if not isinstance(content, str):
            raise JudgeError(f"judge at {self.url}/chat/completions answered a {type(content).__name__} content",
                             self.url)
        return parse_verdict(content, finish_reason)

    def _request(self, method: str, path: str, payload: Optional[dict]) -> Any:
        url = self.url + path
        attempts = self.config.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return exchange(method, url, payload, self.config.timeout_s, self._headers)
            except HTTPFailure as failure:
                if not failure.retry:
                    raise JudgeError(f"judge at {url} refused the request (not retried): {failure}", url,
                                     failure.status) from None
                reason = _failure_text(failure)
                if attempt == attempts:
                    raise JudgeError(f"judge at {url} failed {attempts} attempt(s) ({JUDGE_FLAGS['max_retries']}="
                                     f"{self.config.max_retries}); last error: {reason}", url,
                                     failure.status) from None
                delay = min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)
                _log.warning("judge at %s: attempt %d of %d failed (%s); retrying in %.0f s", url, attempt,
                             attempts, reason, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises
