"""Vanilla fine-tuning: a new classification head on the hidden state of the last non-padding token
(`AutoModelForSequenceClassification`), raw text input without a pattern, all weights train."""

from __future__ import annotations

from . import register
from .base import Method


@register
class FT(Method):
    name = "ft"

    @property
    def objective(self):
        return "head"
