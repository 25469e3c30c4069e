"""Training objectives: GRPO (``grpo``: Eq. 6 advantages, Eq. 8 objective) and MPO
(``mpo``: Eq. 2-5, the preference stage's losses)."""
