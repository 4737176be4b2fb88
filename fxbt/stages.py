"""Wall time of `fxbt.optimize`'s stages, for ``bench/optimize_profile.py``.

``with stage("capture"): ...`` adds the block's wall time to the timings of the innermost `timed()` block
of the same thread; outside one it costs a thread-local lookup. Stages do not nest: a stage's time is its
own, so the stages of one optimize() sum to (nearly) its wall time.
"""
from __future__ import annotations

import contextlib
import threading
import time

_STATE = threading.local()


@contextlib.contextmanager
def stage(name: str):
    timings = getattr(_STATE, "timings", None)
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def timed():
    """Collect the stages run inside the block: ``with timed() as t: fxbt.optimize(...)``; ``t`` maps a
    stage's name to its seconds, in the order stages first ran."""
    outer = getattr(_STATE, "timings", None)
    _STATE.timings = timings = {}
    try:
        yield timings
    finally:
        _STATE.timings = outer
