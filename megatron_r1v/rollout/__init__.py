"""Rollout: the engine contract (``engine``), transformers' InternVL as an engine
(``hf_engine``) and streaming weight synchronization from Megatron (``weight_sync``)."""
