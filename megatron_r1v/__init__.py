"""megatron-r1v: vision-language reasoning training (the Skywork R1V2 recipe) on Megatron-Core.

Importing the package is cheap: it needs neither Transformer Engine (``gpu`` extra) nor
SGLang (``rollout`` extra); those are imported only by the code paths that use them.
"""

__version__ = "0.1.0"
