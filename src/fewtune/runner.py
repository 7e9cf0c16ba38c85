"""One run, end to end: data -> sample -> model -> method -> train -> score -> result record."""

from __future__ import annotations

import logging
import time

import torch

from . import __version__, batching, devices, engine, metrics, models, record, retention
from .config import RunConfig
from .data import eval_subsample, exclude_training, label_counts, load_split, sample_train, shares_training_data
from .errors import FewtuneError
from .identity import digest
from .methods import RunContext, get_method
from .methods.icl import fit_demonstrations
from .run_presets import preset_values
from .store import now
from .tasks import load_task

log = logging.getLogger("fewtune")
SCHEMA_VERSION = 2  # 2: identity, data provenance, per-example predictions, calibration, baselines


def hyperparameters(cfg: RunConfig, method) -> dict:
    """Method defaults < preset < fields set in the config."""
    hp = dict(method.defaults)
    student_lora = getattr(method.opts, "student", None) == "lora"
    preset = preset_values(cfg.preset, cfg.method, student_lora, getattr(method, "preset_key", None))
    hp.update({k: v for k, v in preset.items() if k != "eval_limit"})
    for key in ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "micro_batch_size"):
        if getattr(cfg, key) is not None:
            hp[key] = getattr(cfg, key)
    return hp


def run(cfg: RunConfig, progress: bool = True, save_model: str | None = None) -> dict:
    """Run one configuration and return its result record (see docs/results.md)."""
    started = now()
    t_start = time.perf_counter()
    task = load_task(cfg.task)
    pattern = task.pattern(cfg.pattern)
    method = get_method(cfg.method, cfg.method_options)
    hp = hyperparameters(cfg, method)
    eval_limit = cfg.eval_limit if cfg.eval_limit is not None else preset_values(cfg.preset, cfg.method).get("eval_limit")
    device = devices.pick_device(cfg.device)
    dtype = devices.resolve_dtype(cfg.dtype, device)
    train_seed = cfg.train_seed if cfg.train_seed is not None else cfg.seed

    # data: the few-shot sample (same for every method under the same seed) and the evaluation sets
    train_pool = load_split(task, task.train, cfg.data_root, cfg.data_source)
    positions = sample_train(train_pool, cfg.shots, cfg.seed, len(task.labels), cfg.balanced)
    train_examples = [train_pool[p] for p in positions]
    eval_names = cfg.eval_splits or list(task.eval_splits)
    for name in eval_names:
        if name not in task.splits:
            raise FewtuneError(f"Task '{task.name}' has no split '{name}' (splits: {', '.join(task.splits)}).")
    eval_sets = {name: eval_subsample(load_split(task, name, cfg.data_root, cfg.data_source), eval_limit) for name in eval_names}
    excluded = {}  # an evaluation on the training data leaves the few-shot sample (and so every demonstration) out
    for name in eval_names:
        eval_sets[name], n_out = exclude_training(task, name, eval_sets[name], train_examples)
        if shares_training_data(task, name):
            excluded[name] = n_out

    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    # the answer slot is checked on real queries (a template ending in a field ends differently per example)
    prompts = [task.format(pattern, ex) for ex in (train_examples or next(iter(eval_sets.values()), []))[:4]]
    label_ids = models.verbalizer_token_ids(tokenizer, pattern.verbalizer, cfg.model, prompts) if method.objective == "lm" else None
    ctx = RunContext(config=cfg, task=task, pattern=pattern, tokenizer=tokenizer, label_ids=label_ids,
                     train_examples=train_examples, device=device, dtype=dtype, extra={"lr": hp["lr"]})

    # retention: only methods that keep the LM head; the text never holds an example of this run
    retained = None
    if method.objective == "lm":
        seen = retention.example_texts(train_examples) | {t for exs in eval_sets.values() for t in retention.example_texts(exs)}
        picked = retention.sentences(cfg.retention, cfg.data_root, seen)
        if picked is not None:
            retained = retention.Retention(*picked, tokenizer, device, dtype, cfg.eval_batch_size)

    torch.manual_seed(train_seed)  # the new head's initialisation, dropout, LoRA init
    with record.PeakMemory(device) as mem_load:
        model = models.load_model(cfg.model, method.objective, len(task.labels), cfg.trust_remote_code, cfg.allow_unsafe_weights)
        models.set_pad_token(model, tokenizer)
        model.to(device)
        if retained is not None:
            retained.before(model)  # the base model, before the method wraps or changes it
            torch.manual_seed(train_seed)
        model = method.prepare(ctx, model)
    total_params = sum(p.numel() for p in model.parameters())

    identity = cfg.identity()
    result = {"schema": SCHEMA_VERSION, "fewtune_version": __version__, "config": cfg.to_dict(),
              "config_hash": digest(identity), "identity": identity,
              "task": {"name": task.name, "version": task.version, "source": task.source, "sha256": task.sha256,
                       "primary_metric": task.primary_metric, "metrics": list(task.metrics),
                       "pattern": pattern.template, "verbalizer": list(pattern.verbalizer), "labels": list(task.labels)},
              "data": identity["data"],
              "seeds": {"data_seed": cfg.seed, "train_seed": train_seed, "eval_subsample_seed": 0},
              "train_indices": [ex.idx for ex in train_examples], "train_label_counts": label_counts(train_examples),
              "hyperparameters": hp if method.trains else {}, "device": str(device), "dtype": dtype}

    cost = {"load_seconds": None, "train_seconds": 0.0, "eval_seconds": 0.0, "train_peak_memory_mib": None,
            "eval_peak_memory_mib": None, "trainable_params": 0, "total_params": total_params,
            "train_tokens": 0, "eval_tokens": 0, "train_examples_per_s": None, "eval_examples_per_s": None}
    cost["load_seconds"] = round(time.perf_counter() - t_start - (retained.seconds if retained else 0.0), 2)
    training = None
    if method.trains:
        texts = [method.text(ctx, ex) for ex in train_examples]
        seqs, truncated = batching.encode(tokenizer, texts, cfg.max_length)
        t_train = time.perf_counter()  # includes the method's one-off work (CD teacher, frozen-block cache)
        with record.PeakMemory(device) as mem:
            items = method.train_items(ctx, model, seqs, train_examples)
            settings = engine.TrainSettings(epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                                            weight_decay=hp["weight_decay"], warmup_ratio=hp["warmup_ratio"],
                                            micro_batch_size=hp.get("micro_batch_size"), max_grad_norm=cfg.max_grad_norm,
                                            seed=train_seed, dtype=dtype)
            cost["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tr = engine.train(model, items, method.loss(ctx), settings, device, method.param_groups(ctx, model),
                              pad_id=tokenizer.pad_token_id, progress=progress, pack=method.packs(ctx))
            method.after_train(ctx)
        train_seconds = time.perf_counter() - t_train
        cost.update(train_seconds=round(train_seconds, 3), train_loop_seconds=round(tr.seconds, 3),
                    train_peak_memory_mib=mem.mib, train_tokens=tr.tokens,
                    train_examples_per_s=round(tr.examples_seen / train_seconds, 3))
        training = {"steps": tr.steps, "epochs": hp["epochs"], "final_loss": tr.final_loss, "epoch_losses": tr.epoch_losses,
                    "train_accuracy": tr.train_accuracy, "truncated_examples": truncated, "packed_batches": tr.packed}

    # evaluation
    if cfg.method == "icl" and train_examples:
        longest = max(len(s) for ex_list in eval_sets.values()
                      for s in batching.encode(tokenizer, [method.text(ctx, ex) for ex in ex_list], cfg.max_length, with_bos=False)[0])
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        fit_demonstrations(method, ctx, longest, limit)
        if ctx.extra["demonstrations_used"] == 0:
            log.warning("No demonstration fits the model's context of %d tokens: scoring zero-shot.", limit)
    prefix_text = method.eval_prefix(ctx)
    prefix_ids = batching.encode(tokenizer, [prefix_text])[0][0] if prefix_text else None
    evals, predictions = {}, {}
    eval_seconds = eval_tokens = eval_n = query_tokens = 0
    prefix_store = {}  # icl's demonstrations: their KV cache computed once for all evaluation splits
    with record.PeakMemory(device) as mem:
        for name, examples in eval_sets.items():
            texts = [method.text(ctx, ex) for ex in examples]
            # one rule with or without demonstrations: the query is cut to max_length, the demonstrations fitted to the context
            seqs, truncated = batching.encode(tokenizer, texts, cfg.max_length, with_bos=prefix_ids is None)
            out = engine.score(model, tokenizer, seqs, label_ids, device, dtype, cfg.eval_batch_size, prefix_ids=prefix_ids,
                               prefix_store=prefix_store)
            if prefix_ids:  # shared-prefix attention, the prefix KV cache, or the full prompt (prefix_attention.shared_prefix_path)
                ctx.extra["prefix_path"] = out.path
            preds = out.logits.argmax(-1).tolist()
            gold = [ex.label for ex in examples]
            logprobs = torch.log_softmax(torch.as_tensor(out.logits, dtype=torch.float64), -1).numpy()
            m = metrics.evaluation(gold, preds, logprobs, task.labels, task.metrics, [ex.groups for ex in examples])
            role = "in_domain" if name == task.in_domain else ("out_of_domain" if name in task.out_of_domain else "other")
            evals[name] = {"role": role, **m, "truncated_examples": truncated, "seconds": round(out.seconds, 3)}
            # per example, in the split's data order: what the paired statistics and calibration are computed from
            predictions[name] = {"idx": [ex.idx for ex in examples], "gold": gold, "pred": preds,
                                 "logprobs": logprobs.astype("float32").tolist(),
                                 "groups": [ex.groups for ex in examples] if any(ex.groups for ex in examples) else None}
            if name in excluded:
                evals[name]["excluded_train_examples"] = excluded[name]
            eval_seconds += out.seconds
            eval_tokens += out.tokens
            eval_n += len(examples)
            query_tokens += sum(len(q) for q in seqs)
    cost.update(eval_seconds=round(eval_seconds, 3), eval_peak_memory_mib=mem.mib, eval_tokens=eval_tokens,
                eval_examples_per_s=round(eval_n / eval_seconds, 3) if eval_seconds else None)
    # labelled examples the run used: icl may have dropped demonstrations to fit the context (the
    # "labelled examples" budget and the report use this, not the asked-for shots)
    result["examples_used"] = ctx.extra.get("demonstrations_used", len(train_examples)) if not method.trains else len(train_examples)
    cost.update(use_cost(cost, eval_seconds, eval_n, query_tokens, prefix_ids, prefix_text, mem.mib))
    cost["peak_memory_mib"] = max(x for x in (mem_load.mib, cost["train_peak_memory_mib"], mem.mib) if x is not None)
    if retained is not None:
        result["retention"] = retained.after(model, unchanged=not method.trains)
        cost["retention_seconds"] = result["retention"]["seconds"]
    result.update(evals=evals, predictions=predictions, cost=cost, training=training,
                  method_info={k: v for k, v in ctx.extra.items() if k not in ("demonstrations", "lr")},
                  versions=record.versions(), git=record.git_commit(), machine=record.machine(),
                  started_at=started, finished_at=now(), wall_seconds=round(time.perf_counter() - t_start, 2))
    if save_model:
        from .saving import save
        save(save_model, model, tokenizer, cfg, task, pattern, method, result, prefix=prefix_text)
        result["saved_model"] = str(save_model)
    return result


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


def summary_line(result: dict) -> str:
    parts = []
    short = {"accuracy": "acc", "mcc": "mcc", "macro_f1": "macro-F1"}
    for name, e in result["evals"].items():
        # every metric the task lists, in its order (an eval holds exactly those; see metrics.compute)
        shown = " ".join(f"{short[k]} {v:.3f}" for k, v in e.items() if k in short)
        parts.append(f"{name}: {shown} (n={e['n']})")
    c = result["cost"]
    return (f"{result['config']['method']} on {result['config']['task']}, {result['config']['shots']} shots, seed "
            f"{result['config']['seed']}: " + "; ".join(parts) +
            f" | train {c['train_seconds']:.1f}s eval {c['eval_seconds']:.1f}s peak {c['peak_memory_mib']:.0f} MiB")

