"""Training objectives: GRPO (``grpo``: Eq. 6 advantages, Eq. 8 objective), MPO
(``mpo``: Eq. 2-5, the preference stage's losses) and SFT (``sft``: the token-mean NLL of
the assistant replies)."""
