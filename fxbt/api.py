"""The pipeline behind `fxbt.optimize`: capture, record metadata, rewrite, report."""
from __future__ import annotations

import torch
import torch.fx

from . import registry
from .capture import capture
from .errors import FxbtError
from .report import Report
from .rewrite import apply_rules


def optimize(model: torch.nn.Module, example_inputs, *, patterns=None, frontend: str | None = None
             ) -> torch.fx.GraphModule:
    """Capture ``model`` on ``example_inputs`` and rewrite attention and encoder blocks.

    Returns a GraphModule called like ``model`` (same arguments, same output type) that works for
    other batch sizes and sequence lengths. ``fxbt.report(gm)`` says what was rewritten and why not.
    """
    rules = registry.select(patterns)
    captured = capture(model, example_inputs, frontend)
    gm = captured.gm
    report = Report(captured.frontend, captured.failures, captured.notes)
    apply_rules(gm, rules, report)
    gm.fxbt_report = report
    return gm


def report(gm: torch.nn.Module) -> Report:
    """What `optimize` did to ``gm``: one row per candidate region."""
    found = getattr(gm, "fxbt_report", None)
    if found is None:
        raise FxbtError("this module was not produced by fxbt.optimize, so it has no report")
    return found
