"""Builds and loads the ``r1v.internvl_tiles`` DALI CPU operator (``csrc/internvl_tiles.cc``).

The operator reproduces the PIL reference's tiles bit for bit (Pillow's fixed-point BICUBIC,
the reference normalization through a lookup table) and is ~2x cheaper per output value
than DALI's own CPU resize (see the source's header comment and docs/benchmarks.md).

It is compiled on first use against the installed DALI with the system C++ compiler
(``$CXX`` or ``g++``; DALI's headers need the CUDA runtime headers, taken from
``$CUDA_HOME``, ``/usr/local/cuda`` or the ``nvidia-cuda-runtime-cu12`` and
``nvidia-cuda-nvcc-cu12`` wheels of the ``data`` extra). The library is cached under ``$MEGATRON_R1V_CACHE_DIR`` (default
``~/.cache/megatron_r1v``) keyed by the source, DALI version, compiler and CPU flags, so
ranks and loader workers on one node build it once (a file lock serializes the build) and
a shared cache directory stays valid on a heterogeneous cluster (``-march=native``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .tiling import TilingConfig, normalize_into

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "internvl_tiles.cc"
# -ffp-contract=off: the weight computation must round like Pillow's baseline x86-64 build.
CXX_FLAGS = ["-std=c++20", "-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-w"]
BUILD_TIMEOUT_S = 600
SYSTEM_CUDA_INCLUDE = Path("/usr/local/cuda/include")
WHEEL_HEADERS = ("cuda_runtime.h", "crt/host_config.h", "nv/target")


class PluginBuildError(RuntimeError):
    """The operator could not be compiled or loaded; the message says why and what to install."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_R1V_CACHE_DIR", Path.home() / ".cache" / "megatron_r1v")) / "dali_plugins"


def _cuda_include_dirs() -> list[Path]:
    """CUDA runtime headers, which DALI's operator headers include even for CPU operators.

    A toolkit ($CUDA_HOME, /usr/local/cuda) has them all; otherwise the pip wheels of the
    data extra: nvidia-cuda-runtime-cu12 (cuda_runtime.h), nvidia-cuda-nvcc-cu12 (crt/) and
    nvidia-cuda-cccl-cu12 (nv/target).
    """
    toolkits = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    toolkits.append(SYSTEM_CUDA_INCLUDE)
    for include in toolkits:
        if (include / "cuda_runtime.h").is_file() and (include / "crt" / "host_config.h").is_file():
            return [include]
    wheels = []
    for module in ("nvidia.cuda_runtime", "nvidia.cuda_nvcc", "nvidia.cuda_cccl"):
        try:
            wheels += [Path(p) / "include" for p in importlib.import_module(module).__path__]
        except ImportError:
            pass
    if all(any((d / header).is_file() for d in wheels) for header in WHEEL_HEADERS):
        return wheels
    raise PluginBuildError("no CUDA runtime headers (cuda_runtime.h, crt/host_config.h, nv/target) for DALI's "
                           "operator headers: pip install nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 "
                           "nvidia-cuda-cccl-cu12 (part of "
                           f"'megatron-r1v[data]') or set CUDA_HOME; looked in {', '.join(map(str, toolkits + wheels))}")


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise PluginBuildError(f"C++ compiler {cxx!r} not found (set CXX, or install g++ >= 10)")
    return path


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_command(cxx: str, output: Path) -> list[str]:
    import nvidia.dali.sysconfig as sysconfig
    return [cxx, *CXX_FLAGS, str(SOURCE), "-o", str(output), *sysconfig.get_compile_flags(),
            *(f"-I{d}" for d in _cuda_include_dirs()), *sysconfig.get_link_flags()]


def library_path() -> Path:
    """The compiled operator for this source, DALI, compiler and CPU: built now if not cached."""
    import nvidia.dali
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), nvidia.dali.__version__, *version, " ".join(CXX_FLAGS),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"libr1v_internvl_tiles-{key}.so"
    if library.exists():
        return library
    with open(out_dir / f".{library.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building the same library
        if library.exists():
            return library
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{library.stem}-", suffix=".so")
        os.close(fd)
        command = _build_command(cxx, Path(tmp))
        logger.info("building the r1v.internvl_tiles DALI operator: %s", shlex.join(command))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if proc.returncode != 0:
                raise PluginBuildError(f"compiling {SOURCE} failed (exit {proc.returncode}): "
                                       f"{shlex.join(command)}\n{proc.stderr[-3000:]}")
            os.replace(tmp, library)  # atomic: readers never see a half-written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return library


@functools.lru_cache(maxsize=None)
def load() -> Path:
    """Builds (once per machine) and loads (once per process) the operator; returns the library."""
    import nvidia.dali.plugin_manager as plugin_manager
    library = library_path()
    try:
        plugin_manager.load_library(str(library))
    except RuntimeError as err:
        raise PluginBuildError(f"DALI could not load {library}: {err}") from err
    return library


@functools.lru_cache(maxsize=None)
def pillow_vertical_first_rule() -> Optional[bool]:
    """Which pass order the installed Pillow uses, read off Pillow itself.

    Pillow resamples horizontally first; since Pillow 13 it resamples vertically first when
    the height shrinks by more than twice as many pixels as the width. A resize that each
    order gets differently (10x100 -> 9x97, rule says vertical first) tells which Pillow
    this is, one at the rule's boundary (10x100 -> 9x98) that the rule's inequality is
    strict. True: the rule; False: always horizontal first; None: neither (unknown Pillow).
    """
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 10, 3), dtype=np.uint8))

    def order(size: tuple[int, int]) -> Optional[str]:
        direct = np.asarray(image.resize(size, Image.Resampling.BICUBIC))
        # One-axis resizes have no pass order, so composing them gives each order exactly.
        h_first = image.resize((size[0], 100), Image.Resampling.BICUBIC).resize(size, Image.Resampling.BICUBIC)
        v_first = image.resize((10, size[1]), Image.Resampling.BICUBIC).resize(size, Image.Resampling.BICUBIC)
        h_ok, v_ok = np.array_equal(direct, np.asarray(h_first)), np.array_equal(direct, np.asarray(v_first))
        return "h" if h_ok and not v_ok else "v" if v_ok and not h_ok else None

    orders = (order((9, 97)), order((9, 98)))
    return {("v", "h"): True, ("h", "h"): False}.get(orders)


def pass_order_rule() -> bool:
    """The operator's ``vertical_first_rule`` for the installed Pillow; raises when it is unknown."""
    rule = pillow_vertical_first_rule()
    if rule is None:
        raise PluginBuildError(f"the installed Pillow {Image.__version__} resamples in a pass order "
                               "the operator does not know")
    return rule


def normalization_lut(cfg: TilingConfig) -> list[float]:
    """[3 * 256] values: the reference's own normalization (tiling.normalize_into) of 0..255."""
    values = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(3, 256, 1)
    return normalize_into(values, cfg).flatten().tolist()
