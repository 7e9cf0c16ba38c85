"""What is recorded with every result to reproduce it: versions, git commit, machine; and cost meters."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import threading
from pathlib import Path

import psutil


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("fewtune", "torch", "transformers", "peft", "datasets", "accelerate", "tokenizers", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> dict:
    """The commit of the fewtune checkout this code runs from, and whether it has uncommitted changes."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    import torch
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class PeakMemory:
    """Peak memory during a block, in two units that do not compare:

    - on a CUDA device: `torch.cuda.max_memory_allocated` since the block began, the tensors on that device only. It
      leaves out the process's CUDA context (~0.3-0.5 GiB) and what the caching allocator keeps reserved, so a worker
      holds more than this on the device (backends.model_need_bytes adds a margin for both);
    - on CPU: the whole process's resident set size, sampled every 20 ms: Python and torch's libraries (~0.3-0.5 GiB),
      the data, and in a warm worker the template it keeps. It is host memory and never stands for GPU memory.
    """

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._proc = psutil.Process()
        self.peak_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        import torch
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return False

    @property
    def mib(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

