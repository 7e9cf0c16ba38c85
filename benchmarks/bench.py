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
import os
import time
from pathlib import Path

import numpy as np
import torch

from fewtune import record
from fewtune.config import RunConfig
from fewtune.data import load_split
from fewtune.engine import batching, devices, engine, models
from fewtune.methods import RunContext, get_method
from fewtune.tasks import load_task

TOKENS = 64
clock = time.perf_counter  # --clock cpu: the process's CPU time (set in main)


def set_clock(kind: str, threads: int | None) -> None:
    """On a machine shared with other jobs, wall time measures the neighbours as much as the code. `cpu` times the
    benchmark's own CPU seconds instead; with one thread (no threads spinning while they wait for each other) these
    are the work done, so ratios between variants stay stable when the machine is busy."""
    global clock
    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if kind == "cpu" else time.perf_counter


def matmul_peak(dtype, n=2048, seconds=2.0, device=None) -> float:
    """GFLOP/s of an n x n matmul on `device` (the device being measured: on a GPU, dividing its throughput by the
    CPU's peak, as this did before, made every "of peak" figure meaningless)."""
    device = torch.device(device or "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, clock()
    while clock() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n ** 3 * reps / (clock() - t0) / 1e9


def inputs(task, pattern, tokenizer, n):
    """n prompts of exactly TOKENS tokens: CoLA sentences in the pattern, left-trimmed or extended with more text."""
    train = load_split(task, task.train)
    texts = [task.format(pattern, ex) for ex in train[: 4 * n]]
    seqs, filler = [], tokenizer(" ".join(ex.fields["sentence"] for ex in train[:200]), add_special_tokens=False).input_ids
    for ids in batching.encode(tokenizer, texts)[0]:
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
    prefix = batching.encode(tokenizer, [text])[0][0] if shots else []
    dev = load_split(task, task.in_domain)[:n]
    queries = batching.encode(tokenizer, [task.format(pattern, ex) for ex in dev], with_bos=not shots)[0]
    return prefix, queries, models.verbalizer_token_ids(tokenizer, pattern.verbalizer), [ex.label for ex in dev]


def ft_batches(tokenizer, n):
    """The demo's full fine-tuning inputs: n raw MNLI pairs as `ft` gives them (premise, newline, hypothesis;
    no pattern; ~15-70 tokens) with their labels."""
    task = load_task("mnli")
    train = load_split(task, task.train)[:n]
    seqs = batching.encode(tokenizer, [task.raw_separator.join(ex.fields[f] for f in task.fields) for ex in train])[0]
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
    ctx = RunContext(cfg, task, pattern, tokenizer, label_ids, examples, device, dtype, lr=1e-5, max_positions=models.max_positions(model))
    model = method.prepare(ctx, model)
    if method_name == "cd":  # the teacher needs real examples for its context
        train = load_split(task, task.train)
        ctx.train_examples = [train[i] for i in range(len(seqs))]
    with record.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        items = method.train_items(ctx, model, seqs, ctx.train_examples if method_name == "cd" else examples)
        settings = engine.TrainSettings(epochs=epochs, batch_size=batch, lr=1e-5, warmup_ratio=0.0, seed=0, dtype=dtype)
        tr = engine.train(model, items, method.loss(ctx), settings, device, method.param_groups(ctx, model),
                          pad_id=tokenizer.pad_token_id, progress=False, pack=method.packs(ctx))
        total = time.perf_counter() - t0
        method.after_train(ctx)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": total, "loop_seconds": tr.seconds, "examples_per_s": len(seqs) * epochs / total,
            "per_epoch_seconds": tr.seconds / epochs, "peak_memory_mib": mem.mib, "trainable_params": trainable,
            "epoch_losses": tr.epoch_losses, "info": {k: v for k, v in ctx.info.items() if k in ("frozen_cache", "teacher_examples")}}


# ----------------------------------------------------------------------------- ICL on MNLI: 0/16/32 shots
def icl_flops(cfg, n_ne, prefix_len, query_lens):
    """(forward FLOPs of the queries after a prefix, FLOPs of the prefix once): weights 2 x params x tokens, the
    LM head for one position, attention 4 x layers x heads x head_dim per (query, key) pair."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    att = 4 * L * H * dh
    q = sum(2 * n_ne * t + 2 * cfg.hidden_size * cfg.vocab_size + att * (prefix_len * t + t * (t + 1) / 2) for t in query_lens)
    return q, 2 * n_ne * prefix_len + att * prefix_len * (prefix_len + 1) / 2


class _ReusedPrefixCaches:
    """Within the benchmark, engine.score reuses the KV cache of a prefix it has already computed (one per model,
    prefix and dtype), so that short interleaved calls time the per-example cost; the one-off cost of computing
    the cache is timed separately. engine.score itself computes the cache once per call."""

    def __init__(self):
        self.real, self.memo = engine.PrefixCache, {}

    def __call__(self, model, prefix_ids, device, dtype):
        key = (id(model), tuple(prefix_ids), dtype)
        if key not in self.memo:
            self.memo[key] = self.real(model, prefix_ids, device, dtype)
        return self.memo[key]

    def __enter__(self):
        engine.PrefixCache = self
        return self

    def __exit__(self, *exc):
        engine.PrefixCache = self.real


def interleaved(variants, chunks, reps, run):
    """Time every variant on every chunk, round-robin (the order rotated each round), so that a machine whose
    speed drifts (other jobs) slows all variants alike. Returns {variant: [seconds per round]} and the last outputs."""
    secs, outs = {v: [] for v in variants}, {v: [] for v in variants}
    r = 0
    for rep in range(reps):
        for chunk in chunks:
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                t0 = clock()
                o = run(v, chunk)
                secs[v].append(clock() - t0)
                if rep == reps - 1:
                    outs[v].append(o)
            r += 1
    return secs, outs


def icl_bench(lm, tokenizer, device, dtypes, shots_list, n, reps, peaks, check_n):
    """k-shot ICL scoring of n MNLI dev_matched examples (batch 16) by path, interleaved batch by batch.

    Per-example cost relative to zero-shot: the median over batches of (k-shot time / zero-shot time) on the same
    16 queries; the prefix's one-off KV cache is timed apart (`prefix_seconds`) and, in `cost_with_prefix`, spread
    over the n examples."""
    n_ne = nonembedding_params(lm)
    inputs = {k: mnli_icl_inputs(tokenizer, k, n) for k in shots_list}
    chunks = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
    out = {"n": n, "reps": reps, "batch_size": 16, "prefix_tokens": {k: len(inputs[k][0]) for k in shots_list},
           "method": "interleaved batch by batch; median of per-batch ratios"}
    for dt in dtypes:
        # the second dtype (fp32 after bf16) up to 32 demonstrations: its plain prefix cache at 128 alone takes minutes
        shots_dt = shots_list if dt == dtypes[0] else [k for k in shots_list if k <= 32]
        variants = [(0, "none")] + [(k, v) for k in shots_dt if k for v in ("shared-prefix", "prefix-cache")]
        names = [f"{k}-shot {v}" for k, v in variants]
        with _ReusedPrefixCaches():
            prefix_seconds = {}
            for k in shots_dt[1:]:
                for _ in range(2):  # one-off cost, taken twice (the second without first-call effects)
                    t0 = clock()
                    engine.PrefixCache.real(lm, inputs[k][0], device, dt)
                    prefix_seconds[k] = clock() - t0

            def run(name, chunk):
                k, v = variants[names.index(name)]
                prefix, queries, label_ids, _ = inputs[k]
                o = engine.score(lm, tokenizer, [queries[i] for i in chunk], label_ids, device, dt, 16,
                                 prefix_ids=prefix or None, shared_prefix=v == "shared-prefix")
                assert v == "none" or o.path == v, (o.path, v)
                return o.logits

            interleaved(names, chunks[:1], 1, run)  # warm-up: every path's first call
            secs, outs = interleaved(names, chunks, reps, run)
        z = np.array(secs["0-shot none"])
        res = {}
        for (k, v), name in zip(variants, names):
            t = np.array(secs[name])
            qf, pf = icl_flops(lm.config, n_ne, len(inputs[k][0]), [len(q) for q in inputs[k][1]])
            total = float(t.sum()) / reps
            gf = qf / total / 1e9
            res[name] = {"seconds_per_batch": t.tolist(), "examples_per_s": n / total,
                         "cost_vs_zero_shot": float(np.median(t / z)),
                         "cost_vs_zero_shot_total": total / (float(z.sum()) / reps),
                         "gflops": gf, "fraction_of_peak": gf / peaks[dt]}
            if k:
                res[name]["prefix_seconds"] = prefix_seconds[k]
                res[name]["cost_with_prefix"] = (total + prefix_seconds[k]) / (float(z.sum()) / reps)
        for k in shots_dt[1:]:
            a, b = np.concatenate(outs[f"{k}-shot shared-prefix"]), np.concatenate(outs[f"{k}-shot prefix-cache"])
            e = res[f"{k}-shot shared-prefix"]
            e["speedup_vs_prefix_cache"] = float(np.median(np.array(secs[f"{k}-shot prefix-cache"]) / np.array(secs[f"{k}-shot shared-prefix"])))
            e["max_logit_diff_vs_prefix_cache"] = float(np.abs(a - b).max())
            e["predictions_changed_vs_prefix_cache"] = int((a.argmax(-1) != b.argmax(-1)).sum())
        out[dt] = res
    # the reference: the uncached full prompt, in fp32, on the first examples of every prompt (2 of them past
    # 2,000 prefix tokens: the full prompt's cost grows with the square of its length); and how far the fast
    # dtype's shared-prefix scores are from it
    out["fp32_check"] = []
    fast = dtypes[0]
    for k in shots_list[1:]:
        prefix, queries, label_ids, _ = inputs[k]
        m = check_n if len(prefix) <= 2000 else 2
        ref = {}
        for name, dt, kw in [("shared-prefix", "fp32", {}), ("prefix-cache", "fp32", {"shared_prefix": False}),
                             ("full-prompt", "fp32", {"reuse_prefix": False}), (f"shared-prefix {fast}", fast, {})]:
            ref[name] = engine.score(lm, tokenizer, queries[:m], label_ids, device, dt, 16, prefix_ids=prefix, **kw).logits
        names = ["shared-prefix", "prefix-cache"] + ([f"shared-prefix {fast}"] if fast != "fp32" else [])
        out["fp32_check"].append({"shots": k, "n": m, **{
            f"{name}_vs_full_prompt": {"max_logit_diff": float(np.abs(ref[name] - ref["full-prompt"]).max()),
                                       "same_predictions": bool((ref[name].argmax(-1) == ref["full-prompt"].argmax(-1)).all())}
            for name in names}})
    return out


# ----------------------------------------------------------------------------- full FT: fewtune vs HF Trainer
class _EpochOrder(torch.utils.data.Sampler):
    """The order engine.train uses: one torch.randperm per epoch from a generator seeded with the run's seed."""

    def __init__(self, n, seed):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self):
        return self.n


def ft_vs_trainer(spec, tokenizer, device, dtype, n, epochs, reps, batch=8):
    """The same full fine-tuning (fresh model, same init, same examples in the same order, batch 8, lr 1e-5,
    no warmup, linear decay, fused AdamW, clip 1.0, same precision) by engine.train and by a plain
    `transformers.Trainer`, alternating, in this process. Returns times, their ratio and both per-epoch losses."""
    import tempfile

    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

    items = ft_batches(tokenizer, n)
    task = load_task("mnli")
    cfg = RunConfig(task="mnli", method="ft", model=spec, shots=n)
    method = get_method("ft", {})
    ctx = RunContext(cfg, task, task.patterns[0], tokenizer, None, [], device, dtype)

    def fresh():
        torch.manual_seed(0)
        m = models.load_model(spec, "head", 2)
        models.set_pad_token(m, tokenizer)
        return m.to(device)

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return _EpochOrder(len(self.train_dataset), 0)

    def run_fewtune():
        model = fresh()
        settings = engine.TrainSettings(epochs=epochs, batch_size=batch, lr=1e-5, warmup_ratio=0.0, seed=0, dtype=dtype)
        t0 = clock()
        tr = engine.train(model, items, method.loss(ctx), settings, device, pad_id=tokenizer.pad_token_id, progress=False)
        return clock() - t0, tr.epoch_losses

    def run_trainer():
        model = fresh()
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, num_train_epochs=epochs,
                                     learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                                     max_grad_norm=1.0, bf16=dtype == "bf16", use_cpu=device.type == "cpu",
                                     logging_strategy="epoch", save_strategy="no", report_to=[], disable_tqdm=True,
                                     dataloader_num_workers=0, seed=0)
            data = [{"input_ids": it["ids"], "labels": it["label"]} for it in items]
            trainer = SameOrderTrainer(model=model, args=args, train_dataset=data,
                                       data_collator=DataCollatorWithPadding(tokenizer))
            trainer.remove_callback(PrinterCallback)
            t0 = clock()
            trainer.train()
            seconds = clock() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return seconds, losses, str(getattr(args.optim, "value", args.optim))

    out = {"n": n, "epochs": epochs, "batch_size": batch, "dtype": dtype, "fewtune_seconds": [], "trainer_seconds": []}
    for _ in range(reps):
        s, out["fewtune_epoch_losses"] = run_fewtune()
        out["fewtune_seconds"].append(s)
        s, out["trainer_epoch_losses"], out["trainer_optim"] = run_trainer()
        out["trainer_seconds"].append(s)
    ratios = np.array(out["trainer_seconds"]) / np.array(out["fewtune_seconds"])
    out["trainer_over_fewtune"] = float(np.median(ratios))
    out["final_loss_diff"] = abs(out["fewtune_epoch_losses"][-1] - out["trainer_epoch_losses"][-1])
    out["same_final_loss_within_0.02"] = bool(out["final_loss_diff"] <= 0.02)
    return out


# ----------------------------------------------------------------------------- the CD teacher's pass
def cd_teacher_bench(lm, tokenizer, device, dtype, n, context_shots, reps):
    """The CD teacher's one pass over n MNLI training examples with a few-shot context (what cd.train_items runs),
    by path: shared-prefix attention, the plain prefix KV cache, the full prompt."""
    from fewtune.methods.cd import ContextDistillation
    task = load_task("mnli")
    pattern = task.patterns[0]
    train = load_split(task, task.train)[:max(n, 2 * context_shots) + 200]
    method = ContextDistillation({"context": "few-shot", "context_shots": context_shots})
    cfg = RunConfig(task="mnli", method="cd", model="smollm2-135m", shots=n)
    ctx = RunContext(cfg, task, pattern, tokenizer, None, train[200:200 + max(n, 2 * context_shots)], device, dtype)
    prefix = batching.encode(tokenizer, [method.teacher_context(ctx)])[0][0]
    queries = batching.encode(tokenizer, [task.format(pattern, ex) for ex in train[:n]], with_bos=False)[0]
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer)
    out = {"n": n, "context_shots": context_shots, "prefix_tokens": len(prefix), "dtype": dtype}
    paths = {"shared-prefix": {}, "prefix-cache": {"shared_prefix": False}, "full-prompt": {"reuse_prefix": False}}
    chunks = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
    with _ReusedPrefixCaches():  # the teacher computes its context's cache once; timed apart, as for ICL
        t0 = clock()
        engine.PrefixCache(lm, prefix, device, dtype)
        out["prefix_seconds"] = clock() - t0

        def run(name, chunk):
            return engine.score(lm, tokenizer, [queries[i] for i in chunk], label_ids, device, dtype, 16,
                                prefix_ids=prefix, **paths[name]).logits

        interleaved(list(paths), chunks[:1], 1, run)  # warm-up
        secs, outs = interleaved(list(paths), chunks, reps, run)
    logits = {k: np.concatenate(v) for k, v in outs.items()}
    out["seconds_per_batch"] = secs
    out["seconds"] = {k: float(np.sum(v)) / reps for k, v in secs.items()}
    out["shared_speedup_vs_prefix_cache"] = float(np.median(np.array(secs["prefix-cache"]) / np.array(secs["shared-prefix"])))
    out["shared_speedup_vs_full_prompt"] = float(np.median(np.array(secs["full-prompt"]) / np.array(secs["shared-prefix"])))
    out["max_logit_diff_vs_full_prompt"] = float(np.abs(logits["shared-prefix"] - logits["full-prompt"]).max())
    out["predictions_changed_vs_full_prompt"] = int((logits["shared-prefix"].argmax(-1) != logits["full-prompt"].argmax(-1)).sum())
    return out


def scoring_batches_bench(lm, tokenizer, device, dtype, n, reps):
    """Scoring throughput by batch shape: 16 rows (fewtune's CPU default), 64 and 256 rows, and token budgets of
    4,096 and 16,384 padded tokens (the CUDA default), on n MNLI dev_matched + HANS queries (zero-shot prompts,
    11-126 tokens), interleaved chunk by chunk; the predictions must not change. Says whether this device gains from
    batches sized by tokens (GPUs do; on CPUs check here: AMX may, AVX2/AVX-512 gained little past 16 rows)."""
    task = load_task("mnli")
    pattern = task.patterns[0]
    examples = load_split(task, "dev_matched")[: n // 2] + load_split(task, "hans")[: n - n // 2]
    seqs = batching.encode(tokenizer, [task.format(pattern, ex) for ex in examples])[0]
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer)
    shapes = {"16 rows": (16, None), "64 rows": (64, None), "256 rows": (256, None),
              "4,096 tokens": (16, 4096), "16,384 tokens": (16, batching.CUDA_TOKEN_BUDGET)}
    engine.score(lm, tokenizer, seqs[:16], label_ids, device, dtype, 16)  # warm-up
    seconds = {k: 0.0 for k in shapes}
    logits = {}
    for rep in range(reps):
        for k in (shapes if rep % 2 == 0 else reversed(list(shapes))):
            rows, budget = shapes[k]
            r = engine.score(lm, tokenizer, seqs, label_ids, device, dtype, rows, token_budget=budget)
            seconds[k] += r.seconds
            logits[k] = r.logits
    base = seconds["16 rows"]
    return {"n": len(seqs), "dtype": dtype, "reps": reps, "tokens": sum(map(len, seqs)),
            "examples_per_s": {k: reps * len(seqs) / t for k, t in seconds.items()},
            "speedup_vs_16_rows": {k: base / t for k, t in seconds.items()},
            "same_predictions": {k: bool((v.argmax(-1) == logits["16 rows"].argmax(-1)).all()) for k, v in logits.items()},
            "max_logit_diff": {k: float(np.abs(v - logits["16 rows"]).max()) for k, v in logits.items()}}


def print_scoring(r):
    print(f"\nscoring batches ({r['n']} MNLI dev + HANS queries, {r['dtype']}, {r['reps']} interleaved reps):")
    for k, v in r["examples_per_s"].items():
        print(f"  {k:15s} {v:8.1f} ex/s  {r['speedup_vs_16_rows'][k]:.2f}x 16 rows  same predictions: "
              f"{r['same_predictions'][k]}  max logit diff {r['max_logit_diff'][k]:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=32, help="examples per measurement")
    p.add_argument("--output", default="results/bench.json")
    p.add_argument("--quick", action="store_true",
                   help="only the peer comparisons (ICL 0/16/32-shot, full FT vs Trainer, CD teacher), small sizes, "
                        "one repetition: a few minutes on 2 busy cores")
    p.add_argument("--icl-n", type=int, default=None, help="MNLI examples per ICL measurement (default 96; quick 48)")
    p.add_argument("--icl-shots", default=None,
                   help="comma-separated demonstration counts (default 0,16,32,128; quick 0,16,32; 0 is always added)")
    p.add_argument("--scoring-n", type=int, default=None,
                   help="MNLI dev + HANS queries per scoring-batch measurement (default 192; quick 48)")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions of each comparison (default 2; quick 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time the comparisons by wall clock or by this process's CPU time (for a shared machine; use with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--only", choices=["icl", "cd", "ft", "scoring", "grid"], default=None,
                   help="run only this comparison (implies --quick's scope)")
    p.add_argument("--grid-workers", type=int, default=2,
                   help="grid throughput: also warm workers x N (0: skip the grid throughput) [2]")
    args = p.parse_args(argv)
    set_clock(args.clock, args.threads)
    device = devices.pick_device("auto")
    fast = devices.resolve_dtype("auto", device)
    task = load_task("cola")
    pattern = task.patterns[0]
    tokenizer = models.load_tokenizer(args.model)
    seqs, labels = inputs(task, pattern, tokenizer, args.n)
    reps = args.reps or (1 if args.quick else 2)
    out = {"machine": record.machine(), "versions": record.versions(), "tokens_per_example": TOKENS, "n": args.n,
           "quick": args.quick, "reps": reps, "clock": args.clock, "threads": torch.get_num_threads(),
           "load_average_at_start": os.getloadavg()}

    out["matmul_peak_gflops"] = {"fp32": matmul_peak(torch.float32, device=device),
                                 "bf16": matmul_peak(torch.bfloat16, device=device)}
    out["matmul_peak_device"] = str(device)
    peaks = out["matmul_peak_gflops"]
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    lm = models.load_model(args.model, "lm")
    models.set_pad_token(lm, tokenizer)
    lm.to(device)

    # --- peers and shared-prefix attention (alternating, one run)
    icl_n = args.icl_n or (48 if args.quick else 96)
    dtypes = [fast] if args.quick or fast == "fp32" else [fast, "fp32"]
    if args.only in (None, "icl"):
        shots = sorted({0, *icl_shots(args.icl_shots or ("0,16,32" if args.quick else "0,16,32,128"))})
        out["icl_mnli"] = icl_bench(lm, tokenizer, device, dtypes, shots, icl_n, reps, peaks, 8 if args.quick else 16)
        print_icl(out["icl_mnli"], dtypes)
    if args.only in (None, "cd"):
        out["cd_teacher"] = cd_teacher_bench(lm, tokenizer, device, fast, 32 if args.quick else 64, 16, reps)
        print_cd(out["cd_teacher"])
    if args.only in (None, "ft"):
        out["ft_vs_trainer"] = {dt: ft_vs_trainer(args.model, tokenizer, device, dt, 16 if args.quick else 64,
                                                  2 if args.quick else 3, reps) for dt in dtypes}
        print_trainer(out["ft_vs_trainer"])
    if args.only in (None, "scoring"):
        n = args.scoring_n or (48 if args.quick else 192)
        out["scoring_batches"] = scoring_batches_bench(lm, tokenizer, device, fast, n, reps)
        print_scoring(out["scoring_batches"])
    if args.only in (None, "grid") and args.grid_workers:
        # cells/hour of a fixed mini-grid (every method, 1 seed, tiny sizes): fresh processes vs warm workers, and
        # warm workers x N sharing the cores; the cells run in child processes while this one waits
        from grid_throughput import measure
        print("\ngrid throughput (mini-grid: every method, 1 seed, tiny sizes; fresh processes vs warm workers):")
        out["grid_throughput"] = measure(mini=True, reps=1 if args.quick else 2, workers=args.grid_workers)
    out["load_average_at_end"] = os.getloadavg()
    check_peak(out)
    if args.quick or args.only:
        return write(out, args.output)
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
    prefix = batching.encode(tokenizer, [demos])[0][0]
    queries = batching.encode(tokenizer, [task.format(pattern, ex) for ex in train[: args.n]], with_bos=False)[0]
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
    return write(out, args.output)


def check_peak(out) -> None:
    """The "of peak" fractions divide by the matmul peak measured at the start; measured again here, a change of
    more than 25 % (a neighbour took or left a core) is said, and both are kept in the JSON."""
    on = {"device": out["matmul_peak_device"]} if out.get("matmul_peak_device", "cpu") != "cpu" else {}
    end = {"fp32": matmul_peak(torch.float32, seconds=1.0, **on), "bf16": matmul_peak(torch.bfloat16, seconds=1.0, **on)}
    out["matmul_peak_gflops_at_end"] = end
    start = out["matmul_peak_gflops"]
    moved = [k for k in end if abs(end[k] / start[k] - 1) > 0.25]
    if moved:
        print(f"note: the matmul peak moved during the run ({', '.join(f'{k} {start[k]:.0f} -> {end[k]:.0f}' for k in moved)} "
              "GFLOP/s): the 'of peak' columns are relative to the first; compare ratios, or use --clock cpu --threads 1")


def icl_shots(text: str) -> list[int]:
    try:
        shots = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--icl-shots: expected comma-separated whole numbers, got {text!r}")
    if any(k < 0 for k in shots):
        raise SystemExit(f"--icl-shots: demonstration counts cannot be negative: {text!r}")
    return shots


def write(out, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten to {path}")
    return 0


def print_icl(r, dtypes):
    print(f"\nICL on MNLI dev_matched, {r['n']} examples, batch 16, prefix tokens {r['prefix_tokens']}, {r['reps']} rep(s), "
          "interleaved batch by batch; cost per example relative to zero-shot (median of per-batch ratios; "
          "with the prefix's one-off cache spread over the n examples)")
    print(f"{'':30s} {'ex/s':>7s} {'cost':>6s} {'w/ pref':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for dt in dtypes:
        for name, e in r[dt].items():  # (r[dt] holds only the shot counts measured in that dtype)
            extra = f"  {e['speedup_vs_prefix_cache']:.2f}x vs prefix cache" if "speedup_vs_prefix_cache" in e else ""
            print(f"{name + ', ' + dt:30s} {e['examples_per_s']:7.1f} {e['cost_vs_zero_shot']:6.2f} "
                  f"{e.get('cost_with_prefix', 1.0):8.2f} {e['gflops']:8.0f} {e['fraction_of_peak']:8.0%}{extra}")
    for c in r["fp32_check"]:
        for key, d in c.items():
            if key.endswith("_vs_full_prompt"):
                name = key[: -len("_vs_full_prompt")]
                print(f"  {c['shots']}-shot, {c['n']} examples: {name if ' ' in name else name + ' fp32'} vs the fp32 full prompt: "
                      f"max logit diff {d['max_logit_diff']:.1e}, same predictions: {d['same_predictions']}")


def print_cd(r):
    print(f"\nCD teacher pass ({r['n']} examples, {r['context_shots']}-shot context of {r['prefix_tokens']} tokens, {r['dtype']}, "
          f"context cache {r['prefix_seconds']:.2f} s once): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
          + f"; shared-prefix {r['shared_speedup_vs_prefix_cache']:.2f}x vs prefix cache, {r['shared_speedup_vs_full_prompt']:.2f}x vs full prompt; "
          f"max logit diff vs full prompt {r['max_logit_diff_vs_full_prompt']:.1e}, predictions changed {r['predictions_changed_vs_full_prompt']}")


def print_trainer(rs):
    for dt, r in rs.items():
        print(f"\nfull FT ({r['n']} MNLI pairs x {r['epochs']} epochs, batch {r['batch_size']}, {dt}): fewtune "
              f"{', '.join(f'{x:.1f}' for x in r['fewtune_seconds'])} s, HF Trainer ({r['trainer_optim']}) "
              f"{', '.join(f'{x:.1f}' for x in r['trainer_seconds'])} s: Trainer/fewtune {r['trainer_over_fewtune']:.2f}x; "
              f"final epoch loss {r['fewtune_epoch_losses'][-1]:.4f} vs {r['trainer_epoch_losses'][-1]:.4f}")


def lm_depth(spec) -> int:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(models.resolve(spec)).num_hidden_layers


if __name__ == "__main__":
    raise SystemExit(main())
