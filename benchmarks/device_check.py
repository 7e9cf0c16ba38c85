"""What this device does with the bundled model's shape, in one command of a few minutes (< 8 on a GPU).

Run:  python benchmarks/device_check.py --out results/device_check         # on a GPU: the bundled shape
      python benchmarks/device_check.py --tiny --out /tmp/dc                # on CPU: a tiny model (the tests run this)

No weights travel: the model is built on the spot from the bundled model's config with random weights (seed 0), so
its shapes and FLOPs are SmolLM2-135M's and its predictions meaningless (../shared/gpu/README.md). `--config-dir`
names a folder with config.json and the tokenizer (default: the converted bundled model in fewtune's cache).
It prints and writes (device_check.json under --out):
- the device, the matmul peak (fp32, bf16) measured on it;
- fewtune's scoring (engine.score) at 16 rows a batch and by the CUDA token budget: examples/s, fraction of peak;
- a full-FT training step (engine.train) at batch 8 and 32: ms/step;
- the time to build a model and copy it (what a warm worker pays per cell instead of a load);
- on a GPU, the mean SM utilisation over the whole check (nvidia-smi dmon, 1 s samples), when nvidia-smi exists.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fewtune.engine import batching, devices, engine, models


def build(config_dir: Path, tiny: bool, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(config_dir)
    if tiny:  # 4 blocks of width 32 over the real vocabulary (tests/conftest.py's tiny model)
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 32, 64, 4
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 8
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    built = time.perf_counter() - t0
    tok = models.prepare_tokenizer(AutoTokenizer.from_pretrained(config_dir))
    models.set_pad_token(model, tok)
    return model, tok, built


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype, device, n: int, seconds: float) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def nonembedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


def scoring(model, tok, device, dtype: str, n: int, length: int, peak: float) -> dict:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(100, min(tok.vocab_size, 40000), (length - (i % 8),), generator=g).tolist() for i in range(n)]
    label_ids = [tok.encode(" No")[0], tok.encode(" Yes")[0]]
    out = {}
    for name, kw in (("batch 16", {}), (f"token budget {batching.CUDA_TOKEN_BUDGET}",
                                        {"token_budget": batching.CUDA_TOKEN_BUDGET})):
        engine.score(model, tok, seqs[:32], label_ids, device, dtype, 16, **kw)  # warm-up
        sync(device)
        s = engine.score(model, tok, seqs, label_ids, device, dtype, 16, **kw)
        sync(device)
        gflops = 2 * nonembedding_params(model) * s.tokens / s.seconds / 1e9
        out[name] = {"examples_per_s": round(n / s.seconds, 1), "max_batch": s.max_batch,
                     "gflops": round(gflops, 1), "fraction_of_peak": round(gflops / peak, 4)}
    return out


def training(model, tok, device, dtype: str, batch: int, steps: int, length: int) -> dict:
    label_ids = [tok.encode(" No")[0], tok.encode(" Yes")[0]]
    g = torch.Generator().manual_seed(1)
    items = [{"ids": torch.randint(100, min(tok.vocab_size, 40000), (length,), generator=g).tolist(), "label": i % 2}
             for i in range(batch * steps)]

    def loss_fn(m, chunk, b):
        logits = engine.class_logits(m, b, label_ids)
        labels = torch.tensor([it["label"] for it in chunk], device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels), logits
    m = copy.deepcopy(model)
    settings = engine.TrainSettings(epochs=1, batch_size=batch, lr=1e-5, weight_decay=0.0, warmup_ratio=0.0,
                                    seed=0, dtype=dtype)
    engine.train(m, items[:batch * 2], loss_fn, settings, device, pad_id=tok.pad_token_id, progress=False)  # warm-up
    sync(device)
    r = engine.train(m, items, loss_fn, settings, device, pad_id=tok.pad_token_id, progress=False)
    sync(device)
    del m
    return {"batch": batch, "steps": r.steps, "ms_per_step": round(1000 * r.seconds / r.steps, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same vocabulary (CPU smoke run)")
    ap.add_argument("--config-dir", help="config.json + tokenizer [the converted bundled model in fewtune's cache]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/device_check")
    args = ap.parse_args(argv)
    device = devices.pick_device(args.device)
    dtype = devices.resolve_dtype("auto", device)
    config_dir = Path(args.config_dir) if args.config_dir else models.bundled_folder("smollm2-135m")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    small = args.tiny or device.type == "cpu"
    dmon = None
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=open(out_dir / "dmon.txt", "w"),
                                stderr=subprocess.DEVNULL)
    t_all = time.perf_counter()
    report = {"device": str(device), "dtype": dtype, "torch": torch.__version__, "tiny": args.tiny}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report.update(gpu=torch.cuda.get_device_name(device), free_gib=round(free / 2**30, 1),
                      total_gib=round(total / 2**30, 1))
    n, seconds = (512, 0.3) if small else (4096, 2.0)
    report["matmul_peak_gflops"] = {k: round(matmul_peak(dt, device, n, seconds), 1)
                                    for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    peak = report["matmul_peak_gflops"]["bf16" if dtype == "bf16" else "fp32"]
    model, tok, built = build(config_dir, args.tiny, device)
    t0 = time.perf_counter()
    copy.deepcopy(model)
    sync(device)
    report["model"] = {"params": sum(p.numel() for p in model.parameters()), "build_seconds": round(built, 2),
                       "copy_seconds": round(time.perf_counter() - t0, 3)}
    report["scoring"] = scoring(model, tok, device, dtype, 64 if small else 8192, 40, peak)
    report["training"] = [training(model, tok, device, dtype, b, 2 if small else 10, 40) for b in ((4,) if small else (8, 32))]
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    if dmon is not None:
        dmon.terminate()
        dmon.wait()
        sm = [int(line.split()[1]) for line in (out_dir / "dmon.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#") and line.split()[1].isdigit()]
        report["sm_utilisation_mean_percent"] = round(sum(sm) / len(sm), 1) if sm else None
    (out_dir / "device_check.json").write_text(json.dumps(report, indent=2))
    print(f"device {report['device']} ({report.get('gpu', 'CPU')}), {dtype}; matmul peak fp32 "
          f"{report['matmul_peak_gflops']['fp32']:.0f}, bf16 {report['matmul_peak_gflops']['bf16']:.0f} GFLOP/s")
    print(f"model {report['model']['params'] / 1e6:.1f}M params: built in {built:.2f} s, copied in "
          f"{report['model']['copy_seconds']:.3f} s (a warm worker's per-cell load)")
    for name, r in report["scoring"].items():
        print(f"scoring, {name:22s}: {r['examples_per_s']:9.1f} ex/s (largest batch {r['max_batch']}), "
              f"{r['fraction_of_peak']:.1%} of peak")
    for r in report["training"]:
        print(f"full-FT step, batch {r['batch']:3d}: {r['ms_per_step']:.1f} ms")
    if "sm_utilisation_mean_percent" in report:
        print(f"mean SM utilisation over the check: {report['sm_utilisation_mean_percent']} %")
    print(f"({report['seconds']:.0f} s; {out_dir / 'device_check.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
