"""The vocab-parallel kernels at TP=2 on gloo equal TP=1 (worker docstring has the checks)."""

WORKER = "tests/distributed/workers/kernels_worker.py"


def test_tp2_equals_tp1_torch_and_interpret(torchrun):
    # The workers run CPU tensors on gloo in fresh processes, told to interpret Triton here,
    # so this runs the same on a CUDA host, whose pytest process compiles Triton.
    proc = torchrun(WORKER, 2, ["--backends", "torch,interpret"], env={"TRITON_INTERPRET": "1"})
    ok_lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    # 2 backends x 2 dtypes x 2 temperatures, each a full forward/backward comparison.
    assert len(ok_lines) == 8, proc.stdout
