"""Training objectives: GRPO (Eq. 6 advantages, Eq. 8 objective) and, with its issue, MPO."""
