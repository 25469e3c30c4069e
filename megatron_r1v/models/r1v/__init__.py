"""The R1V2 model in Megatron-Core: presets, layer specs, model builders, HF mapping."""

from megatron_r1v.models.r1v.presets import DecoderArch, R1VArch, get_preset, preset_names

__all__ = ["DecoderArch", "R1VArch", "get_preset", "preset_names"]
