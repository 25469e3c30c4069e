"""Packaging contracts: import names, optional extras, backend selection."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_r1v.models.r1v.spec import decoder_layer_spec, resolve_backend

REPO = Path(__file__).resolve().parents[2]


def test_kernels_folder_is_megatron_r1v_kernels():
    import megatron_r1v.kernels as ours

    # Editable installs point at the folder itself; wheels carry a copy of it.
    assert Path(ours.__file__).read_bytes() == (REPO / "kernels" / "__init__.py").read_bytes()
    assert Path(ours.__file__).parent.name == "kernels"
    # The installed project exposes no top-level `kernels` (Hugging Face's name): outside
    # the checkout, the name resolves elsewhere or not at all.
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or pathlib.Path(spec.origin).parent != pathlib.Path({str(REPO / 'kernels')!r}), spec\n"
        "import megatron_r1v.kernels"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def run_from_repository_root(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` as a user runs them: working directory the repository root (so it is first on
    ``sys.path`` for ``python -m`` / ``-c``), ``PYTHONSAFEPATH`` unset; fails with the output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_hugging_face_kernels_wins_from_the_repository_root():
    # The failure of 2026-12-03: transformers 5.25 imports Hugging Face's `kernels` from its
    # InternVL modeling, and the repository root, first on sys.path, held a `kernels` package.
    code = (
        "import importlib.metadata, sys\n"
        "assert sys.path[0] == '', sys.path[:2]  # the working directory, the repository root, comes first\n"
        "import kernels\n"
        "assert kernels.__version__ == importlib.metadata.version('kernels'), kernels\n"
        f"assert not kernels.__file__.startswith({str(REPO / 'kernels')!r}), kernels.__file__\n"
        "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
        "from kernels import CUDAProperties  # the name transformers failed on\n"
        "import kernels._internals.locking  # the egg_info writer setuptools loads when it builds a project\n"
        "import transformers.models.internvl.modeling_internvl\n"
        "import megatron_r1v.kernels as ours\n"
        "assert ours.__name__ == 'megatron_r1v.kernels' and callable(ours.grpo_loss)\n"
        "assert sys.modules['kernels'] is kernels and kernels is not ours\n"
        "import importlib\n"
        "assert importlib.reload(kernels) is kernels and 'site-packages' in kernels.__file__, kernels.__file__\n"
    )
    run_from_repository_root([sys.executable, "-c", code])


def test_entry_points_and_collection_from_the_repository_root():
    help_text = run_from_repository_root([sys.executable, "-m", "megatron_r1v.train", "--help"]).stdout
    assert "--config" in help_text
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    assert "--config" in run_from_repository_root([*torchrun, "-m", "megatron_r1v.train", "--help"]).stdout
    # Collection imports transformers' InternVL modeling (through the SGLang engine's tests).
    collected = run_from_repository_root([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                                          "tests/unit/test_sglang_engine.py"]).stdout
    assert "test_sglang_engine.py::" in collected


def test_top_level_kernels_is_missing_without_hugging_face_kernels():
    # No site-packages (-S), the repository root first: the folder hands the name on, finds
    # no other `kernels`, and the import fails as it would without the folder.
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as err:\n"
        "    assert err.name == 'kernels' and 'kernels' not in sys.modules, err\n"
        "    print('missing:', err)\n"
        "else:\n"
        "    raise AssertionError(f'imported {kernels!r}')\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0 and "is megatron_r1v.kernels, never a top-level 'kernels'" in proc.stdout, proc.stderr


def test_two_checkouts_on_the_path_pass_the_name_on(tmp_path):
    # A second copy of the folder (a git worktree, a PYTHONPATH entry) ahead of site-packages:
    # each copy passes over the other instead of handing the name back and forth forever.
    shutil.copytree(REPO / "kernels", tmp_path / "kernels")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = "import kernels; assert 'site-packages' in kernels.__file__ and hasattr(kernels, 'CUDAProperties')"
    for cwd, pythonpath in ((REPO, tmp_path), (tmp_path, REPO)):
        subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, env=dict(env, PYTHONPATH=str(pythonpath)),
                       timeout=120)


def test_threads_importing_kernels_at_once_get_the_whole_package():
    # The hand-over marks the module as initializing, so a second thread waits for it.
    code = (
        "import threading\n"
        "results = []\n"
        "def load():\n"
        "    import kernels\n"
        "    results.append(hasattr(kernels, 'CUDAProperties') and hasattr(kernels, 'get_kernel'))\n"
        "threads = [threading.Thread(target=load) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert results == [True] * 8, results\n"
    )
    run_from_repository_root([sys.executable, "-c", code])


def test_wheel_builds_from_the_repository_root_and_carries_megatron_r1v_kernels(tmp_path):
    # Building the project loads every installed egg_info writer, Hugging Face's `kernels`
    # one among them: the second `pip install -e .` of 2026-12-03 failed there ("No module
    # named 'kernels._internals'"). setup.py run directly (as setuptools' legacy backend
    # does) has the repository root first on sys.path, as that build had.
    run_from_repository_root([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", tmp_path])
    assert (tmp_path / "megatron_r1v.egg-info" / "PKG-INFO").is_file()
    # setuptools builds the wheel in <repository>/build: removed again unless it was there before.
    had_build_dir = (REPO / "build").exists()
    try:
        run_from_repository_root([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                  "--disable-pip-version-check", "-w", tmp_path / "dist", "."], timeout=600)
    finally:
        if not had_build_dir:
            shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = (tmp_path / "dist").glob("megatron_r1v-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "megatron_r1v/kernels/__init__.py" in names and "megatron_r1v/kernels/triton_impl.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    code = (
        "import kernels, megatron_r1v.kernels as ours\n"
        f"assert ours.__file__.startswith({str(site)!r}), ours.__file__\n"
        "assert hasattr(kernels, '__version__') and callable(ours.grpo_loss)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=site, env=dict(env, PYTHONPATH=str(site)), timeout=120)


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


def installed_from_the_lock() -> bool:
    return Path(sys.prefix).resolve() == (REPO / ".venv").resolve()


@pytest.mark.skipif(not installed_from_the_lock(), reason="runs in the repository's .venv, which tools/ensure_venv.sh "
                    "installs from the lock; this interpreter is another environment")
def test_the_test_environment_is_the_lock():
    """Every package of .venv at its locked version, and every locked package installed: the
    lock holds exactly what the suite runs with (direct and transitive)."""
    import importlib.metadata
    import re
    import sysconfig

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    locked = {}
    for number, line in enumerate((REPO / "constraints-cpu-py311.txt").read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints-cpu-py311.txt:{number}: expected name==version, got {line!r}"
            locked[canonical(name)] = version.strip()
    # site-packages only: once imported, setuptools puts its vendored packages on sys.path.
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site_packages)}
    installed.pop("pip")  # the installer itself, from `python -m venv`
    assert installed.pop("megatron-r1v") == "0.1.0"
    assert installed == locked, {n: (installed.get(n), locked.get(n)) for n in installed.keys() | locked.keys()
                                 if installed.get(n) != locked.get(n)}
    assert locked["torch"].endswith("+cpu") and locked["transformers"] == "5.25.0"
