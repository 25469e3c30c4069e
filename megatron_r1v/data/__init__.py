"""Data pipeline: JSONL schemas and validation, images, InternVL dynamic tiling (PIL
reference and NVIDIA DALI; ``tilers`` picks one, ``replica_tiling`` runs it on one rank
per replica), the loaders, the QwQ / R1V2 chat template, packing, synthetic data and a
small tokenizer for tiny models. Submodules are imported where used (DALI is optional).
"""
