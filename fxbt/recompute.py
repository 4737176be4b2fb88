"""Eval-mode calls with gradients enabled: the graph runs without recording, and again for a backward.

A model in ``eval()`` called with gradients enabled (the README's example as written, a pipeline without
``no_grad``, an attribution method that does call backward) pays autograd's recording on every call: 1.2x
its ``inference_mode`` time on MiniLM, though most such calls never run a backward. A specialization whose
graph computes the same values every time it runs (every module in eval mode, no random op) is run instead
as one autograd node: its forward under ``no_grad``, and a backward that runs the graph again with gradients
enabled and differentiates that run (activation checkpointing of the whole graph). Outputs are the graph's
own, gradients are the graph's own and reach the same tensors (inputs and the model's parameters); the cost
moves to the backward that needs it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from .meta import deterministic, target_name, writes_in_place, written_by
from .region import fetch


def replayable(gm: torch.fx.GraphModule, training_flags: tuple) -> bool:
    """Whether running the graph again gives the values it gave: no module of the model trains (dropout,
    batch-norm statistics), no op of the graph or of the graphs inside it (regions' originals) draws random
    numbers, and none writes into its inputs (the second run would read what the first wrote; for a region's
    graph, whose inputs may be the call's, any write into them counts)."""
    graphs = [m.graph for m in gm.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
    return not any(training_flags) and not any(_draws(n) or _writes_input(n) for g in graphs for n in g.nodes)


def _writes_input(node: torch.fx.Node) -> bool:
    return writes_in_place(node) and any(base.op == "placeholder" for base in written_by(node))


def _draws(node: torch.fx.Node) -> bool:
    """Whether an op draws random numbers; dropout only where it trains (``F.dropout(x, p, False)`` is the
    identity, as eval-mode graphs have it)."""
    if node.op not in ("call_function", "call_method") or deterministic(node):
        return False
    if "dropout" in target_name(node):
        training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
        return training is not False
    return True


def constants(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors the graph reads besides its inputs: parameters, buffers and tensor attributes (an fx
    graph reads no other). Which of them gradients reach is decided per call: ``requires_grad`` can change."""
    found = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = fetch(gm, node.target)
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), value)
    return list(found.values())


def records(leaves: list, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Whether a call on ``leaves`` would record for autograd: the graph's tensors gradients reach (a list,
    maybe empty where only inputs require gradients), or None. Not under torch.func's transforms, whose
    Functions take another form: there the graph records as it always did."""
    if not torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    reached = [t for t in tensors if t.requires_grad]
    if reached or any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
        return reached
    return None


def run(graph: Callable, leaves: list, reached: list[torch.Tensor]) -> tuple:
    """``graph(leaves)`` as one autograd node that runs the graph again when a backward needs it; ``reached``:
    the graph's tensors gradients reach (`records`)."""
    return _Recomputed.apply(graph, len(leaves), *leaves, *reached)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph, n_leaves, *given):
        leaves, constants = list(given[:n_leaves]), given[n_leaves:]
        outputs = tuple(graph(leaves))  # autograd.Function's forward runs without recording
        ctx.graph = graph
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(o for o in outputs if isinstance(o, torch.Tensor)
                                      and not (o.is_floating_point() or o.is_complex())))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        ctx.leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        ctx.save_for_backward(*tensors, *constants)  # an in-place change before backward raises, as usual
        ctx.n_tensors = len(tensors)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        tensors, constants = saved[:ctx.n_tensors], saved[ctx.n_tensors:]
        wanted = ctx.needs_input_grad[2:]  # per leaf, then per constant
        given_tensors = iter(tensors)
        leaves, wrt_leaves = [], []
        for i, x in enumerate(ctx.leaves):
            if x is None:  # a tensor input: a fresh leaf, so its gradient is ours to return
                x = next(given_tensors).detach().requires_grad_(wanted[i])
                wrt_leaves.append(x if wanted[i] else None)
            else:
                wrt_leaves.append(None)
            leaves.append(x)
        create_graph = torch.is_grad_enabled()  # a backward with create_graph=True: keep it differentiable
        with torch.enable_grad():
            outputs = tuple(ctx.graph(leaves))
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [x for x in wrt_leaves if x is not None] + [c for c, w in zip(constants, wanted[len(leaves):]) if w]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                         create_graph=create_graph) if pairs and wrt else [None] * len(wrt))
        leaf_grads = [next(found) if x is not None else None for x in wrt_leaves]
        constant_grads = [next(found) if w else None for w in wanted[len(leaves):]]
        return (None, None, *leaf_grads, *constant_grads)

