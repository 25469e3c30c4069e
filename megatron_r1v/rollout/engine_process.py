"""A rollout engine in a process of its own, so that generation can run while the trainer trains.

``rollout.mode: async`` (``trainer/grpo_async.py``) needs the engine to generate step k+1's
responses while step k's forward and backward passes run. A thread cannot give that on CPU
(the HF engine's decode loop holds the GIL between small ops), and SGLang's ``Engine`` (0.5.23,
``entrypoints/engine.py``) drives every call through ``run_until_complete`` on the one event loop
it made at construction, which a generation in another thread would hold. So the engine lives in
a child process
(``spawn``: no inherited process groups or CUDA state), built there by a picklable factory,
and :class:`EngineProcess` is its proxy in the trainer: the same
:class:`~megatron_r1v.rollout.engine.RolloutEngine` methods, plus :meth:`~EngineProcess.start_generate`
/ :meth:`~EngineProcess.finish_generate`, which split ``generate`` around the work the trainer
does meanwhile.

Messages are pickled by value (``send_bytes``), tensors included: no shared-memory file
descriptors to run out of, and a CUDA tensor is moved to the host first (weights of an engine on
its own GPUs travel through host memory; at 38B with adapter-only training that is ~0.2 GB per
step). One call is outstanding at a time: while a generation runs, any other call is refused.

Failures are named: an exception inside the child comes back as this process's
:class:`EngineProcessError` with the child's message (its traceback on stderr), and a child that
died (killed, out of memory) is reported with its exit code instead of a hang.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from megatron_r1v.rollout.engine import RolloutEngine, RolloutRequest, RolloutSample, SamplingParams

_STARTUP_TIMEOUT_S = 600.0  # building a 38B SGLang engine (loading config, CUDA graphs) takes minutes


class EngineProcessError(RuntimeError):
    """The engine process failed a call, or is gone."""


@dataclass(frozen=True)
class GenerationResult:
    """What :meth:`EngineProcess.finish_generate` returns: the samples and the child's timing."""

    samples: list[list[RolloutSample]]
    generate_seconds: float
    """Wall seconds the child spent in ``engine.generate``."""
    wait_seconds: float
    """Wall seconds :meth:`EngineProcess.finish_generate` blocked for them."""


def _to_host(obj: Any) -> Any:
    """``obj`` with every tensor in it on the host (lists, tuples and dicts walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # RolloutSample, RolloutRequest
        return dataclasses.replace(obj, **{f.name: _to_host(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    return obj


def _serve(conn, factory: Callable[[], RolloutEngine], threads: Optional[int]) -> None:
    """The child's loop: builds the engine, then answers one message at a time until ``close``
    or until the parent's end of the pipe is gone (the trainer died: nothing to serve)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        engine = factory()
    except BaseException as err:  # reported to the parent, which raises it
        traceback.print_exc()
        conn.send_bytes(pickle.dumps(("error", f"building the engine: {type(err).__name__}: {err}")))
        return
    conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if method == "close":
            getattr(engine, "shutdown", lambda: None)()
            conn.send_bytes(pickle.dumps(("ok", None)))
            return
        try:
            start = time.perf_counter()
            value = _call(engine, method, args)
            reply = ("ok", (_to_host(value), time.perf_counter() - start))
        except BaseException as err:  # any: the parent decides; the child keeps serving
            traceback.print_exc()
            reply = ("error", f"{method}: {type(err).__name__}: {err}")
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _call(engine: RolloutEngine, method: str, args: tuple) -> Any:
    if method == "named_weights":
        return list(engine.named_weights())
    if method == "update_weights":
        engine.update_weights(args[0])
        return None
    if method not in ("generate", "release_memory", "resume_memory"):
        raise ValueError(f"unknown engine method {method!r}")
    return getattr(engine, method)(*args)


class EngineProcess:
    """A :class:`RolloutEngine` whose engine runs in a child process (module docstring).

    ``factory``: a picklable callable (a module-level function or ``functools.partial`` of one)
    that builds the engine in the child. ``threads``: ``torch.set_num_threads`` there (None:
    torch's default, from ``OMP_NUM_THREADS``)."""

    def __init__(self, factory: Callable[[], RolloutEngine], *, threads: Optional[int] = None,
                 name: str = "rollout engine") -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=_serve, args=(child_conn, factory, threads), daemon=True,
                                        name=name)
        self._process.start()
        child_conn.close()
        self._closed = False
        # A generate call sent and its result not yet taken; shared with the finalizer (also run at
        # interpreter exit), which does not wait for a generation in flight.
        self._busy = {"generating": False}
        self._finalizer = weakref.finalize(self, _stop_process, self._conn, self._process, self._busy)
        status, value = self._receive(_STARTUP_TIMEOUT_S, "starting")
        if status != "ready":
            self.close()
            raise EngineProcessError(f"{self.name} process: {value}")
        self.pid = int(value)

    # --- the RolloutEngine methods -------------------------------------------------------

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> list[list[RolloutSample]]:
        self.start_generate(requests, params)
        return self.finish_generate().samples

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._request("update_weights", (_to_host(list(named_tensors)),))

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._request("named_weights", ())

    def release_memory(self) -> None:
        self._request("release_memory", ())

    def resume_memory(self) -> None:
        self._request("resume_memory", ())

    # --- generation split around the trainer's work --------------------------------------

    @property
    def generating(self) -> bool:
        """A generation was started and its result not yet taken."""
        return self._busy["generating"]

    def start_generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> None:
        """Sends a ``generate`` call and returns at once; :meth:`finish_generate` takes its result."""
        self._check_idle("generate")
        self._send("generate", (_to_host(list(requests)), params))
        self._busy["generating"] = True

    def finish_generate(self) -> GenerationResult:
        """The samples of the generation :meth:`start_generate` sent (blocks until they are done)."""
        if not self.generating:
            raise EngineProcessError(f"{self.name}: finish_generate() without a generation in flight")
        waited_from = time.perf_counter()
        try:
            samples, seconds = self._answer(None, "generate")
        finally:
            self._busy["generating"] = False
        return GenerationResult(samples, seconds, time.perf_counter() - waited_from)

    def close(self) -> None:
        """Stops the child; idempotent. A generation still in flight is abandoned (the child is
        killed rather than waited for: nobody will take its result)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the pipe ------------------------------------------------------------------------

    def _request(self, method: str, args: tuple) -> Any:
        self._check_idle(method)
        self._send(method, args)
        return self._answer(None, method)[0]

    def _check_idle(self, method: str) -> None:
        if self._closed:
            raise EngineProcessError(f"{self.name}: {method}() after close()")
        if self.generating:
            raise EngineProcessError(f"{self.name}: {method}() while a generation is running (call "
                                     "finish_generate() first: the engine serves one call at a time)")

    def _send(self, method: str, args: tuple) -> None:
        try:
            self._conn.send_bytes(pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self._gone(method) from None

    def _answer(self, timeout: Optional[float], method: str) -> Any:
        status, value = self._receive(timeout, method)
        if status == "error":
            raise EngineProcessError(f"{self.name} process (pid {self._process.pid}): {value}")
        return value

    def _receive(self, timeout: Optional[float], method: str) -> tuple[str, Any]:
        """The child's next reply; polls so that a dead child is reported, not waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(1.0):
            if not self._process.is_alive():
                raise self._gone(method)
            if deadline is not None and time.monotonic() > deadline:
                raise EngineProcessError(f"{self.name} process (pid {self._process.pid}): no answer to "
                                         f"{method} within {timeout:.0f} s")
        try:
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, ConnectionResetError, OSError):
            raise self._gone(method) from None

    def _gone(self, method: str) -> EngineProcessError:
        self._process.join(timeout=5.0)
        return EngineProcessError(f"{self.name} process (pid {self._process.pid}) exited with code "
                                  f"{self._process.exitcode} during {method} (killed or out of memory? its "
                                  "stderr is in the job log)")


def _stop_process(conn, process, busy: dict) -> None:
    """Asks the child to close, then makes sure it is gone (also when the proxy is collected or
    the interpreter exits). A generation still in flight is abandoned: the child is killed
    rather than waited for, since nobody will take its result."""
    if busy["generating"] and process.is_alive():
        process.kill()
    try:
        if process.is_alive():
            conn.send_bytes(pickle.dumps(("close", ())))
            if conn.poll(30.0):
                conn.recv_bytes()
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        pass
    process.join(timeout=10.0)
    if process.is_alive():
        process.kill()
        process.join(timeout=5.0)
    conn.close()
