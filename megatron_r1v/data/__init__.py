"""Data pipeline: JSONL schemas and validation, images, InternVL dynamic tiling (PIL
reference and NVIDIA DALI), the QwQ / R1V2 chat template, packing, synthetic data and a
small tokenizer for tiny models. Submodules are imported where used (DALI is optional).
"""
