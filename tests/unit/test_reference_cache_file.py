"""trainer/reference_cache.py's file: written with its hash, and a damaged one is named
(and then recomputed by the trainer) rather than read as wrong numbers or a BadZipFile."""

import json

import pytest

from megatron_r1v.trainer.reference_cache import PREFIX, DamagedCache, load_cached, write_cache

VALUES = {"p1": (-12.5, -20.25), "p2": (-3.0, -4.0), "p3": (-7.75, -1.5)}


@pytest.fixture()
def cache(tmp_path):
    write_cache(tmp_path, "k1", {"data": {"x": 1}, "pairs": list(VALUES)}, VALUES)
    return tmp_path


def test_round_trip_and_sidecar_hash(cache):
    assert load_cached(cache, "k1", list(VALUES)) == VALUES
    assert load_cached(cache, "other-key", list(VALUES)) is None
    sidecar = json.loads((cache / f"{PREFIX}k1.json").read_text())
    assert sidecar["npz"]["size"] == (cache / f"{PREFIX}k1.npz").stat().st_size and len(sidecar["npz"]["sha256"]) == 64


def test_flipped_byte_is_named(cache):
    path = cache / f"{PREFIX}k1.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedCache, match=rf"{PREFIX}k1\.npz: size or SHA-256 differs"):
        load_cached(cache, "k1", list(VALUES))


def test_truncated_file_without_sidecar_is_named(cache):
    (cache / f"{PREFIX}k1.json").unlink()  # no recorded hash: the read itself must fail clearly
    path = cache / f"{PREFIX}k1.npz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DamagedCache, match=rf"{PREFIX}k1\.npz: cannot be read \(BadZipFile"):
        load_cached(cache, "k1", list(VALUES))


def test_missing_pairs_are_named(cache):
    with pytest.raises(DamagedCache, match=r"lacks 1 of the run's 4 pairs \(e\.g\. 'p4'\)"):
        load_cached(cache, "k1", [*VALUES, "p4"])
