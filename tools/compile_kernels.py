"""Compile every Triton kernel of megatron_r1v.kernels for a CUDA architecture, no GPU needed.

    python tools/compile_kernels.py [--arch 90] [--dtypes bf16,fp16,fp32] [--block-v 4096 --num-warps 8]

Runs Triton's full compiler (Python frontend -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin) for each kernel, logits dtype and constexpr variant, then reads the cubin's
resource usage with the cuobjdump that ships with Triton. Prints one JSON line per
variant (registers, shared memory, stack/local bytes) and exits 1 when a variant does
not compile or spills to local memory. This is how a CPU-only machine (CI, a login
node) checks the compiled path that the interpreter-mode tests cannot: the interpreter
runs the same Python but not Triton's code generator.
"""

from __future__ import annotations

import os

# Triton decides interpreted vs compiled kernels when they are defined; force compiled.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_r1v.kernels import triton_impl  # noqa: E402

KERNELS = {
    "_row_stats_kernel": ("WANT_CENTERED_MEAN",),
    "_grpo_fwd_kernel": ("HAS_REF",),
    "_grpo_terms_kernel": ("HAS_REF",),
    "_logits_grad_kernel": ("HAS_ENTROPY",),
}
SCALAR_TYPES = {
    "row_stride": "i64", "grad_row_stride": "i64", "vocab_start": "i64", "n_cols": "i32", "n_tokens": "i32",
    "inv_temp": "fp32", "clip_low": "fp32", "clip_high": "fp32", "kl_beta": "fp32",
}
USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def arg_type(name: str, logits_dtype: str) -> str:
    if name in ("logits_ptr", "grad_ptr"):
        return f"*{logits_dtype}"
    if name == "labels_ptr":
        return "*i64"
    if name == "clipped_ptr":
        return "*i8"
    if name.endswith("_ptr"):
        return "*fp32"
    return SCALAR_TYPES[name]


def resource_usage(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = USAGE.search(out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return dict(zip(("registers", "stack_bytes", "shared_bytes", "local_bytes"), map(int, match.groups())))


def compile_variant(name: str, flags: dict, logits_dtype: str, block_v: int, num_warps: int, arch: int) -> dict:
    kernel = getattr(triton_impl, name)
    constexprs = dict(flags, **({"BLOCK_T": 1024} if "BLOCK_T" in kernel.arg_names else {"BLOCK_V": block_v}))
    signature = {a: ("constexpr" if a in constexprs else arg_type(a, logits_dtype)) for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    row = dict(kernel=name, dtype=logits_dtype, arch=f"sm_{arch}", num_warps=num_warps, **flags,
               **{k: v for k, v in constexprs.items() if k.startswith("BLOCK")})
    row.update(resource_usage(compiled.asm["cubin"]))
    row["ok"] = row["local_bytes"] == 0 and row["stack_bytes"] == 0
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--block-v", type=int, help="vocabulary tile (default: launch_config for V=152064)")
    parser.add_argument("--num-warps", type=int)
    args = parser.parse_args()
    default_block, default_warps = triton_impl.launch_config(152064)
    block_v, num_warps = args.block_v or default_block, args.num_warps or default_warps
    failures = 0
    for name, flag_names in KERNELS.items():
        for values in itertools.product((False, True), repeat=len(flag_names)):
            for dtype in args.dtypes.split(","):
                flags = dict(zip(flag_names, values))
                try:
                    row = compile_variant(name, flags, dtype, block_v, num_warps, args.arch)
                except Exception as err:  # report every variant, then fail
                    row = dict(kernel=name, dtype=dtype, **flags, ok=False, error=f"{type(err).__name__}: {err}"[:2000])
                failures += not row["ok"]
                print(json.dumps(row), flush=True)
    print(json.dumps({"variants_failed": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
