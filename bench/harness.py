"""Shared benchmark plumbing: interleaved median timing, peak memory in a fresh process, machine facts."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

BETTERTRANSFORMER_PYTHON = Path(__file__).parent / ".venv-bettertransformer" / "bin" / "python"


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        mode: Callable = torch.inference_mode) -> dict[str, float]:
    """Median seconds per variant, running the variants in turn each round, in a rotated order, so that
    drift and whatever one variant leaves behind (caches, allocator state) hit all alike. All run under
    ``mode()`` (``contextlib.nullcontext``: each variant sets its own grad mode). Where CUDA is in use, each
    run waits for the device to finish, so a time is the run's and not its launches'."""
    names = list(variants)
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    with mode():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                fn = variants[name]
                sync()
                start = time.perf_counter()
                fn()
                sync()
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


# For memory measurements only: glibc then maps every block of 64 KiB or more on its own and unmaps it
# when freed, so resident memory follows live tensors instead of keeping what the warm-up run freed.
# Not for timing: a map per allocation is slower.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def in_fresh_process(script: str, *args: str, python: str = sys.executable, env: dict | None = None) -> dict:
    """Run ``script`` with ``args`` in a new interpreter; it prints one JSON line last."""
    out = subprocess.run([python, script, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join([script, *args])} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_in_fresh_process(script: str, *args: str, python: str = sys.executable) -> dict:
    return in_fresh_process(script, *args, python=python, env=MEMORY_ENV)


def bettertransformer(model: str, inputs: list[dict], repeats: int = 7, memory: bool = False) -> dict | None:
    """Optimum's BetterTransformer against its own eager, in its venv (bettertransformer_worker.py): medians
    and errors per input, or with ``memory`` the peak a BetterTransformer forward adds on the first input.
    None when that venv is missing (bash bench/setup_venv.sh bettertransformer)."""
    if not BETTERTRANSFORMER_PYTHON.exists():
        return None
    worker = str(Path(__file__).parent / "bettertransformer_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save(inputs, path)
        if memory:
            return memory_in_fresh_process(worker, model, str(path), "--memory-of", "bettertransformer",
                                           python=str(BETTERTRANSFORMER_PYTHON))
        return in_fresh_process(worker, model, str(path), "--repeats", str(repeats),
                                python=str(BETTERTRANSFORMER_PYTHON))


def add_peer_flags(parser) -> None:
    """The flags that leave out the slow-to-start peers, the same in every benchmark."""
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (slow first call)")
    parser.add_argument("--no-bettertransformer", action="store_true", help="skip the BetterTransformer peer")


# the torch.compile peers: inductor alone, and fxbt's attention rewrite followed by inductor
COMPILE_BACKENDS = {"compile": "inductor", "fxbt_inductor": "fxbt_inductor"}


def compiled_peers(build: Callable[[], torch.nn.Module]) -> dict:
    """Every torch.compile peer, each compiling a fresh model from ``build``."""
    return {peer: torch.compile(build(), backend=backend) for peer, backend in COMPILE_BACKENDS.items()}


def machine() -> str:
    import transformers
    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPUs ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def run_options(parser, threads_help: str = "torch threads (0: torch's default)") -> None:
    """``--threads`` and ``--out``, which every workload script takes."""
    from pathlib import Path

    parser.add_argument("--threads", type=int, default=0, help=threads_help)
    parser.add_argument("--out", type=Path, default=None)


def start(args) -> float:
    """Sets ``--threads`` (torch's); returns the load average before the run."""
    load = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    return load


def load_average() -> float:
    """The machine's 1-minute load average (other processes included): how busy the shared CPUs were."""
    return round(os.getloadavg()[0], 2)
