"""LP-FT (Kumar et al., ICLR 2022): linear probing, then full fine-tuning that starts from the probe's head.

Stage 1 (LP) is `probe` exactly: the body frozen, the representation of each training example computed once, the
head fitted by L2-regularised logistic regression (L-BFGS, at most `max_iter` iterations). Stage 2 (FT) is `ft`
exactly: every weight trains through the one training loop, on the run's budget (epochs, batch size, learning rate
and schedule: ft's, under a preset too), with the head starting from stage 1's instead of at random. Fine-tuning
from a random head moves the body while the head is still wrong and distorts the pretrained features; from a fitted
head the early gradients are small and the features change less, which is Kumar et al.'s explanation of why LP-FT
keeps the out-of-domain accuracy that FT loses. Both stages' budgets are recorded (result["hyperparameters"]: the
FT stage's loop budget and `lp`, the LP stage's), and their times in method_info (`lp_seconds`, `ft_seconds`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .base import Method
from .ft import FT
from .probe import Probe, ProbeOptions


@dataclass
class LpftOptions(ProbeOptions):
    """The LP stage's options are the probe's (pooling, c, max_iter); the FT stage's budget is the run's."""

    method = "lpft"


class LPFT(Probe):
    Options = LpftOptions
    ships_trained_only = False  # every weight trained: the whole model, as ft
    defaults = FT.defaults  # the FT stage: ft's budget (the study's full fine-tuning), and ft's under a preset
    presets = FT.presets

    def budget(self, hp):
        return {**hp, "lp": Probe.budget(self, hp)}

    def prepare(self, ctx, model):
        model = super().prepare(ctx, model)  # the probe's view: body frozen, the head alone trainable
        for p in model.parameters():
            p.requires_grad_(True)  # stage 2 trains every weight (stage 1 computes no gradient)
        return model

    def fit(self, ctx, model, items, hp, seed, progress=True):
        fit, _ = self.fit_head(ctx, model, items)
        self.lp_head = fit.weight.clone()  # the FT stage's starting head (tests compare it with probe's)
        t0 = time.perf_counter()
        tr = Method.fit(self, ctx, model, items, hp, seed, progress)
        ctx.info["ft_seconds"] = round(time.perf_counter() - t0, 3)
        ctx.info["ft_steps"] = tr.steps
        return tr  # cost.train_seconds counts both stages; train_loop_seconds the loop's (stage 2) alone
