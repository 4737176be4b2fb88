"""Shared benchmark plumbing: interleaved median timing, peak memory in a fresh process, machine facts."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant, running the variants in turn each round so drift hits all alike."""
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def in_fresh_process(script: str, *args: str) -> dict:
    """Run ``script`` with ``args`` in a new interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import transformers
    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPUs ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")
