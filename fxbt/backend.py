"""fxbt as a ``torch.compile`` backend.

    torch.compile(model, backend="fxbt")            # rewrite dynamo's graphs, run them
    torch.compile(model, backend="fxbt_inductor")   # rewrite attention, then hand the graph to inductor

Both names are registered in the ``torch_dynamo_backends`` entry-point group, so they work without
importing fxbt first. Each graph dynamo hands over (one per graph break, one per recompilation for new
shapes) is rewritten like `fxbt.optimize` does; `reports()` lists what was done to each.
"""
from __future__ import annotations

import torch
import torch.fx

from . import registry
from .meta import propagate
from .report import Report
from .rewrite import apply_rules

_REPORTS: list[Report] = []
# Inductor traces the regions' Python code; the dense encoder's per-call packing reads the mask's values
# (data-dependent), so the graph handed to inductor gets the attention rules only.
_TRACEABLE = ("softmax_attention", "existing_sdpa")


def reports() -> list[Report]:
    """The reports of every graph the backend rewrote in this process, oldest first."""
    return list(_REPORTS)


def _concrete(x):
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else int(x)
    return x


def rewrite(gm: torch.fx.GraphModule, example_inputs, patterns=None) -> torch.fx.GraphModule:
    propagate(gm, [_concrete(x) for x in example_inputs])
    for pos, node in enumerate(gm.graph.nodes):
        node.meta["fxbt_pos"] = pos
    report = Report("torch.compile")
    apply_rules(gm, registry.select(patterns), report)
    gm.fxbt_report = report
    _REPORTS.append(report)
    return gm


def fxbt_backend(gm: torch.fx.GraphModule, example_inputs):
    return rewrite(gm, example_inputs).forward


def fxbt_inductor_backend(gm: torch.fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    rewritten = rewrite(gm, example_inputs, patterns=list(_TRACEABLE))
    return compile_fx(rewritten, example_inputs)
