"""Which tiler a run uses: ``data.tiler`` (``auto|dali|pil``) and ``data.tiler_threads``.

:func:`build_tiler` is the one place that turns those settings into a :class:`~.tiling.Tiler`;
the GRPO and MPO trainers (``trainer/build.py``), ``python -m megatron_r1v.evaluate`` and
``python -m megatron_r1v.ssb.prompt_pool`` (``--tiler`` / ``--tiler-threads``, added by
:func:`add_tiler_args` with the config's values and defaults) all call it. In a training run
only one rank per replica builds it (``data.replica_tiling``).

- ``pil``: :class:`~.tiling.PILTiler`, the reference, in ``tiler_threads`` threads.
- ``dali``: :class:`~.dali_tiling.DALITiler` on DALI's CPU pipeline with the project's
  ``r1v.internvl_tiles`` operator (``cpu_kernel="r1v"``): bit-identical to ``pil``. Never
  DALI's own resize graph, which is not (tests/unit/test_data_tiling.py), and never the DALI
  GPU pipeline, which has not run in this repository. When DALI is missing, the operator does
  not build, or the probe below fails, :class:`TilerUnavailable` says why and what to do.
- ``auto``: ``dali`` when it is available, else ``pil`` with one warning giving the reason.

Before a DALI tiler is handed out it tiles one small generated image (a probe, ~0.1 s: it also
builds the pipeline the first batch would build) and must give the PIL reference's tensors bit
for bit, so a broken DALI install or a Pillow the operator does not match turns into the
fallback (``auto``) or an error (``dali``) at start-up, not into different pixels mid-run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image

from .tiling import PILTiler, Tiler, TilingConfig

if TYPE_CHECKING:
    from megatron_r1v.config import DataConfig

logger = logging.getLogger(__name__)

DALI_OPERATOR = "r1v.internvl_tiles"
_REASON_CHARS = 240  # of the reason in the one-line description (the warning has all of it)


class TilerUnavailable(ValueError):
    """``data.tiler=dali`` (or ``--tiler dali``) cannot run here; the message says why and what to do."""


class SelectedTiler(NamedTuple):
    tiler: Tiler
    description: str
    """One line for logs, e.g. ``dali (r1v.internvl_tiles, 2 threads)`` or ``pil (2 threads; ...why...)``."""


def build_tiler(data_cfg: "DataConfig", tiling_cfg: TilingConfig, key: str = "data.tiler") -> SelectedTiler:
    """The tiler ``data_cfg.tiler`` names with ``data_cfg.tiler_threads`` threads (module docstring).

    ``key`` is how errors name the setting (``--tiler`` for the command-line tools). Raises
    :class:`TilerUnavailable` for ``dali`` when DALI cannot tile here; ``auto`` then falls back
    to PIL with one warning.
    """
    from megatron_r1v.validation import check_data_config

    check_data_config(data_cfg)
    threads = data_cfg.tiler_threads
    if data_cfg.tiler == "pil":
        return SelectedTiler(PILTiler(tiling_cfg, num_threads=threads), f"pil ({_threads(threads)}; {key}=pil)")
    try:
        tiler = _dali_tiler(tiling_cfg, threads)
    except TilerUnavailable as err:
        if data_cfg.tiler == "dali":
            raise TilerUnavailable(f"{key}=dali: {err} (or set {key} to auto or pil to tile with PIL)") from None
        reason = str(err)
        logger.warning("%s=auto: tiling with PIL, because DALI cannot tile here: %s", key, reason)
        short = " ".join(reason.split())
        short = short if len(short) <= _REASON_CHARS else short[:_REASON_CHARS - 3] + "..."
        return SelectedTiler(PILTiler(tiling_cfg, num_threads=threads),
                             f"pil ({_threads(threads)}; DALI unavailable: {short})")
    return SelectedTiler(tiler, f"dali ({DALI_OPERATOR}, {_threads(threads)})")


def add_tiler_args(parser: argparse.ArgumentParser) -> None:
    """``--tiler`` / ``--tiler-threads``: ``data.tiler`` / ``data.tiler_threads`` for tools without a
    config (evaluate, prompt_pool), with the same values and defaults."""
    from megatron_r1v.config import DataConfig
    from megatron_r1v.validation import TILERS

    default = DataConfig()
    parser.add_argument("--tiler", choices=TILERS, default=default.tiler,
                        help="image tiling backend, as data.tiler: dali (DALI with the r1v.internvl_tiles "
                             "operator), pil (the reference; same tiles) or auto (dali when it can run here, "
                             f"else pil with a warning; default {default.tiler})")
    parser.add_argument("--tiler-threads", type=int, default=default.tiler_threads,
                        help=f"tiler worker threads, as data.tiler_threads (default {default.tiler_threads})")


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _dali_tiler(tiling_cfg: TilingConfig, threads: int) -> Tiler:
    """A probed DALITiler with the r1v operator; TilerUnavailable naming the cause otherwise."""
    try:
        from .dali_tiling import DALITiler
    except ImportError as err:  # the module imports DALI lazily; this is torch/PIL-level breakage
        raise TilerUnavailable(f"megatron_r1v.data.dali_tiling cannot be imported: {err}") from None
    from .dali_plugin import PluginBuildError

    try:
        tiler = DALITiler(tiling_cfg, num_threads=threads, cpu_kernel="r1v")
    except ImportError as err:  # DALI missing or too old: the message says what to install
        raise TilerUnavailable(str(err)) from None
    except PluginBuildError as err:
        raise TilerUnavailable(f"the {DALI_OPERATOR} DALI operator is unavailable: {err}") from None
    _probe(tiler, tiling_cfg)
    return tiler


def _probe(tiler: Tiler, tiling_cfg: TilingConfig) -> None:
    """Tiles one generated PNG with ``tiler`` and the PIL reference; they must agree bit for bit."""
    rng = np.random.default_rng(0)
    # A 3:2 image gives a multi-tile grid plus the thumbnail: both code paths of the operator.
    side = max(tiling_cfg.image_size, 8)
    pixels = rng.integers(0, 256, (side, side * 3 // 2, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="r1v_tiler_probe_") as tmp:
        path = Path(tmp) / "probe.png"
        Image.fromarray(pixels).save(path)
        try:
            got = tiler.tile_files([path])
        except Exception as err:  # any: DALI's runtime errors have no common type
            raise TilerUnavailable(f"DALI failed on a probe image: {type(err).__name__}: {err}") from None
        want = PILTiler(tiling_cfg).tile_files([path])
    a, b = want.images[0], got.images[0]
    if b is None or a.grid != b.grid or not torch.equal(a.pixel_values, b.pixel_values):
        raise TilerUnavailable("DALI's tiles of a probe image differ from the PIL reference's "
                               "(a DALI or Pillow version the operator does not match)")
