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

import sys
import types
from typing import Callable

import torch
import torch.fx

from . import decompose, einsums, functional, registry, shapes, tokens
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
    from .capture import inputs_kept

    inputs = [_concrete(x) for x in example_inputs]
    with inputs_kept(inputs):  # the runs below on the call's own tensors leave them as they were
        _prepare_and_rewrite(gm, inputs, patterns, options, sink, reason)
    return gm


def _prepare_and_rewrite(gm, inputs, patterns, options, sink, reason) -> None:
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
    gm.meta[tokens.OUTPUTS_READ_BY_CODE] = not _returns_from_the_compiled_function(gm)
    report = Report("torch.compile", reason=reason)
    apply_and_verify(gm, registry.select(patterns), report, options, inputs)
    gm.fxbt_report = report
    (_REPORTS if sink is None else sink).append(report)


def _returns_from_the_compiled_function(gm: torch.fx.GraphModule) -> bool:
    """Whether what the graph returns is what the compiled function returns (the model's outputs).

    Not so for a graph that ends at a graph break, nor for one that ends a function the compiled one calls
    (after a break, dynamo compiles each function the rest of the code calls on its own): more of the model's
    code reads those outputs, and may read their padded positions, where a padding-free region leaves zeros.
    A graph ending the compiled function, or the code dynamo resumes it with after a break, returns to its
    caller. Whatever cannot be told counts as read by code."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or reason.graph_break:
        return False
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache
        from torch._dynamo.symbolic_convert import InstructionTranslator

        root = InstructionTranslator.current_tx().f_code
    except (ImportError, AttributeError):
        return False
    entry = _compiled_function()
    codes = _codes(entry) if entry is not None else []
    seen = set()
    while codes:  # the entry's code, and the resume functions dynamo made from it (and from those)
        code = codes.pop()
        if code is None or code in seen:
            continue
        seen.add(code)
        if code in ContinueExecutionCache.cache:
            codes.extend(ContinueExecutionCache.cache[code].values())
    return root in seen


def _compiled_function():
    """The function torch.compile wrapped, from the innermost of its wrappers on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compile_wrapper" and "_dynamo" in frame.f_code.co_filename:
            return frame.f_locals.get("fn")
        frame = frame.f_back
    return None


def _codes(fn) -> list:
    """The code objects dynamo may compile first for ``fn``: its own and, for a decorated function, those of
    the functions it wraps; a compiled module's (its ``__call__``) are its ``forward``'s."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module) and getattr(fn, "__func__", None) in (
            torch.nn.Module._wrapped_call_impl, torch.nn.Module._call_impl):
        fn = owner.forward
    codes = []
    while fn is not None:
        fn = getattr(fn, "__func__", fn)
        codes.append(getattr(fn, "__code__", None))
        fn = getattr(fn, "__wrapped__", None)
    return codes


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

    return torch.compile(_with_code_of_its_own(forward), backend=backend, dynamic=True)


def _with_code_of_its_own(forward):
    """``forward`` (a bound method) as a function with a code object of its own. Dynamo keeps compiled code,
    and a limit of recompilations (``recompile_limit``, 8), per code object; the forwards of every model of a
    class share one (transformers' decorated forwards: one per decorator), so past the eighth optimized model
    dynamo would silently run the forward uncompiled."""
    fn = getattr(forward, "__func__", forward)
    if not isinstance(fn, types.FunctionType):
        return forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__qualname__, own.__module__ = fn.__kwdefaults__, fn.__qualname__, fn.__module__
    own.__dict__.update(fn.__dict__)  # __wrapped__, __signature__
    owner = getattr(forward, "__self__", None)
    return types.MethodType(own, owner) if owner is not None else own
