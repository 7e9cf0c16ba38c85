"""Pattern-based fine-tuning: the input goes through the task's pattern; cross-entropy over the
verbalizer words' logits at the last position, from the model's own LM head (no new parameters).
All weights train (with a tied head, the input embedding too)."""

from __future__ import annotations

from .base import Method


class PBFT(Method):
    presets = {"quick": {"lr": 2e-5}}  # 5 epochs at batch 8 (hyperparameters.PRESETS): twice the study's rate
