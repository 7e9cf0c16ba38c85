"""In-context learning: no training. k demonstrations in the task's pattern, each followed by its label
word and a blank line, then the query; the prediction is the label word with the highest next-token logit.
The demonstrations are the run's few-shot sample (class-balanced, order shuffled by the seed); k = 0 is zero-shot.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import Method, Options


@dataclass
class IclOptions(Options):
    separator: str = "\n\n"   # between demonstrations and before the query


@register
class ICL(Method):
    name = "icl"
    trains = False
    Options = IclOptions

    def eval_prefix(self, ctx):
        demos = ctx.extra.get("demonstrations", ctx.train_examples)
        if not demos:
            return None
        words = ctx.pattern.verbalizer
        return "".join(ctx.task.format(ctx.pattern, ex) + words[ex.label] + self.opts.separator for ex in demos)


def fit_demonstrations(method: ICL, ctx, longest_query: int, limit: int) -> None:
    """Drop demonstrations until prefix + the longest query fit in `limit` tokens (policy: `drop_to_fit`).

    Recorded in the result as `demonstrations_used`/`_dropped` and `demonstration_indices`.
    """
    from ..batching import encode

    def length(demos):
        ctx.extra["demonstrations"] = demos
        return len(encode(ctx.tokenizer, [method.eval_prefix(ctx)])[0][0]) if demos else 0
    demos, dropped = drop_to_fit(list(ctx.train_examples), length, limit - longest_query)
    ctx.extra["demonstrations"] = demos
    ctx.extra["demonstrations_used"] = len(demos)
    ctx.extra["demonstrations_dropped"] = dropped
    ctx.extra["demonstration_indices"] = [ex.idx for ex in demos]


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
