"""torch.profiler views of the two hot paths, to see where the time goes before optimising it.

Run:  python benchmarks/profile_steps.py icl --shots 32 [--path shared|expand|full]
      python benchmarks/profile_steps.py train
Prints the profiler's table of the most expensive operators (self CPU time). Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench import ft_batches, mnli_icl_inputs  # noqa: E402

from fewtune.engine import devices, engine, models  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["icl", "train"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--path", default="shared", choices=["shared", "expand", "full"])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-pack", action="store_true", help="train: padded batches (the default packs them where supported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.pick_device("cpu")
    tokenizer = models.load_tokenizer(args.model)
    if args.what == "icl":
        lm = models.load_model(args.model, "lm")
        models.set_pad_token(lm, tokenizer)
        prefix, queries, label_ids, _ = mnli_icl_inputs(tokenizer, args.shots, args.n)
        kw = dict(prefix_ids=prefix or None, reuse_prefix=args.path != "full", shared_prefix=args.path == "shared")
        engine.score(lm, tokenizer, queries[:16], label_ids, device, args.dtype, 16, **kw)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            o = engine.score(lm, tokenizer, queries, label_ids, device, args.dtype, 16, **kw)
            print(f"{args.n} examples, {len(prefix)} prefix tokens, path {o.path}: {time.perf_counter() - t0:.2f} s "
                  f"(of which the prefix's KV cache: {o.prefix_seconds:.2f} s)")
    else:
        import fewtune.methods.ft  # noqa: F401
        from fewtune.methods import get_method
        method = get_method("ft", {})
        torch.manual_seed(0)
        model = models.load_model(args.model, method.objective, 2)
        models.set_pad_token(model, tokenizer)
        items = ft_batches(tokenizer, args.n)
        settings = engine.TrainSettings(epochs=1, batch_size=8, lr=1e-5, warmup_ratio=0.0, dtype=args.dtype)
        loss = lambda m, chunk, batch: _ft_loss(m, chunk, batch)  # noqa: E731
        kw = dict(pad_id=tokenizer.pad_token_id, progress=False, pack=not args.no_pack)
        engine.train(model, items[:8], loss, settings, device, **kw)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r = engine.train(model, items, loss, settings, device, **kw)
        print(f"{len(items)} examples, {r.steps} steps, {'packed' if r.packed else 'padded'} batches: {r.seconds:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _ft_loss(model, chunk, batch):
    logits = engine.class_logits(model, batch, None).float()  # padded or packed
    labels = torch.tensor([it["label"] for it in chunk])
    return torch.nn.functional.cross_entropy(logits, labels), logits


if __name__ == "__main__":
    raise SystemExit(main())
