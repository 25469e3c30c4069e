"""Packaging contracts: import names, optional extras, backend selection."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1v.models.r1v.spec import decoder_layer_spec, resolve_backend

REPO = Path(__file__).resolve().parents[2]


def test_kernels_folder_is_megatron_r1v_kernels():
    import megatron_r1v.kernels as ours

    # Editable installs point at the folder itself; wheels carry a copy of it.
    assert Path(ours.__file__).read_bytes() == (REPO / "kernels" / "__init__.py").read_bytes()
    assert Path(ours.__file__).parent.name == "kernels"
    # The installed project exposes no top-level `kernels` (Hugging Face's name). Run
    # outside the checkout: a repo-root cwd on sys.path would find the folder itself.
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or pathlib.Path(spec.origin).parent != pathlib.Path({str(REPO / 'kernels')!r}), spec\n"
        "import megatron_r1v.kernels"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_import_without_gpu_and_rollout_extras():
    # A fresh interpreter: importing the library must not pull TE or SGLang in.
    code = (
        "import sys, megatron_r1v, megatron_r1v.config, megatron_r1v.platform, megatron_r1v.models.r1v.model, "
        "megatron_r1v.trainer.setup, megatron_r1v.kernels\n"
        "bad = [m for m in ('transformer_engine', 'sglang') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_backend_selection():
    assert resolve_backend("auto", cuda_available=True, te_present=True) == "te"
    assert resolve_backend("auto", cuda_available=False, te_present=True) == "local"
    assert resolve_backend("auto", cuda_available=True, te_present=False) == "local"
    assert resolve_backend("local", cuda_available=True, te_present=True) == "local"
    with pytest.raises(ValueError, match=r"transformer_engine is not installed .*megatron-r1v\[gpu\]"):
        resolve_backend("te", cuda_available=True, te_present=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("te", cuda_available=False, te_present=True)
    with pytest.raises(ValueError, match="must be auto, local or te"):
        resolve_backend("xla")


def test_local_spec_uses_rmsnorm_and_megatron_linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    spec = decoder_layer_spec("local")
    attn = spec.submodules.self_attention.submodules
    assert attn.linear_qkv is ColumnParallelLinear and attn.linear_proj is RowParallelLinear
