"""What the checkpoint manifest costs: SHA-256 throughput of ``checkpoint/manifest.py``
against the time to write the same bytes (a checkpoint save), on this machine's disk.

    python tools/bench_manifest.py [--mib 1024] [--files 8] [--dir /path/on/checkpoint/storage]

Writes ``--files`` files of random bytes totalling ``--mib`` MiB (each flushed with fsync,
as a checkpoint save does), then runs ``write_manifest`` (hash every file) and ``verify``
(hash again and compare) over them, each once, single process; prints one JSON line:
write_s, manifest_s, verify_s, the throughputs in MiB/s and manifest_over_write (the
fraction a save grows by). Reads hit the page cache right after the write, as they do
when a trainer hashes what it has just saved; ``verify`` after a restart reads from disk.
Multi-rank savers split the files over their ranks, so the time per rank falls with the
job size.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="total size of the files (MiB)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--dir", help="where to write them (default: the system temporary folder)")
    args = parser.parse_args(argv)
    if args.mib < 1 or args.files < 1:
        parser.error("--mib and --files must be >= 1")

    from megatron_r1v.checkpoint.manifest import verify, write_manifest

    root = Path(tempfile.mkdtemp(prefix="bench_manifest-", dir=args.dir))
    try:
        per_file = args.mib * 2**20 // args.files
        block = os.urandom(2**20)
        started = time.perf_counter()
        for index in range(args.files):
            with open(root / f"__{index}_0.distcp", "wb") as handle:
                for _ in range(per_file // len(block)):
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        write_manifest(root)
        manifest_s = time.perf_counter() - started
        started = time.perf_counter()
        checked = verify(root)
        verify_s = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total_mib = per_file * args.files / 2**20
    print(json.dumps({
        "mib": round(total_mib, 1), "files": checked, "write_s": round(write_s, 3),
        "manifest_s": round(manifest_s, 3), "verify_s": round(verify_s, 3),
        "write_mib_per_s": round(total_mib / write_s, 1), "hash_mib_per_s": round(total_mib / manifest_s, 1),
        "manifest_over_write": round(manifest_s / write_s, 3), "cpu": platform.processor() or platform.machine(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
