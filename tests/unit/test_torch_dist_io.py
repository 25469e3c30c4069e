"""torch_dist checkpoints written fragment by fragment and read back box by box (one process)."""

import json
import weakref

import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_r1v.checkpoint import torch_dist_io
from megatron_r1v.checkpoint.hf_io import CheckpointError

_GEN = torch.Generator().manual_seed(0)
SOURCES = {
    "big": torch.randn(16, 40, generator=_GEN),  # 4 fragments of 640 B
    "cube": torch.arange(2 * 6 * 5, dtype=torch.float32).reshape(2, 6, 5).to(torch.bfloat16),  # 2 x 3 fragments
    "vec": torch.arange(7, dtype=torch.float32),  # 1 fragment
    **{f"layer{i}": torch.randn(4, 40, generator=_GEN) for i in range(4)},  # 1 fragment of 640 B each
}
FRAGMENT_BYTES = 640  # the largest


def fragments() -> dict[str, ShardedTensor]:
    """Every fragment of SOURCES held by this one process, data described by meta tensors."""
    state = {f"layer{i}": ShardedTensor.from_rank_offsets(f"layer{i}", torch.empty(4, 40, device="meta"))
             for i in range(4)}
    for i in range(4):
        state[f"big{i}"] = ShardedTensor.from_rank_offsets("big", torch.empty(4, 40, device="meta"), (0, i, 4))
    for i in range(2):
        for j in range(3):
            meta = torch.empty(1, 2, 5, dtype=torch.bfloat16, device="meta")
            state[f"cube{i}{j}"] = ShardedTensor.from_rank_offsets("cube", meta, (0, i, 2), (1, j, 3))
    state["vec"] = ShardedTensor.from_rank_offsets("vec", torch.empty(7, device="meta"))
    return state


def box_of(st: ShardedTensor) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(st.global_offset, st.local_shape))


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A checkpoint of SOURCES written with files of ~1 KB, and how many produced
    fragment bytes were alive at most while it was written."""
    monkeypatch.setattr(torch_dist_io, "FILE_BYTES", 1000)
    alive, most = [0], [0]

    def produce(st):
        part = SOURCES[st.key][box_of(st)].contiguous()
        # Backed by a numpy array, which lives exactly as long as the tensor's storage
        # (tensor objects do not: writers detach and wrap them).
        array = part.view(-1).view(torch.uint8).numpy().copy()
        alive[0] += array.nbytes
        most[0] = max(most[0], alive[0])
        weakref.finalize(array, lambda n=array.nbytes: alive.__setitem__(0, alive[0] - n))
        return torch.from_numpy(array).view(part.dtype).view(part.shape)

    # Without a process group DCP saves in this one process (and says so in a warning).
    with pytest.warns(UserWarning, match="single process"):
        torch_dist_io.StreamingSaveStrategy(produce).save(fragments(), tmp_path)
    # dist_checkpointing.save writes this file around the strategy; the reader checks it.
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return tmp_path, most[0]


def test_fragments_are_made_while_written_and_files_stay_small(saved):
    directory, most_alive = saved
    # Files close once they hold 1000 bytes, and torch's writer lets a file's tensors go
    # when the file is done: never more than one file's worth plus the fragment being
    # made is alive. (One file per rank kept the 4 layers and more: >= 2560 bytes.)
    assert most_alive < 1000 + FRAGMENT_BYTES
    assert len(list(directory.glob("*.distcp"))) >= 4


def test_reader_gives_back_every_tensor_and_box(saved, monkeypatch):
    directory, _ = saved
    reader = torch_dist_io.TorchDistReader(directory)
    for key, source in SOURCES.items():
        assert reader.shape(key) == tuple(source.shape) and reader.dtype(key) == source.dtype
        assert torch.equal(reader.read(key), source), key
        index = (slice(1, source.shape[0] - 1),) + ((slice(1, 4),) if source.dim() > 1 else ())
        assert torch.equal(reader.read(key, index), source[index]), key
    assert "nope" not in reader
    with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
        reader.read("nope")
    # Records in a layout the reader does not know are loaded whole by torch.load instead.
    monkeypatch.setattr(torch_dist_io, "_raw_offset", lambda *args: None)
    fallback = torch_dist_io.TorchDistReader(directory)
    for key, source in SOURCES.items():
        assert torch.equal(fallback.read(key, (slice(1, 2),)), source[1:2]), key


def test_reader_names_what_is_wrong(saved, tmp_path_factory):
    directory, _ = saved
    other = tmp_path_factory.mktemp("other")
    with pytest.raises(CheckpointError, match="not a Megatron dist checkpoint"):
        torch_dist_io.TorchDistReader(other)
    (other / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CheckpointError, match="only 'torch_dist' is read"):
        torch_dist_io.TorchDistReader(other)
    for path in directory.glob("*.distcp"):
        path.write_bytes(path.read_bytes()[:10])  # truncated
    with pytest.raises(CheckpointError, match="cannot be read"):
        torch_dist_io.TorchDistReader(directory).read("big")
