"""Context distillation. The teacher is the frozen base model that sees a context before the query
(an instruction, or an instruction plus k demonstrations); the student is the same model trained to match
the teacher *without* the context, so it predicts as cheaply as zero-shot.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, gold), over the verbalizer words.
The teacher's outputs are computed once per training example, before training starts, with the base weights
(the student's initial weights), so no second copy of the model is held. The shared context's key/value
cache is computed once too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import engine
from ..engine.batching import encode, leading_special_ids
from ..errors import FewtuneError
from .base import Method, Options, option
from .icl import demonstrations_text, drop_to_fit
from .lora import ADAPTER_DEFAULTS, LoraOptions, wrap


@dataclass
class CdOptions(Options):
    context: str = option("instruction", flag="--context", help="instruction or few-shot")
    context_shots: int | None = option(None, flag="--context-shots", kind=int,
                                       help="demonstrations in the teacher's context [4]")
    # 1 = distillation only
    alpha: float = option(0.5, flag="--alpha", help="weight of the distillation term")
    temperature: float = option(2.0, flag="--temperature", help="distillation temperature")
    student: str = option("full", flag="--student", help="full or lora")
    lora_r: int | None = option(None, flag="--lora-r", kind=int, help="with --student lora: rank [lora's]")
    lora_alpha: int | None = option(None, flag="--lora-alpha", kind=int, help="with --student lora: alpha [lora's]")

    def __post_init__(self):
        if self.context not in ("instruction", "few-shot"):
            raise FewtuneError(f"cd: context must be instruction or few-shot, got {self.context!r}.")
        if self.context == "instruction" and self.context_shots is not None:
            raise FewtuneError("cd: --context-shots only applies with --context few-shot.")
        if self.context == "few-shot":
            if self.context_shots is None:
                self.context_shots = 4
            if not isinstance(self.context_shots, int) or isinstance(self.context_shots, bool) or self.context_shots < 1:
                raise FewtuneError(f"cd: context_shots must be a positive integer, got {self.context_shots!r}.")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise FewtuneError(f"cd: alpha must be in [0, 1], got {self.alpha!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise FewtuneError(f"cd: temperature must be positive, got {self.temperature!r}.")
        if self.student not in ("full", "lora"):
            raise FewtuneError(f"cd: student must be full or lora, got {self.student!r}.")
        if self.student == "full" and (self.lora_r is not None or self.lora_alpha is not None):
            raise FewtuneError("cd: --lora-r/--lora-alpha (lora_r/lora_alpha) apply only with --student lora.")
        if self.student == "lora":  # validated here, before any loading, by LoraOptions' own checks
            self.student_lora()

    def student_lora(self) -> LoraOptions:
        """The LoRA student's options: lora's own defaults where lora_r/lora_alpha are not given."""
        given = {"r": self.lora_r, "alpha": self.lora_alpha}
        return LoraOptions(**{k: v for k, v in given.items() if v is not None})


class ContextDistillation(Method):
    Options = CdOptions

    def __init__(self, options):
        super().__init__(options)
        self.teacher_calls = 0  # examples the teacher has scored (tests check: once per training example)
        # the distillation term summed over training, kept on the device (a float() per micro-batch would make the
        # host wait for the GPU every step); read once, in after_train, which checks it moved
        self.distill_loss_sum = 0.0

    @property
    def defaults(self):
        # a LoRA student trains on the adapters' budget, a full student on full fine-tuning's
        return dict(ADAPTER_DEFAULTS) if self.opts.student == "lora" else dict(Method.defaults)

    def preset(self, name):
        # the quick preset's learning rate: lora's for a LoRA student, full fine-tuning's otherwise
        if name != "quick":
            return {}
        return {"lr": 5e-4 if self.opts.student == "lora" else 2e-5}

    def teacher_context(self, ctx) -> str:
        text = (ctx.task.instruction or "").strip()
        text = text + "\n\n" if text else ""
        if self.opts.context == "few-shot":
            k = self.opts.context_shots
            if k > len(ctx.train_examples):
                raise FewtuneError(f"cd: --context-shots {k} is more than the {len(ctx.train_examples)} training examples.")
            # the first k of the seeded, class-balanced sample order: balanced as far as k allows
            demos = balanced_prefix(ctx.train_examples, k, len(ctx.task.labels))
            instruction = text

            def build(ds):
                return instruction + demonstrations_text(ctx.task, ctx.pattern, ds)
            demos, dropped = self._fit_context(ctx, demos, build)
            ctx.info["context_demonstration_indices"] = [ex.idx for ex in demos]
            ctx.info["context_demonstrations_used"] = len(demos)
            ctx.info["context_demonstrations_dropped"] = dropped
            text = build(demos)
        if not text:
            raise FewtuneError(f"cd: task '{ctx.task.name}' has no instruction, so --context instruction gives the teacher no context.")
        self._fit_context(ctx, [], lambda _: text)  # the instruction alone must fit as well
        return text

    def _fit_context(self, ctx, demos, build):
        """ICL's policy for the teacher's context: drop demonstrations (methods/icl.drop_to_fit) until context +
        the longest training query fit the model's positions; refuse when nothing (or no demonstration) fits."""
        limit = ctx.max_positions
        queries = encode(ctx.tokenizer, [ctx.task.format(ctx.pattern, ex) for ex in ctx.train_examples],
                         ctx.config.max_length, with_bos=False)[0]
        longest = max(map(len, queries))

        def length(ds):
            return len(encode(ctx.tokenizer, [build(ds)])[0][0])
        kept, dropped = drop_to_fit(demos, length, limit - longest)
        n = length(kept)
        ctx.info["teacher_context_tokens"], ctx.info["teacher_context_limit"] = n, limit
        if demos and not kept:
            raise FewtuneError(f"cd: not one of the {len(demos)} demonstrations of the teacher's context fits in the model's "
                               f"{limit} positions beside the longest training query ({longest} tokens); lower --max-length, "
                               f"or use --context instruction.")
        if n + longest > limit:
            raise FewtuneError(f"cd: the teacher's context ({n} tokens) + the longest training query ({longest}) exceed the "
                               f"model's {limit} positions; shorten the task's instruction or lower --max-length.")
        return kept, dropped

    def prepare(self, ctx, model):
        if self.opts.student == "lora":
            return wrap(model, self.opts.student_lora(), "lm")
        return model

    def train_items(self, ctx, model, seqs, examples):
        context = self.teacher_context(ctx)
        prefix_ids = encode(ctx.tokenizer, [context])[0][0]
        n_bos = len(leading_special_ids(ctx.tokenizer))
        queries = [s[n_bos:] for s in seqs]  # the context carries the BOS
        # Before the first update the student *is* the base model; with a LoRA student, the adapters are
        # switched off as well, so the teacher is exactly the frozen base model.
        base = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with base:
            out = engine.score(model, ctx.tokenizer, queries, ctx.label_ids, ctx.device, ctx.dtype,
                        batch_size=ctx.config.scoring_rows, prefix_ids=prefix_ids)
        self.teacher_calls += len(queries)
        # The distillation term must not be zero: if the teacher's outputs equal the student's (no context,
        # or a context that changes nothing), distillation silently degenerates into plain pbft.
        # Checked on the first 8 examples only: an exactly zero KL there already means the context is inert.
        n_check = min(8, len(seqs))
        student = engine.score(model, ctx.tokenizer, seqs[:n_check], ctx.label_ids, ctx.device, ctx.dtype,
                        batch_size=ctx.config.scoring_rows)
        T = float(self.opts.temperature)
        t_logp = torch.log_softmax(torch.tensor(out.logits[:n_check]) / T, -1)
        s_logp = torch.log_softmax(torch.tensor(student.logits) / T, -1)
        kl = float((t_logp.exp() * (t_logp - s_logp)).sum(-1).mean())
        ctx.info["distill_kl_initial"] = kl
        if self.opts.alpha > 0 and not kl > 0:
            raise FewtuneError("cd: the teacher's outputs equal the student's before training (KL = 0): the context changes nothing.")
        ctx.info["teacher_seconds"] = out.seconds
        ctx.info["teacher_prefix_path"] = out.path
        ctx.info["teacher_examples"] = len(queries)
        ctx.info["teacher_accuracy"] = float(np.mean(out.logits.argmax(-1) == np.array([ex.label for ex in examples])))
        return [{"ids": s, "label": ex.label, "teacher": torch.tensor(t)} for s, ex, t in zip(seqs, examples, out.logits)]

    def loss(self, ctx):
        T, alpha = float(self.opts.temperature), float(self.opts.alpha)

        def loss_fn(model, chunk, batch):
            logits = engine.class_logits(model, batch, ctx.label_ids).float()
            labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
            teacher = torch.stack([it["teacher"] for it in chunk]).to(logits.device).float()
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits / T, -1), torch.log_softmax(teacher / T, -1),
                                            log_target=True, reduction="batchmean")
            ce = torch.nn.functional.cross_entropy(logits, labels)
            self.distill_loss_sum = self.distill_loss_sum + kl.detach()
            return alpha * T * T * kl + (1 - alpha) * ce, logits
        return loss_fn

    def after_train(self, ctx):
        self.distill_loss_sum = float(self.distill_loss_sum)
        ctx.info["distill_loss_sum"] = self.distill_loss_sum
        if self.opts.alpha > 0 and self.distill_loss_sum <= 0.0:
            raise FewtuneError("cd: the distillation term was zero throughout training.")


def balanced_prefix(examples, k: int, n_labels: int):
    """k examples from the seeded sample order, taking classes in turn so the context stays balanced."""
    by_class = [[ex for ex in examples if ex.label == c] for c in range(n_labels)]
    out, i = [], 0
    while len(out) < k:
        for c in range(n_labels):
            if i < len(by_class[c]) and len(out) < k:
                out.append(by_class[c][i])
        i += 1
    order = {id(ex): j for j, ex in enumerate(examples)}
    return sorted(out, key=lambda ex: order[id(ex)])
