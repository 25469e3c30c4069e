"""Checkpoint I/O: Hugging Face <-> Megatron conversion and the readers and writers under it.

- ``conversion``: HF <-> Megatron dist-checkpoint import / export (validation, atomic output)
- ``model_fragments``: the model's tensors as TP/PP-independent dist-checkpoint fragments
- ``hf_layouts``: HF layout detection, validation and in-memory layout conversion (no Megatron)
- ``weights``: load HF-named tensors into a sharded model, gather them back
- ``hf_io``: lazy safetensors reader, sharded safetensors writer
- ``torch_dist_io``: streaming ``.distcp`` writer and reader; ``box_io``: reading boxes of stored tensors

HF tensor names come from :mod:`megatron_r1v.models.r1v.hf_mapping` only; nothing here
spells one.
"""
