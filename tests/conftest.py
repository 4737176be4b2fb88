"""Shared helpers: reference outputs under the same conditions fxbt captures in, and comparisons."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree

from fxbt.capture import cache_off
from fxbt.optimized import detached

warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
RESULTS = Path(__file__).parent / "results"
_rows: list[dict] = []


def reference(model, inputs: dict):
    """The model's own outputs (its own forward, also when fxbt optimized it), with the KV cache off as fxbt
    captures it."""
    with torch.no_grad(), cache_off(model), detached(model):
        return model(**inputs)


def max_error(a, b) -> float:
    """Largest absolute difference over every floating-point output leaf (fp32 compare)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb), f"{len(la)} outputs vs {len(lb)}"
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
            if x.is_floating_point():
                worst = max(worst, (x.float() - y.float()).abs().max().item())
            else:
                assert torch.equal(x, y)
    return worst


def identical(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


@pytest.fixture
def record_model_row():
    """Tests call this to add a row to the supported-model table (written when FXBT_TABLE is set)."""
    return _rows.append


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("FXBT_TABLE")
    if target and _rows:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / target).write_text(json.dumps(_rows, indent=1) + "\n")
