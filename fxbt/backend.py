"""fxbt as a ``torch.compile`` backend.

    torch.compile(model, backend="fxbt")            # rewrite dynamo's graphs, run them
    torch.compile(model, backend="fxbt_inductor")   # rewrite attention, then hand the graph to inductor

Both names are registered in the ``torch_dynamo_backends`` entry-point group, so they work without
importing fxbt first. Each graph dynamo hands over (one per graph break, one per recompilation) is
rewritten and verified like `fxbt.optimize` does; dynamo's own guards decide when a graph serves a call.
`reports()` lists what was done to each. An optimized model sends the calls that pass or ask for a KV cache
here too (`compile_route`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from . import decompose, einsums, functional, registry, shapes
from .canon import canonical_op
from .meta import propagate
from .report import Report
from .rewrite import apply_and_verify

_REPORTS: list[Report] = []
# Inductor traces the regions' Python code; packing tokens reads the mask's values (data-dependent), so the
# graph handed to inductor gets the attention rules only.
_TRACEABLE = ("softmax_attention", "existing_sdpa")


def reports() -> list[Report]:
    """The reports of every graph the backend rewrote in this process, oldest first."""
    return list(_REPORTS)


def _concrete(x):
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else int(x)
    return x


def rewrite(gm: torch.fx.GraphModule, example_inputs, patterns=None, options: dict | None = None,
            sink: list | None = None, reason: str = "a graph handed over by torch.compile") -> torch.fx.GraphModule:
    inputs = [_concrete(x) for x in example_inputs]
    functional.out_of_place(gm)
    decompose.fake_values(gm, einsums.write_out(gm))  # einsums in a layout of their own: permutes and matmul
    propagate(gm, inputs)
    if decompose.candidates(gm):  # PyTorch's multi-head attention, written out as the ops it runs
        decompose.fake_values(gm, decompose.decompose(gm))
        propagate(gm, inputs)
    env = next((v.fake_mode.shape_env for n in gm.graph.nodes if n.op == "placeholder"
                for v in [n.meta.get("example_value")] if hasattr(v, "fake_mode")), None)
    shapes.record(gm, "example_value", env)  # dynamo's symbolic sizes: rules prove facts for every size
    for pos, node in enumerate(gm.graph.nodes):
        node.meta["fxbt_pos"] = pos
    gm.train(_drops_out(gm))  # a new GraphModule says "training"; the graph's own dropout says what was traced
    report = Report("torch.compile", reason=reason)
    apply_and_verify(gm, registry.select(patterns), report, options, inputs)
    gm.fxbt_report = report
    (_REPORTS if sink is None else sink).append(report)
    return gm


def _drops_out(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        canon = canonical_op(node, gm)
        if canon.op == "dropout" and canon.attrs.get("training") is not False and canon.attrs.get("p"):
            return True
    return False


def fxbt_backend(gm: torch.fx.GraphModule, example_inputs):
    return rewrite(gm, example_inputs).forward


def fxbt_inductor_backend(gm: torch.fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    rewritten = rewrite(gm, example_inputs, patterns=list(_TRACEABLE))
    return compile_fx(rewritten, example_inputs)


def compile_route(forward, options, sink: list, reason: Callable[[], str]):
    """A model's own ``forward`` compiled with the fxbt backend: for calls no captured graph can serve.
    ``reason()`` says, when dynamo hands a graph over, what kind of call it is for."""
    def backend(gm, example_inputs):
        return rewrite(gm, example_inputs, options.patterns, {"encoder_impl": options.encoder_impl}, sink,
                       reason=reason()).forward

    return torch.compile(forward, backend=backend, dynamic=True)
