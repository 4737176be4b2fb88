"""The pipeline behind `fxbt.optimize`: capture, record metadata, rewrite, report."""
from __future__ import annotations

import torch
import torch.fx

from . import registry
from .capture import capture
from .errors import FxbtError, InputError
from .report import Report
from .rewrite import apply_rules
from .verify import verify as verify_regions


def optimize(model: torch.nn.Module, example_inputs, *, patterns=None, frontend: str | None = None,
             encoder_impl: str = "auto", verify: bool = True) -> torch.fx.GraphModule:
    """Capture ``model`` on ``example_inputs`` and rewrite attention and encoder blocks.

    Returns a GraphModule called like ``model`` (same arguments, same output type) that works for
    other batch sizes and sequence lengths. ``fxbt.report(gm)`` says what was rewritten and why not.
    ``encoder_impl`` picks how fused encoder blocks run: "auto" (the faster one measured per device),
    "dense" (real tokens gathered into one matrix) or "fused" (torch's fused encoder kernel).
    ``verify`` (on by default) runs every region against its original subgraph on the example inputs
    and reverts, with the reason in the report, any that differs beyond the tolerance (1e-5 in fp32).
    """
    if encoder_impl not in ("auto", "dense", "fused"):
        raise InputError(f"encoder_impl must be 'auto', 'dense' or 'fused', got {encoder_impl!r}")
    rules = registry.select(patterns)
    captured = capture(model, example_inputs, frontend)
    gm = captured.gm
    report = Report(captured.frontend, captured.failures, captured.notes)
    apply_rules(gm, rules, report, {"encoder_impl": encoder_impl})
    if verify:
        verify_regions(gm, captured.flat_inputs, report)
    gm.fxbt_report = report
    return gm


def report(gm: torch.nn.Module) -> Report:
    """What `optimize` did to ``gm``: one row per candidate region."""
    found = getattr(gm, "fxbt_report", None)
    if found is None:
        raise FxbtError("this module was not produced by fxbt.optimize, so it has no report")
    return found
