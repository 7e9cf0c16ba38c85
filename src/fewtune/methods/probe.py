"""Linear probing: the LM frozen; logistic regression (L-BFGS) on its final hidden state of the input, fitted once.

A linear classifier on the model's representation of the input, fitted by L2-regularised logistic regression
(scikit-learn, L-BFGS); no backward pass through the body.

The representation is the final hidden state of the last non-padding token (what ft's head reads), or its mean over
the input's tokens (`pooling = "mean"`). It is computed once per training example per run, by one forward pass
without gradients; the classifier is then fitted on those vectors. The classifier *is* ft's new head (`score`: a
bias-free linear map, hidden x classes), so lpft starts fine-tuning from it and a saved probe ships only that head.

Why a solver and not the training loop: a probe is a convex problem, so L-BFGS finds its optimum. The probe then has
no learning rate, epochs or schedule to choose, and the same sample always gives the same head (the linear-probe
protocol of Kumar et al. 2022 and of CLIP's evaluation: scikit-learn's logistic regression). The features are
divided by one number, their root mean square over the sample, so that C means the same on models whose hidden
states differ in scale; the division is folded back into the head.
"""

from __future__ import annotations

import logging
import math
import time
import types
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import engine
from ..engine.batching import collate, length_batches
from ..engine.devices import autocast
from ..errors import FewtuneError
from .base import Method, Options, option

log = logging.getLogger("fewtune")
POOLINGS = ("last", "mean")


@dataclass
class ProbeOptions(Options):
    # last: the token ft's head reads; mean: every token of the input weighs the same
    pooling: str = option("last", flag="--pooling", help="last (the last non-padding token's final hidden state) "
                                                         "or mean (over the input's tokens)")
    # scikit-learn's C: the data term is weighted by C against 1/2 |W|^2; smaller = a stronger pull towards 0
    c: float = option(1.0, flag="--probe-c", kind=float, help="inverse L2 regularisation strength (scikit-learn's C)")
    max_iter: int = option(1000, flag="--probe-max-iter", help="L-BFGS iterations at most (a budget: it stops "
                                                              "earlier at the optimum)")

    method = "probe"  # a class attribute, not an option: the name errors give (lpft reuses these options)

    def __post_init__(self):
        m = self.method
        if self.pooling not in POOLINGS:
            raise FewtuneError(f"{m}: pooling (--pooling) must be last or mean, got {self.pooling!r:.40}.")
        if (not isinstance(self.c, (int, float)) or isinstance(self.c, bool) or not math.isfinite(self.c)
                or self.c <= 0):
            raise FewtuneError(f"{m}: c (--probe-c, the inverse L2 regularisation strength) must be a positive "
                               f"number, got {self.c!r:.40}.")
        if not isinstance(self.max_iter, int) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise FewtuneError(f"{m}: max_iter (--probe-max-iter, the L-BFGS iterations) must be a positive "
                               f"integer, got {self.max_iter!r:.40}.")


def head_module(model) -> torch.nn.Module:
    """The classification head of a *ForSequenceClassification model (`score`, or `classifier`)."""
    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Linear):
            return module
    raise FewtuneError(f"{type(model).__name__} has no linear classification head (score / classifier) to probe.")


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] per-token vectors -> [B, D]: at each row's last real token (either padding side), or their mean."""
    mask = mask.to(states.dtype)
    if pooling == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = (mask * torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)).argmax(-1)
    return states[torch.arange(states.shape[0], device=states.device), last]


def mean_pooled(model):
    """Make the classification model score the mean of its tokens' states instead of its last token's: the head is
    linear, so the mean of its per-token outputs is the head of the mean state. Applied on the instance (its saved
    weights are unchanged), by `prepare` and again on a model reloaded by `fewtune predict` (Method.reloaded)."""
    head = head_module(model)
    forward = model.forward

    def pooled_forward(self, input_ids=None, attention_mask=None, **kwargs):
        seen = []
        hook = head.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            out = forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            hook.remove()
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        out.logits = pool(seen[-1], mask, "mean")
        return out

    model.forward = types.MethodType(pooled_forward, model)
    return model


def representations(model, tokenizer, seqs: list, pooling: str, device, dtype: str, batch_size: int) -> torch.Tensor:
    """[N, D] fp32: what the head reads for each sequence, pooled; one forward pass per sequence, no gradients."""
    head = head_module(model)
    seen = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = torch.zeros((len(seqs), head.in_features), dtype=torch.float32)
    model.eval()
    try:
        with torch.no_grad(), autocast(dtype, device):
            for idx in length_batches([len(s) for s in seqs], batch_size):
                batch = collate([seqs[i] for i in idx], tokenizer.pad_token_id, device=device)
                seen.clear()
                model(**batch)
                out[idx] = pool(seen[-1].float(), batch["attention_mask"], pooling).cpu()
    finally:
        hook.remove()
    return out


@dataclass
class ProbeFit:
    """The fitted head and what the fit says about itself (recorded in method_info)."""
    weight: torch.Tensor   # [classes, D]: the head, in the features' own units
    iterations: int
    converged: bool
    train_loss: float      # mean cross-entropy of the fitted head on the sample (the penalty not counted)
    train_accuracy: float
    feature_scale: float   # the root mean square the features were divided by


def solve(features: torch.Tensor, labels: list[int], n_classes: int, c: float, max_iter: int, method: str) -> ProbeFit:
    """Multinomial logistic regression without intercept (ft's head has no bias) on RMS-scaled features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression  # imported in prepare: its ~1-4 s count as loading
    y = np.asarray(labels)
    present = sorted(set(y.tolist()))
    if present != list(range(n_classes)):
        raise FewtuneError(f"{method}: the training sample has examples of class(es) {present} only; a linear probe "
                           f"needs every one of the {n_classes} classes (more --shots, or a balanced sample).")
    x = features.double().numpy()
    scale = float(np.sqrt(np.mean(x ** 2))) or 1.0
    clf = LogisticRegression(C=float(c), solver="lbfgs", max_iter=max_iter, fit_intercept=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x / scale, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    coef = clf.coef_ / scale
    # scikit-learn keeps one vector w for two classes (p(1) = sigmoid(w.x)); as two logits: [-w/2, w/2]
    weight = np.stack([-coef[0] / 2, coef[0] / 2]) if n_classes == 2 else coef
    logits = x @ weight.T
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return ProbeFit(torch.tensor(weight, dtype=torch.float32), int(np.max(clf.n_iter_)), converged,
                    float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(1) == y).mean()), scale)


class Probe(Method):
    Options = ProbeOptions
    ships_trained_only = True  # the head alone: hidden x classes

    def __init__(self, options):
        super().__init__(options)
        self.representation_calls = 0  # examples whose representation was computed (tests: once per example)

    @property
    def objective(self):
        return "head"

    def budget(self, hp):
        # the loop's epochs, learning rate and schedule do not apply: the solver runs to its optimum
        return {"solver": "scikit-learn LogisticRegression (lbfgs, L2, no intercept)", "c": self.opts.c,
                "max_iter": self.opts.max_iter, "pooling": self.opts.pooling}

    def prepare(self, ctx, model):
        import sklearn.linear_model  # noqa: F401  a one-off import, as peft's for lora: loading, not training
        head = {id(p) for p in head_module(model).parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
        return mean_pooled(model) if self.opts.pooling == "mean" else model

    def reloaded(self, model):
        return mean_pooled(model) if self.opts.pooling == "mean" else model

    def packs(self, ctx):
        return self.opts.pooling == "last"  # the packed loss reads each sequence's last token only

    def fit_head(self, ctx, model, items) -> tuple[ProbeFit, float]:
        """Fit the head on the sample's representations and put it in the model: (the fit, seconds)."""
        t0 = time.perf_counter()
        feats = representations(model, ctx.tokenizer, [it["ids"] for it in items], self.opts.pooling, ctx.device,
                                ctx.dtype, ctx.config.scoring_rows)
        self.representation_calls += len(items)
        t_solve = time.perf_counter()
        fit = solve(feats, [it["label"] for it in items], len(ctx.task.labels), self.opts.c, self.opts.max_iter,
                    self.name)
        head = head_module(model)
        with torch.no_grad():
            head.weight.copy_(fit.weight.to(head.weight.device, head.weight.dtype))
            if head.bias is not None:
                head.bias.zero_()
        if not fit.converged:
            log.warning("%s: L-BFGS stopped at max_iter = %d before the optimum (--probe-max-iter).", self.name,
                        self.opts.max_iter)
        seconds = time.perf_counter() - t0
        prefix = "lp_" if self.name != "probe" else ""
        ctx.info.update({f"{prefix}iterations": fit.iterations, f"{prefix}converged": fit.converged,
                         f"{prefix}train_loss": fit.train_loss, f"{prefix}train_accuracy": fit.train_accuracy,
                         f"{prefix}feature_scale": fit.feature_scale, f"{prefix}seconds": round(seconds, 3),
                         "representation_seconds": round(t_solve - t0, 3),
                         "solve_seconds": round(time.perf_counter() - t_solve, 3),
                         "representation_examples": self.representation_calls,
                         "representation_dim": int(feats.shape[1])})
        return fit, seconds

    def fit(self, ctx, model, items, hp, seed, progress=True):
        fit, seconds = self.fit_head(ctx, model, items)
        return engine.TrainResult(seconds=seconds, steps=fit.iterations, examples_seen=len(items),
                                  tokens=sum(len(it["ids"]) for it in items), epoch_losses=[fit.train_loss],
                                  final_loss=fit.train_loss, train_accuracy=fit.train_accuracy, packed=False)
