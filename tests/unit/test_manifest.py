"""checkpoint/manifest.py: every file of a checkpoint with its size and SHA-256; readers
name the first missing, truncated or altered file."""

import hashlib
import json

import pytest

from megatron_r1v.checkpoint.manifest import MANIFEST_NAME, CheckpointIntegrityError, verify, write_manifest


@pytest.fixture()
def checkpoint(tmp_path):
    root = tmp_path / "step_000002"
    (root / "model").mkdir(parents=True)
    (root / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (root / "model" / ".metadata").write_bytes(b"meta")
    (root / "rank_00000.pt").write_bytes(b"optimizer" * 100)
    (root / "ssb" / "rank_00000" / "old_logprobs").mkdir(parents=True)
    (root / "ssb" / "rank_00000" / "old_logprobs" / "0").write_bytes(b"\x01\x02" * 50)
    (root / "trainer.json").write_text('{"step": 2}')
    write_manifest(root)
    return root


def test_manifest_lists_every_file_with_size_and_hash(checkpoint):
    files = json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == ["model/.metadata", "model/__0_0.distcp", "rank_00000.pt",
                             "ssb/rank_00000/old_logprobs/0", "trainer.json"]
    data = (checkpoint / "rank_00000.pt").read_bytes()
    assert files["rank_00000.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify(checkpoint) == 5
    assert verify(checkpoint / "model") == 2  # a model folder is checked by its parent's entries


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, cause", [
    (lambda p: _flip_one_byte(p), "content differs from the manifest (SHA-256 mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated: "),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "longer than written"),
    (lambda p: p.unlink(), "missing (the manifest lists it)"),
])
@pytest.mark.parametrize("name", ["model/__0_0.distcp", "rank_00000.pt", "ssb/rank_00000/old_logprobs/0",
                                  "trainer.json"])
def test_each_kind_of_damage_to_each_file_is_named(checkpoint, damage, cause, name):
    damage(checkpoint / name)
    with pytest.raises(CheckpointIntegrityError, match=rf"failed its integrity check: .*{name}: .*") as err:
        verify(checkpoint)
    assert cause in str(err.value)


def test_model_folder_damage_is_caught_through_the_parent_manifest(checkpoint):
    _flip_one_byte(checkpoint / "model" / "__0_0.distcp")
    with pytest.raises(CheckpointIntegrityError, match=r"model/__0_0\.distcp: content differs"):
        verify(checkpoint / "model")


def test_bad_or_absent_manifest(checkpoint, tmp_path):
    (checkpoint / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match=r"manifest\.json: not a readable manifest"):
        verify(checkpoint)
    (checkpoint / MANIFEST_NAME).write_text('{"format": "other", "files": {}}')
    with pytest.raises(CheckpointIntegrityError, match=r"not a megatron-r1v manifest \(format 'other'\)"):
        verify(checkpoint)
    old = tmp_path / "old"
    old.mkdir()
    (old / "x").write_text("1")
    with pytest.warns(UserWarning, match="has no manifest.json"):
        assert verify(old) == 0
