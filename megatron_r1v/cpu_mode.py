"""CPU mode: run Megatron-Core unchanged on a machine without CUDA (gloo, fp32).

Megatron-Core 0.16 assumes CUDA in a handful of places (found by running it on gloo
without CUDA; the README's "Platform notes (CPU mode)" summarizes them for users):

1. ``torch.cuda.current_device()`` used as the device of new tensors (RoPE, p2p
   buffers, DDP grad buffers, optimizer scalars);
2. literal ``device="cuda"`` tensors (schedules' token counter, the default causal
   mask, grad-norm scratch buffers);
3. the RNG tracker (``tensor_parallel.random``) reading and writing CUDA RNG states,
   also in activation recomputation (``CheckpointFunction`` saves them);
4. ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers.

Everything that works around those lives in this module and only here. It is switched
on by :func:`megatron_r1v.platform.init_distributed` when CUDA is absent and can be
switched on explicitly with :class:`CpuMode` (a context manager) in tests:

* a :class:`torch.overrides.TorchFunctionMode` rewrites CUDA devices (``"cuda"``,
  ``"cuda:N"``, ``torch.device("cuda")`` and bare device indices) to the CPU in every
  torch call, and makes ``Tensor.cuda()`` a no-op. This covers 1 and 2 generically,
  including code paths we have not seen yet, instead of patching call sites;
* ``torch.cuda.current_device`` returns 0 (rewritten to the CPU by the mode above),
  ``torch.cuda.current_stream`` returns a stream whose waits are no-ops (CPU ops are
  synchronous; Megatron-Core >= 0.19 waits on it before grad reduction), and
  ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` are no-ops;
* Megatron's RNG tracker is replaced by :class:`CpuRNGStatesTracker`, which keeps one
  CPU generator state per name and swaps it into the global CPU generator while
  forked, and recomputation's CUDA RNG save/restore becomes a no-op (3);
* ``torch.Tensor.type()`` reports ``torch.cuda.*Tensor`` for CPU float tensors while
  the mode is active, so the optimizers' dtype dispatch takes the same branch it takes
  on GPU (4).

Nothing here changes numerics: the same kernels run, only device placement differs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# CPU tensor type names -> the CUDA names Megatron's optimizers compare against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device parsing.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuStream:
    """Stands in for ``torch.cuda.current_stream()``: CPU work is already ordered."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Only the no-argument query form; conversions keep their meaning.
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _tracker_base() -> type:
    from megatron.core.tensor_parallel import random as mcore_random

    return mcore_random.CudaRNGStatesTracker


class CpuRNGStatesTracker(_tracker_base()):  # type: ignore[misc]
    """Megatron RNG tracker backed by the CPU generator.

    Megatron keeps named CUDA RNG streams ("model-parallel-rng" differs per TP rank,
    "data-parallel-rng" is shared) and forks into them for dropout and weight init.
    On CPU every op draws from the global CPU generator, so forking swaps that
    generator's state with the named stream's state and swaps it back on exit. The
    stored states are plain byte tensors, so Megatron's checkpointing of RNG states
    (``get_states``/``set_states``) works unchanged.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already used by another stream")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added to the tracker")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


class CpuMode:
    """Switches the CPU mode on (``enable``) and off (``disable``), or as a context.

    The mode is process-wide by nature (it patches ``torch.cuda`` functions and
    Megatron's RNG tracker), so at most one :class:`CpuMode` may be enabled at a
    time; enabling a second one raises instead of stacking patches.
    """

    _active_lock = threading.Lock()
    _active: Optional["CpuMode"] = None

    def __init__(self) -> None:
        self._device_mode: Optional[_CudaDeviceToCpu] = None
        self._restore: list[Callable[[], None]] = []

    @property
    def enabled(self) -> bool:
        return self._device_mode is not None

    def enable(self) -> "CpuMode":
        # Also valid with CUDA present (init_distributed(force_cpu=True), e.g. meta-device
        # size queries on a GPU node): everything then stays on the CPU.
        with CpuMode._active_lock:
            if CpuMode._active is not None:
                raise RuntimeError("CPU mode is already enabled in this process")
            CpuMode._active = self
        self._patch(torch.cuda, "current_device", lambda: 0)
        self._patch(torch.cuda, "synchronize", lambda device=None: None)
        stream = _CpuStream()
        self._patch(torch.cuda, "current_stream", lambda device=None: stream)
        self._patch(torch.cuda, "empty_cache", lambda: None)
        self._install_rng_tracker()
        self._device_mode = _CudaDeviceToCpu()
        self._device_mode.__enter__()
        logger.info("CPU mode enabled: CUDA devices map to the CPU, RNG streams on the CPU generator")
        return self

    def disable(self) -> None:
        if self._device_mode is None:
            return
        self._device_mode.__exit__(None, None, None)
        self._device_mode = None
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        with CpuMode._active_lock:
            CpuMode._active = None

    def __enter__(self) -> "CpuMode":
        return self.enable()

    def __exit__(self, *exc_info) -> None:
        self.disable()

    def _patch(self, owner: Any, attr: str, value: Any) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, value)
        self._restore.append(lambda: setattr(owner, attr, original))

    def _install_rng_tracker(self) -> None:
        # get_cuda_rng_tracker() returns this module global; installing ours there
        # makes model_parallel_cuda_manual_seed and every fork() use CPU streams.
        from megatron.core.tensor_parallel import random as mcore_random

        for attr in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
            if not hasattr(mcore_random, attr):
                raise RuntimeError(
                    f"megatron.core.tensor_parallel.random.{attr} not found: this "
                    "Megatron-Core version changed its RNG tracker; update cpu_mode.py"
                )
        self._patch(mcore_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
        self._patch(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
        # Activation recomputation (CheckpointFunction) saves and restores the CUDA RNG
        # state next to the CPU one; on CPU the global CPU generator is the only one and
        # torch.get_rng_state() already covers it.
        self._patch(mcore_random, "_get_cuda_rng_state",
                    lambda device="cuda", clone=False, graph_safe=False: torch.empty(0, dtype=torch.uint8))
        self._patch(mcore_random, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: None)


def cpu_mode_active() -> bool:
    """True while a :class:`CpuMode` is enabled in this process."""
    return CpuMode._active is not None
