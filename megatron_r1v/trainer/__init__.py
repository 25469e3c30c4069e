"""Training: model/optimizer setup, schedule-driven steps, (later) MPO and GRPO loops."""
