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
    """Median seconds per variant, running the variants in turn each round, in a rotated order, so that
    drift and whatever one variant leaves behind (caches, allocator state) hit all alike."""
    names = list(variants)
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                fn = variants[name]
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def forward_peak_gb(fn: Callable[[], object], interval: float = 0.002) -> float:
    """Peak resident memory *added* while ``fn`` runs, sampled from a thread (model weights excluded)."""
    import threading

    base, peak, done = _rss_gb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_gb())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_gb()) - base


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
