"""tools/bench_packing.py at a small shape: the varlen path (what the trainer runs) computes
the dense-mask path's function with less memory, and the memory planner's attention term
is what the varlen attention actually saves for backward."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_packing_rows():
    proc = subprocess.run([sys.executable, str(REPO / "tools/bench_packing.py"), "--length", "768", "--segments", "6",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (row["L"], row["segments"]) == (768, 6)
    # Same function: fp32, the two paths differ only in summation order (~1e-7 on outputs of size ~1).
    assert row["max_abs_output_diff"] < 1e-5
    # The dense path holds [heads, L, L] scores and probabilities; varlen holds per-sample logsumexps.
    assert row["varlen_peak_bytes"] < 0.6 * row["dense_peak_bytes"]
    # Saved Q, K, V, O (twice) match the planner; the logsumexps (4 bytes x heads per token) are neglected there.
    assert 0 <= row["attention_saved_bytes"] - row["planned_attention_bytes"] <= 4 * 4 * 768
