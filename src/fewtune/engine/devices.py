"""Where and in what precision the model runs: the device, the dtype ('auto' resolved per machine), bf16 autocast,
and the switch that turns every speed technique off for measurement."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import FewtuneError


def speedups_enabled() -> bool:
    """False when $FEWTUNE_NO_SPEEDUPS=1: no prefix KV reuse, no frozen-block cache, no fused optimizer, no packed
    batches, no eager training attention.

    For measuring what the speed techniques buy (benchmarks, before/after timings); results are the same
    within float tolerance either way. Precision is separate: `--dtype fp32`.
    """
    return os.environ.get("FEWTUNE_NO_SPEEDUPS", "") not in ("1", "true", "yes")


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise FewtuneError(f"--device {spec}: no CUDA GPU is available here; use --device cpu or auto.")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise FewtuneError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:N).") from None


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere autocast would be slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware runs it fast, else 'fp32'. fp16 is never used on CPU (60x slower)."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    return dtype


def autocast(dtype: str, device: torch.device):
    """bf16 autocast around forward passes; weights stay fp32 (pure-bf16 weights lose updates at lr 1e-5)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
