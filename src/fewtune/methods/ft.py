"""Vanilla fine-tuning: a new classification head on the hidden state of the last non-padding token
(`AutoModelForSequenceClassification`), raw text input without a pattern, all weights train."""

from __future__ import annotations

from .base import Method


class FT(Method):
    presets = {"quick": {"lr": 2e-5}}  # 5 epochs at batch 8 (hyperparameters.PRESETS): twice the study's rate

    @property
    def objective(self):
        return "head"
