"""In-context learning: no training. k demonstrations in the task's pattern, each followed by its label
word and a blank line, then the query; the prediction is the label word with the highest next-token logit.
The demonstrations are the run's few-shot sample (class-balanced, order shuffled by the seed); k = 0 is zero-shot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..engine.batching import encode
from .base import Method, Options

log = logging.getLogger("fewtune")


@dataclass
class IclOptions(Options):
    separator: str = "\n\n"   # between demonstrations and before the query


def demonstrations_text(task, pattern, examples, separator: str = "\n\n") -> str:
    """Labelled examples as a prompt: each in the pattern, followed by its label word and `separator` (icl's
    demonstrations, cd's few-shot teacher context)."""
    words = pattern.verbalizer
    return "".join(task.format(pattern, ex) + words[ex.label] + separator for ex in examples)


class ICL(Method):
    trains = False
    Options = IclOptions

    def __init__(self, options):
        super().__init__(options)
        self.demonstrations = None  # the run's sample until fit_eval_prefix has fitted it to the context

    def seed_free(self, config):
        # zero-shot: no demonstrations to sample or order, no training; the evaluation subsample has a fixed seed
        return config.shots == 0

    def eval_prefix(self, ctx):
        demos = ctx.train_examples if self.demonstrations is None else self.demonstrations
        if not demos:
            return None
        return demonstrations_text(ctx.task, ctx.pattern, demos, self.opts.separator)

    def fit_eval_prefix(self, ctx, eval_sets):
        if not ctx.train_examples:
            return
        longest = max(len(s) for examples in eval_sets.values()
                      for s in encode(ctx.tokenizer, [self.text(ctx, ex) for ex in examples], ctx.config.max_length,
                                      with_bos=False)[0])
        fit_demonstrations(self, ctx, longest, ctx.max_positions)
        if not self.demonstrations:
            log.warning("No demonstration fits the model's context of %d tokens: scoring zero-shot.", ctx.max_positions)

    def examples_used(self, ctx):
        return len(ctx.train_examples) if self.demonstrations is None else len(self.demonstrations)


def fit_demonstrations(method: ICL, ctx, longest_query: int, limit: int) -> None:
    """Drop demonstrations until prefix + the longest query fit in `limit` tokens (policy: `drop_to_fit`).

    Recorded in the result as `demonstrations_used`/`_dropped` and `demonstration_indices`.
    """
    def length(demos):
        method.demonstrations = demos
        return len(encode(ctx.tokenizer, [method.eval_prefix(ctx)])[0][0]) if demos else 0
    demos, dropped = drop_to_fit(list(ctx.train_examples), length, limit - longest_query)
    method.demonstrations = demos
    ctx.info["demonstrations_used"] = len(demos)
    ctx.info["demonstrations_dropped"] = dropped
    ctx.info["demonstration_indices"] = [ex.idx for ex in demos]


def drop_to_fit(demos: list, length, budget: int) -> tuple[list, int]:
    """(the demonstrations kept, how many dropped) so that `length(kept) <= budget` (ICL's and CD's teacher's policy).

    Policy: drop one demonstration at a time from the class that has the most left (ties: the higher
    class id), taking the last one of that class in the shuffled order; so the set stays as balanced as
    possible and the order of the rest is unchanged. May return no demonstrations.
    """
    demos, dropped = list(demos), 0
    while demos and length(demos) > budget:
        counts = {}
        for ex in demos:
            counts[ex.label] = counts.get(ex.label, 0) + 1
        target = max(counts, key=lambda c: (counts[c], c))
        last = max(i for i, ex in enumerate(demos) if ex.label == target)
        demos.pop(last)
        dropped += 1
    return demos, dropped
