"""One run, end to end: data -> sample -> model -> method -> train -> score -> result record."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import __version__, record, retention
from .config import RunConfig
from .data import eval_subsample, exclude_training, label_counts, load_split, sample_train, shares_training_data
from .engine import batching, devices, engine, models
from .errors import FewtuneError
from .hyperparameters import for_run as hyperparameters
from .hyperparameters import preset_values
from .methods import RunContext, get_method
from .stats import metrics
from .stats.fmt import brief, summary_line  # noqa: F401  (the console lines: `fewtune run` and the grid)
from .tasks import load_task
from .util import digest, now

# The result record's format (result["schema"]); the results database has its own, store.SCHEMA_VERSION.
RESULT_SCHEMA_VERSION = 2  # 2: identity, data provenance, per-example predictions, calibration, baselines


@dataclass
class Sample:
    """The data of one run: the few-shot sample (the same for every method under the same seed) and the
    evaluation sets, each without the sample's examples where it shares their data (`excluded`: how many left)."""
    train: list
    eval_sets: dict
    excluded: dict
    population: dict  # split -> its size before `eval_limit`: advice never asks for more examples than it holds


def run(cfg: RunConfig, progress: bool = True, save_model: str | None = None) -> dict:
    """Run one configuration and return its result record (see docs/results.md)."""
    started = now()
    t_start = time.perf_counter()
    task = load_task(cfg.task)
    pattern = task.pattern(cfg.pattern)
    method = get_method(cfg.method, cfg.method_options)
    hp = hyperparameters(cfg, method)  # as the run records it (Method.budget)
    device = devices.pick_device(cfg.device)
    dtype = devices.resolve_dtype(cfg.dtype, device)
    train_seed = cfg.train_seed if cfg.train_seed is not None else cfg.seed

    sample = load_sample(cfg, task, method)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    ctx = make_context(cfg, task, pattern, method, tokenizer, sample, device, dtype, hp)
    retained = retention_probe(cfg, method, sample, tokenizer, device, dtype)
    model, mem_load = load_and_prepare_model(cfg, task, method, ctx, tokenizer, retained, train_seed)
    total_params = sum(p.numel() for p in model.parameters())
    result = result_header(cfg, task, pattern, method, sample, hp, train_seed, device, dtype)

    cost = {"load_seconds": None, "train_seconds": 0.0, "eval_seconds": 0.0, "train_peak_memory_mib": None,
            "eval_peak_memory_mib": None, "trainable_params": 0, "total_params": total_params,
            "train_tokens": 0, "eval_tokens": 0, "train_examples_per_s": None, "eval_examples_per_s": None}
    cost["load_seconds"] = round(time.perf_counter() - t_start - (retained.seconds if retained else 0.0), 2)
    training = train_model(cfg, method, ctx, model, hp, train_seed, cost, progress) if method.trains else None
    method.fit_eval_prefix(ctx, sample.eval_sets)
    prefix_text = method.eval_prefix(ctx)
    prefix_ids = batching.encode(tokenizer, [prefix_text])[0][0] if prefix_text else None
    evals, predictions, mem = evaluate(cfg, task, method, ctx, model, sample, prefix_ids, prefix_text, cost)
    # labelled examples the run used: icl may have dropped demonstrations to fit the context (the
    # "labelled examples" budget and the report use this, not the asked-for shots)
    result["examples_used"] = method.examples_used(ctx)
    cost["peak_memory_mib"] = max(x for x in (mem_load.mib, cost["train_peak_memory_mib"], mem.mib) if x is not None)
    if retained is not None:
        result["retention"] = retained.after(model, unchanged=not method.trains)
        cost["retention_seconds"] = result["retention"]["seconds"]
    result.update(evals=evals, predictions=predictions, cost=cost, training=training, method_info=dict(ctx.info),
                  versions=record.versions(), git=record.git_commit(), machine=record.machine(),
                  started_at=started, finished_at=now(), wall_seconds=round(time.perf_counter() - t_start, 2))
    if save_model:
        from .saving import save
        save(save_model, model, tokenizer, cfg, task, pattern, method, result, prefix=prefix_text)
        result["saved_model"] = str(save_model)
    return result


def load_sample(cfg: RunConfig, task, method) -> Sample:
    """The seeded few-shot sample and the (stratified, `eval_limit`-capped) evaluation sets. An evaluation on the
    training data leaves the few-shot sample (and so every demonstration) out."""
    eval_limit = cfg.eval_limit if cfg.eval_limit is not None else preset_values(cfg.preset, method).get("eval_limit")
    train_pool = load_split(task, task.train, cfg.data_root, cfg.data_source)
    positions = sample_train(train_pool, cfg.shots, cfg.seed, len(task.labels), cfg.balanced)
    train_examples = [train_pool[p] for p in positions]
    eval_names = cfg.eval_splits or list(task.eval_splits)
    for name in eval_names:
        if name not in task.splits:
            raise FewtuneError(f"Task '{task.name}' has no split '{name}' (splits: {', '.join(task.splits)}).")
    eval_sets, population = {}, {}
    for name in eval_names:
        full = load_split(task, name, cfg.data_root, cfg.data_source)
        population[name] = len(full)
        eval_sets[name] = eval_subsample(full, eval_limit)
    excluded = {}
    for name in eval_names:
        eval_sets[name], n_out = exclude_training(task, name, eval_sets[name], train_examples)
        if shares_training_data(task, name):
            excluded[name] = n_out
    return Sample(train_examples, eval_sets, excluded, population)


def make_context(cfg: RunConfig, task, pattern, method, tokenizer, sample: Sample, device, dtype, hp: dict) -> RunContext:
    """The method's view of the run. The answer slot is checked on real queries (a template ending in a field
    ends differently per example)."""
    prompts = [task.format(pattern, ex) for ex in (sample.train or next(iter(sample.eval_sets.values()), []))[:4]]
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer, cfg.model, prompts) if method.objective == "lm" else None
    return RunContext(config=cfg, task=task, pattern=pattern, tokenizer=tokenizer, label_ids=label_ids,
                      train_examples=sample.train, device=device, dtype=dtype, lr=hp.get("lr"))


def retention_probe(cfg: RunConfig, method, sample: Sample, tokenizer, device, dtype):
    """The retention measurement (LM loss on general text), or None: only methods that keep the LM head; the text
    never holds an example of this run."""
    if method.objective != "lm":
        return None
    seen = retention.example_texts(sample.train) | {t for exs in sample.eval_sets.values() for t in retention.example_texts(exs)}
    picked = retention.sentences(cfg.retention, cfg.data_root, seen)
    if picked is None:
        return None
    return retention.Retention(*picked, tokenizer, device, dtype, cfg.scoring_rows)


def load_and_prepare_model(cfg: RunConfig, task, method, ctx: RunContext, tokenizer, retained, train_seed: int):
    """(the model as the method prepared it, the peak memory of loading). Seeded: the new head's initialisation,
    dropout and LoRA init; retention measures the base model before the method wraps or changes it."""
    torch.manual_seed(train_seed)
    with record.PeakMemory(ctx.device) as mem_load:
        model = models.load_model(cfg.model, method.objective, len(task.labels), cfg.trust_remote_code, cfg.allow_unsafe_weights)
        models.set_pad_token(model, tokenizer)
        model.to(ctx.device)
        ctx.max_positions = models.max_positions(model)
        if retained is not None:
            retained.before(model)
            torch.manual_seed(train_seed)
        model = method.prepare(ctx, model)
    return model, mem_load


def result_header(cfg: RunConfig, task, pattern, method, sample: Sample, hp: dict, train_seed: int, device, dtype) -> dict:
    """What the result says about the run before it computes anything: config, identity, task, data, seeds."""
    identity = cfg.identity()
    return {"schema": RESULT_SCHEMA_VERSION, "fewtune_version": __version__, "config": cfg.to_dict(),
            "config_hash": digest(identity), "identity": identity,
            "task": {"name": task.name, "version": task.version, "source": task.source, "sha256": task.sha256,
                     "primary_metric": task.primary_metric, "metrics": list(task.metrics),
                     "equivalence_margin": task.equivalence_margin,
                     "pattern": pattern.template, "verbalizer": list(pattern.verbalizer), "labels": list(task.labels)},
            "data": identity["data"],
            "seeds": {"data_seed": cfg.seed, "train_seed": train_seed, "eval_subsample_seed": 0},
            # its predictions cannot depend on the seeds (Method.seed_free: zero-shot): the statistics treat it as
            # one constant for every seed, and a grid runs it once
            "seed_free": bool(method.seed_free(cfg)),
            "train_indices": [ex.idx for ex in sample.train], "train_label_counts": label_counts(sample.train),
            "hyperparameters": hp if method.trains else {}, "device": str(device), "dtype": dtype}


def train_model(cfg: RunConfig, method, ctx: RunContext, model, hp: dict, train_seed: int, cost: dict, progress: bool) -> dict:
    """Train the prepared model with the one training loop; fills the training part of `cost`, returns `training`.
    The time counts the method's one-off work too (cd's teacher, adaptive's frozen-block cache)."""
    texts = [method.text(ctx, ex) for ex in ctx.train_examples]
    seqs, truncated = batching.encode(ctx.tokenizer, texts, cfg.max_length)
    t_train = time.perf_counter()
    with record.PeakMemory(ctx.device) as mem:
        items = method.train_items(ctx, model, seqs, ctx.train_examples)
        cost["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tr = method.fit(ctx, model, items, hp, train_seed, progress)  # the one training loop (probe: its solver)
        method.after_train(ctx)
    train_seconds = time.perf_counter() - t_train
    cost.update(train_seconds=round(train_seconds, 3), train_loop_seconds=round(tr.seconds, 3),
                train_peak_memory_mib=mem.mib, train_tokens=tr.tokens,
                train_examples_per_s=round(tr.examples_seen / train_seconds, 3))
    return {"steps": tr.steps, "epochs": hp.get("epochs"), "final_loss": tr.final_loss, "epoch_losses": tr.epoch_losses,
            "train_accuracy": tr.train_accuracy, "truncated_examples": truncated, "packed_batches": tr.packed}


def evaluate(cfg: RunConfig, task, method, ctx: RunContext, model, sample: Sample, prefix_ids, prefix_text, cost: dict):
    """Score every evaluation split: (evals, per-example predictions, the peak memory). Fills the evaluation and
    use parts of `cost`. One rule with or without a prefix: the query is cut to max_length, the prefix was fitted
    to the context (`Method.fit_eval_prefix`); the prefix's KV cache is computed once for all splits."""
    evals, predictions = {}, {}
    eval_seconds = eval_tokens = eval_n = query_tokens = 0
    prefix_store = {}  # icl's demonstrations: their KV cache computed once for all evaluation splits
    token_budget = batching.scoring_token_budget(ctx.device, cfg.eval_batch_size)  # CUDA: batches sized to the device
    max_batch = 0
    with record.PeakMemory(ctx.device) as mem:
        for name, examples in sample.eval_sets.items():
            texts = [method.text(ctx, ex) for ex in examples]
            # one rule with or without demonstrations: the query is cut to max_length, the demonstrations fitted to the context
            seqs, truncated = batching.encode(ctx.tokenizer, texts, cfg.max_length, with_bos=prefix_ids is None)
            out = engine.score(model, ctx.tokenizer, seqs, ctx.label_ids, ctx.device, ctx.dtype, cfg.scoring_rows,
                               prefix_ids=prefix_ids, prefix_store=prefix_store, token_budget=token_budget)
            max_batch = max(max_batch, out.max_batch)
            if prefix_ids:  # shared-prefix attention, the prefix KV cache, or the full prompt (prefix_attention.shared_prefix_path)
                ctx.info["prefix_path"] = out.path
            preds = out.logits.argmax(-1).tolist()
            gold = [ex.label for ex in examples]
            logprobs = torch.log_softmax(torch.as_tensor(out.logits, dtype=torch.float64), -1).numpy()
            m = metrics.evaluation(gold, preds, logprobs, task.labels, task.metrics, [ex.groups for ex in examples])
            role = "in_domain" if name == task.in_domain else ("out_of_domain" if name in task.out_of_domain else "other")
            evals[name] = {"role": role, **m, "population": sample.population[name], "truncated_examples": truncated,
                           "seconds": round(out.seconds, 3)}
            # per example, in the split's data order: what the paired statistics and calibration are computed from
            predictions[name] = {"idx": [ex.idx for ex in examples], "gold": gold, "pred": preds,
                                 "logprobs": logprobs.astype("float32").tolist(),
                                 "groups": [ex.groups for ex in examples] if any(ex.groups for ex in examples) else None}
            if name in sample.excluded:
                evals[name]["excluded_train_examples"] = sample.excluded[name]
            eval_seconds += out.seconds
            eval_tokens += out.tokens
            eval_n += len(examples)
            query_tokens += sum(len(q) for q in seqs)
    # the batch the figures were measured at: the cost of use depends on it (the report compares like with like)
    # (the most rows in one batch: not the config's eval_batch_size, which is what was asked, or None)
    cost.update(eval_max_batch_rows=max_batch, eval_batching=f"tokens:{token_budget}" if token_budget else "rows")
    cost.update(eval_seconds=round(eval_seconds, 3), eval_peak_memory_mib=mem.mib, eval_tokens=eval_tokens,
                eval_examples_per_s=round(eval_n / eval_seconds, 3) if eval_seconds else None)
    cost.update(use_cost(cost, eval_seconds, eval_n, query_tokens, prefix_ids, prefix_text, mem.mib))
    return evals, predictions, mem


def use_cost(cost: dict, eval_seconds: float, eval_n: int, query_tokens: int, prefix_ids, prefix_text, eval_peak_mib) -> dict:
    """What every later prediction costs, as a deployment would run it, measured on the evaluation pass (same
    hardware, precision and batch size): seconds and tokens per 1,000 predictions (icl's demonstrations are computed
    once, their KV cache reused, so they count once per 1,000 and then as context every query attends to), peak
    memory while predicting, and the bytes that must be shipped besides the base model: the trained parameters
    (fp32: 4 bytes each; adapters only for lora, every weight for full fine-tuning) and icl's demonstrations."""
    prefix_tokens = len(prefix_ids) if prefix_ids else 0
    demo_bytes = len(prefix_text.encode("utf-8")) if prefix_text else 0
    return {
        "predict_seconds_per_1k": round(1000 * eval_seconds / eval_n, 3) if eval_n else None,
        "predict_tokens_per_1k": round(1000 * query_tokens / eval_n + prefix_tokens) if eval_n else None,
        "predict_context_tokens": prefix_tokens,   # attended to by every prediction (icl's demonstrations)
        "predict_peak_memory_mib": eval_peak_mib,
        "shipped_bytes": 4 * int(cost.get("trainable_params") or 0) + demo_bytes,
        "shipped_text_bytes": demo_bytes,
    }
