"""Pattern-based fine-tuning: the input goes through the task's pattern; cross-entropy over the
verbalizer words' logits at the last position, from the model's own LM head (no new parameters).
All weights train (with a tied head, the input embedding too)."""

from __future__ import annotations

from . import register
from .base import Method


@register
class PBFT(Method):
    name = "pbft"
