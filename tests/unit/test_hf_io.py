"""Streaming safetensors writer and lazy reader against the safetensors library itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_r1v.checkpoint.hf_io import CheckpointError, HFCheckpointReader, ShardedSafetensorsWriter, parse_size


def test_writer_output_is_read_back_by_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),  # odd byte counts
        "b.bias": torch.randn(3, generator=gen),
        "c.table": torch.randn(40, 33, generator=gen),
        "d.scale": torch.randn(1, 1, 9, generator=gen).to(torch.float16),
    }
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=4000)
    for name, tensor in tensors.items():
        writer.add(name, tensor.t().contiguous().t() if tensor.dim() == 2 else tensor)  # non-contiguous input too
    files = writer.finish()
    assert len(files) == 3  # c.table (5280 B) exceeds the 4000 B limit alone
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for path in files:
        loaded.update(load_file(str(path)))  # the reference implementation parses our files
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with HFCheckpointReader(tmp_path) as reader:
        assert reader.shape("c.table") == (40, 33) and torch.equal(reader.get("b.bias"), tensors["b.bias"])


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [("x", (2,), torch.float32), ("y", (2,), torch.float32)], 10**6)
    with pytest.raises(ValueError, match="expected tensor 'x' next, got 'y'"):
        writer.add("y", torch.zeros(2))
    with pytest.raises(ValueError, match=r"tensor 'x' is \(3,\) torch.float32; planned \(2,\)"):
        writer.add("x", torch.zeros(3))
    writer.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="got 1 of 2 planned tensors"):
        writer.finish()


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HFCheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has neither model.safetensors.index.json nor model.safetensors"):
        HFCheckpointReader(tmp_path)
    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or unreadable"):
        HFCheckpointReader(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five")


def test_reader_reads_parts_into_any_destination(tmp_path):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(37, 11, generator=gen).to(torch.bfloat16)
    cube = torch.randn(4, 6, 5, generator=gen)
    save_file({"table": table, "cube": cube, "scalar": torch.tensor(2.5)}, str(tmp_path / "model.safetensors"))
    with HFCheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("table", (slice(5, 20),)), table[5:20])
        assert torch.equal(reader.read("table", (slice(3, 9), slice(2, 7))), table[3:9, 2:7])  # columns too
        assert torch.equal(reader.read("cube", (slice(1, 3), slice(0, 6), slice(4, 5))), cube[1:3, :, 4:5])
        assert reader.read("scalar").item() == 2.5
        out = torch.zeros(20, 11)  # fp32 destination: converted while read
        reader.read("table", (slice(0, 10),), out[::2])  # a strided view of it
        assert torch.equal(out[::2], table[:10].float()) and not out[1::2].any()
        with pytest.raises(ValueError, match="has shape"):
            reader.read("table", (slice(0, 2),), torch.empty(3, 11))


@pytest.mark.parametrize("buffer_bytes", [8, 64, 1 << 20])
def test_read_box_matches_slicing_for_every_buffer_size(tmp_path, buffer_bytes):
    from megatron_r1v.checkpoint.box_io import read_box

    array = torch.arange(3 * 5 * 7 * 2, dtype=torch.int16).reshape(3, 5, 7, 2)
    path = tmp_path / "blob"
    path.write_bytes(b"xyz" + array.numpy().tobytes())  # at an odd offset
    boxes = [((0, 0, 0, 0), (3, 5, 7, 2)), ((1, 2, 3, 0), (3, 4, 7, 2)), ((0, 1, 2, 1), (2, 4, 6, 2)),
             ((2, 4, 6, 1), (3, 5, 7, 2))]
    with open(path, "rb", buffering=0) as file:
        for lo, hi in boxes:
            index = tuple(slice(a, b) for a, b in zip(lo, hi))
            out = torch.empty(array[index].shape, dtype=torch.int32)  # another dtype: staged and converted
            read_box(file, 3, array.shape, torch.int16, lo, hi, out, buffer_bytes=buffer_bytes)
            same = torch.empty(array[index].shape, dtype=torch.int16)  # same dtype: straight into it
            read_box(file, 3, array.shape, torch.int16, lo, hi, same, buffer_bytes=buffer_bytes)
            assert torch.equal(out, array[index].int()) and torch.equal(same, array[index]), (lo, hi)
