"""Speed and memory of every method on this machine, and what each speed technique buys.

Run:  make bench      (or: .venv/bin/python benchmarks/bench.py --output results/bench.json)

Prints one table and writes the same figures to JSON. Inputs are 64-token CoLA prompts on the bundled model
(SmolLM2-135M) unless --model is given. Figures are from one run on one machine: compare ratios within a run.
FLOP counts: forward = 2 x non-embedding params x tokens (+ the LM head for the scored position); full training
= 3x forward; LoRA = 2x forward (no weight gradients for the frozen base); adaptive = 3x forward of the trained blocks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fewtune import engine, models, record
from fewtune.config import RunConfig
from fewtune.data import load_split
from fewtune.methods import RunContext, get_method
from fewtune.tasks import load_task

TOKENS = 64


def matmul_peak(dtype, n=2048, seconds=2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def inputs(task, pattern, tokenizer, n):
    """n prompts of exactly TOKENS tokens: CoLA sentences in the pattern, left-trimmed or extended with more text."""
    train = load_split(task, task.train)
    texts = [task.format(pattern, ex) for ex in train[: 4 * n]]
    seqs, filler = [], tokenizer(" ".join(ex.fields["sentence"] for ex in train[:200]), add_special_tokens=False).input_ids
    for ids in engine.encode(tokenizer, texts)[0]:
        ids = (filler[: max(0, TOKENS - len(ids))] + ids)[-TOKENS:]
        seqs.append(ids)
    return seqs[:n], [ex.label for ex in train[:n]]


def mnli_icl_inputs(tokenizer, shots, n, pattern_index=0):
    """k-shot ICL on MNLI as `fewtune run --method icl` builds it: a class-balanced demonstration prefix from the
    training set (alternating labels), n dev_matched queries. Returns (prefix ids, query ids, label ids, gold)."""
    task = load_task("mnli")
    pattern = task.patterns[pattern_index]
    train = load_split(task, task.train)
    by_class = [[ex for ex in train[:2000] if ex.label == c] for c in range(len(task.labels))]
    demos = [by_class[i % len(by_class)][i // len(by_class)] for i in range(shots)]
    text = "".join(task.format(pattern, ex) + pattern.verbalizer[ex.label] + "\n\n" for ex in demos)
    prefix = engine.encode(tokenizer, [text])[0][0] if shots else []
    dev = load_split(task, task.in_domain)[:n]
    queries = engine.encode(tokenizer, [task.format(pattern, ex) for ex in dev], with_bos=not shots)[0]
    return prefix, queries, models.verbalizer_token_ids(tokenizer, pattern.verbalizer), [ex.label for ex in dev]


def ft_batches(tokenizer, n):
    """The demo's full fine-tuning inputs: n raw MNLI pairs as `ft` gives them (premise, newline, hypothesis;
    no pattern; ~15-70 tokens) with their labels."""
    task = load_task("mnli")
    train = load_split(task, task.train)[:n]
    seqs = engine.encode(tokenizer, [task.raw_separator.join(ex.fields[f] for f in task.fields) for ex in train])[0]
    return [{"ids": s, "label": ex.label} for s, ex in zip(seqs, train)]


def nonembedding_params(model) -> int:
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return sum(p.numel() for p in model.parameters()) - emb


def train_speed(spec, task, pattern, tokenizer, method_name, options, seqs, labels, dtype, device, epochs=2, batch=8):
    cfg = RunConfig(task=task.name, method=method_name, model=spec, shots=len(seqs), method_options=options, eval_batch_size=16)
    method = get_method(method_name, options)
    torch.manual_seed(0)
    model = models.load_model(spec, method.objective, len(task.labels))
    models.set_pad_token(model, tokenizer)
    model.to(device)
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer)
    examples = [type("E", (), {"label": y, "idx": i, "fields": {}})() for i, y in enumerate(labels)]
    ctx = RunContext(cfg, task, pattern, tokenizer, label_ids, examples, device, dtype, extra={"lr": 1e-5})
    model = method.prepare(ctx, model)
    if method_name == "cd":  # the teacher needs real examples for its context
        train = load_split(task, task.train)
        ctx.train_examples = [train[i] for i in range(len(seqs))]
    with record.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        items = method.train_items(ctx, model, seqs, ctx.train_examples if method_name == "cd" else examples)
        settings = engine.TrainSettings(epochs=epochs, batch_size=batch, lr=1e-5, warmup_ratio=0.0, seed=0, dtype=dtype)
        tr = engine.train(model, items, method.loss(ctx), settings, device, method.param_groups(ctx, model),
                          pad_id=tokenizer.pad_token_id, progress=False)
        total = time.perf_counter() - t0
        method.after_train(ctx)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": total, "loop_seconds": tr.seconds, "examples_per_s": len(seqs) * epochs / total,
            "per_epoch_seconds": tr.seconds / epochs, "peak_memory_mib": mem.mib, "trainable_params": trainable,
            "epoch_losses": tr.epoch_losses, "info": {k: v for k, v in ctx.extra.items() if k in ("frozen_cache", "teacher_examples")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=32, help="examples per measurement")
    p.add_argument("--output", default="results/bench.json")
    args = p.parse_args(argv)
    device = engine.pick_device("auto")
    fast = engine.resolve_dtype("auto", device)
    task = load_task("cola")
    pattern = task.patterns[0]
    tokenizer = models.load_tokenizer(args.model)
    seqs, labels = inputs(task, pattern, tokenizer, args.n)
    out = {"machine": record.machine(), "versions": record.versions(), "tokens_per_example": TOKENS, "n": args.n}

    out["matmul_peak_gflops"] = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {out['matmul_peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {out['matmul_peak_gflops']['bf16']:.0f} GFLOP/s")

    lm = models.load_model(args.model, "lm")
    models.set_pad_token(lm, tokenizer)
    lm.to(device)
    n_ne = nonembedding_params(lm)
    hidden, vocab = lm.config.hidden_size, lm.config.vocab_size
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer)
    fwd_flops = 2 * n_ne * TOKENS + 2 * hidden * vocab  # per example, one scored position
    out["eval"] = {}
    ref = None
    for dt in ["fp32", "bf16"] if fast == "bf16" else ["fp32"]:
        engine.score(lm, tokenizer, seqs[:4], label_ids, device, dt, 16)  # warm-up
        s = engine.score(lm, tokenizer, seqs, label_ids, device, dt, 16)
        gf = fwd_flops * len(seqs) / s.seconds / 1e9
        out["eval"][dt] = {"examples_per_s": len(seqs) / s.seconds, "gflops": gf, "fraction_of_peak": gf / out["matmul_peak_gflops"][dt]}
        if ref is None:
            ref = s.logits
        else:
            out["eval"][dt]["max_logit_diff_vs_fp32"] = float(np.abs(s.logits - ref).max())
            out["eval"][dt]["same_predictions"] = bool((s.logits.argmax(-1) == ref.argmax(-1)).all())
            out["eval"][dt]["predictions_changed"] = int((s.logits.argmax(-1) != ref.argmax(-1)).sum())

    # shared-prefix reuse: 16-shot ICL
    train = load_split(task, task.train)
    demos = "".join(task.format(pattern, ex) + pattern.verbalizer[ex.label] + "\n\n" for ex in train[100:116])
    prefix = engine.encode(tokenizer, [demos])[0][0]
    queries = engine.encode(tokenizer, [task.format(pattern, ex) for ex in train[: args.n]], with_bos=False)[0]
    on = engine.score(lm, tokenizer, queries, label_ids, device, fast, 16, prefix_ids=prefix, reuse_prefix=True)
    off = engine.score(lm, tokenizer, queries, label_ids, device, fast, 16, prefix_ids=prefix, reuse_prefix=False)
    # the difference in fp32 (bf16 rounds the two computation orders differently)
    on32 = engine.score(lm, tokenizer, queries[:8], label_ids, device, "fp32", 8, prefix_ids=prefix, reuse_prefix=True)
    off32 = engine.score(lm, tokenizer, queries[:8], label_ids, device, "fp32", 8, prefix_ids=prefix, reuse_prefix=False)
    out["prefix_cache"] = {"prefix_tokens": len(prefix), "on_seconds": on.seconds, "off_seconds": off.seconds,
                           "speedup": off.seconds / on.seconds, "max_logit_diff": float(np.abs(on.logits - off.logits).max()),
                           "max_logit_diff_fp32": float(np.abs(on32.logits - off32.logits).max()),
                           "same_predictions": bool((on.logits.argmax(-1) == off.logits.argmax(-1)).all())}
    del lm

    runs = {"ft": ("ft", {}), "pbft": ("pbft", {}), "adaptive (top 2, cache)": ("adaptive", {"train_layers": 2}),
            "adaptive (top 2, no cache)": ("adaptive", {"train_layers": 2, "frozen_cache": False}),
            "lora (r=8)": ("lora", {}), "cd (instruction)": ("cd", {}), "cd (few-shot 4)": ("cd", {"context": "few-shot", "context_shots": 4})}
    flops_per_example = {"ft": 3 * fwd_flops, "pbft": 3 * fwd_flops, "cd": 3 * fwd_flops, "lora": 2 * fwd_flops,
                         "adaptive": 3 * 2 * (n_ne / lm_depth(args.model)) * 2 * TOKENS}
    out["train"] = {}
    # warm-up: the first training run in a process pays one-off costs (kernel selection, allocator growth)
    train_speed(args.model, task, pattern, tokenizer, "pbft", {}, seqs[:8], labels[:8], fast, device, epochs=1)
    dtypes = [fast] if fast == "fp32" else [fast, "fp32"]
    for label, (name, opts) in runs.items():
        for dt in dtypes if name in ("pbft",) else [fast]:
            r = train_speed(args.model, task, pattern, tokenizer, name, opts, seqs, labels, dt, device)
            gf = flops_per_example[name] * args.n * 2 / r["loop_seconds"] / 1e9
            r.update(gflops=gf, fraction_of_peak=gf / out["matmul_peak_gflops"][dt])
            out["train"][f"{label} [{dt}]"] = r
    t = out["train"]
    out["techniques"] = {
        "prefix_cache_speedup_icl16": out["prefix_cache"]["speedup"],
        "frozen_cache_speedup_per_epoch": t[f"adaptive (top 2, no cache) [{fast}]"]["per_epoch_seconds"] / t[f"adaptive (top 2, cache) [{fast}]"]["per_epoch_seconds"],
        "frozen_cache_max_loss_diff": float(np.max(np.abs(np.array(t[f"adaptive (top 2, no cache) [{fast}]"]["epoch_losses"]) - np.array(t[f"adaptive (top 2, cache) [{fast}]"]["epoch_losses"])))),
        "cd_over_pbft_train_time": t[f"cd (instruction) [{fast}]"]["seconds"] / t[f"pbft [{fast}]"]["seconds"],
    }
    if fast == "bf16":
        out["techniques"]["bf16_train_speedup_pbft"] = t["pbft [fp32]"]["loop_seconds"] / t["pbft [bf16]"]["loop_seconds"]
        out["techniques"]["bf16_eval_speedup"] = out["eval"]["bf16"]["examples_per_s"] / out["eval"]["fp32"]["examples_per_s"]

    print(f"\n{'evaluation':32s} {'ex/s':>7s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for dt, e in out["eval"].items():
        print(f"{'forward, ' + dt:32s} {e['examples_per_s']:7.1f} {e['gflops']:8.0f} {e['fraction_of_peak']:8.0%}")
    print(f"\n{'training (2 epochs x ' + str(args.n) + ' ex, batch 8)':44s} {'ex/s':>6s} {'GFLOP/s':>8s} {'of peak':>8s} {'peak MiB':>9s} {'trainable':>11s}")
    for label, r in t.items():
        print(f"{label:44s} {r['examples_per_s']:6.2f} {r['gflops']:8.0f} {r['fraction_of_peak']:8.0%} {r['peak_memory_mib']:9.0f} {r['trainable_params']:11,d}")
    print("\ntechniques (ratio on/off, one run):")
    pc = out["prefix_cache"]
    print(f"  prefix KV cache, 16-shot ICL ({pc['prefix_tokens']} prefix tokens): {pc['speedup']:.1f}x, max logit diff "
          f"{pc['max_logit_diff']:.1e} ({fast}), {pc['max_logit_diff_fp32']:.1e} (fp32), same predictions: {pc['same_predictions']}")
    tq = out["techniques"]
    print(f"  frozen-block cache, adaptive top-2: {tq['frozen_cache_speedup_per_epoch']:.1f}x per epoch, max epoch-loss diff {tq['frozen_cache_max_loss_diff']:.1e}")
    print(f"  CD (teacher once) / pbft training time: {tq['cd_over_pbft_train_time']:.2f}")
    if "bf16_train_speedup_pbft" in tq:
        print(f"  bf16 autocast: training {tq['bf16_train_speedup_pbft']:.2f}x, evaluation {tq['bf16_eval_speedup']:.2f}x "
              f"(max logit diff {out['eval']['bf16']['max_logit_diff_vs_fp32']:.2f}, predictions changed: "
              f"{out['eval']['bf16']['predictions_changed']}/{args.n})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten to {args.output}")
    return 0


def lm_depth(spec) -> int:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(models.resolve(spec)).num_hidden_layers


if __name__ == "__main__":
    raise SystemExit(main())
