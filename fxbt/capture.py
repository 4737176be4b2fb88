"""Capture: turn a model into a flat FX graph, whatever can trace it.

Three frontends are tried in order; the first that succeeds wins and every earlier failure is kept:

- ``hf_fx``: transformers' own fx tracer (transformers 4.x). ``HFTracer`` is driven directly so that
  the model-name whitelist of ``transformers.utils.fx.symbolic_trace`` does not refuse models it traces.
- ``dynamo``: ``torch._dynamo.export`` with dynamic sizes, a torch-level graph. The only way on
  transformers 5.x, and for modules plain fx cannot trace.
- ``fx``: ``torch.fx.symbolic_trace``.

Whatever the frontend, the result has one calling convention: its placeholders are the flattened
example inputs, its output is the flat list of output leaves, and fx's pytree codegen rebuilds the
model's call signature and output type (a transformers ``ModelOutput`` stays one).

A capture also says which calls it is valid for: its `ShapeGuard` (fxbt/shapes.py) admits the input
sizes the frontend captured it for, and every node carries its symbolic shape, so that rewrites prove
facts over all admitted sizes. Dynamo captures with duck sizing and 0/1 specialisation off, so an example
with batch 1 or with batch == sequence does not pin those sizes needlessly.

A model in training mode is captured with its dropout: the graph must reproduce the model's outputs
under the same random seed.

Capture touches process-wide state (dynamo's caches, the tracers' patches of torch functions and of
``nn.Module.__call__``), so captures are serialised by one lock; fxbt's tracers let module calls from
other threads through untouched while they trace.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import decompose, dynamo_frontend, einsums, functional, own_gradients, python_state, shapes, size_reads
from .calling import CallSpec, install_drop_in
from .errors import CaptureError, InputError
from .meta import propagate
from .optimized import detached
from .serialize import make_picklable
from .stages import stage

log = logging.getLogger("fxbt")

FRONTENDS = ("hf_fx", "dynamo", "fx")
LOCK = threading.RLock()  # captures and pattern tracing touch process-wide state: one at a time
_SEED = 20240531  # dropout draws of the model and of its graph compared under one seed


@dataclass
class Capture:
    """A captured model: the flat graph, how it was obtained, and the input sizes it admits."""

    gm: torch.fx.GraphModule
    frontend: str
    failures: dict[str, str] = field(default_factory=dict)
    flat_inputs: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shapes: shapes.ShapeGuard | None = None
    own_gradients: list[str] = field(default_factory=list)  # autograd.Functions the model calls (own_gradients.py)


class _NotApplicable(Exception):
    """A frontend that does not apply to this model (not an error of the model)."""


def split_example(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict]:
    """Normalise ``example_inputs`` (a tuple of positionals, a dict of keywords, or one tensor)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputError(
            f"example_inputs must be a tuple of positional inputs or a dict of keyword inputs, got "
            f"{type(example_inputs).__name__}. Pass e.g. (input_ids,) or dict(input_ids=..., attention_mask=...)."
        )
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise InputError("example_inputs hold no tensor: fxbt needs real example tensors to trace and check the model.")
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from None
    return args, kwargs


def capture(model: torch.nn.Module, example_inputs, frontend: str | None = None) -> Capture:
    """Capture ``model`` on ``example_inputs`` with the first frontend that works."""
    args, kwargs = split_example(model, example_inputs)
    order = FRONTENDS if frontend is None else (frontend,)
    if frontend is not None and frontend not in FRONTENDS:
        raise InputError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    failures: dict[str, str] = {}
    blockers: dict[str, str | None] = {}
    with LOCK, detached(model), torch.no_grad(), decompose.fast_path_off():
        order = _frontends_running_hooks(model, order)  # before any run of the model, which would call them
        before = python_state.PythonState(model)
        try:
            with stage("eager reference run"):
                with_cache = _output_with_cache(model, args, kwargs)
                with cache_off(model), own_gradients.recorded([]) as functions:
                    reference = _seeded(model.training, lambda: model(*args, **kwargs))
                    changed = python_state.changes_itself(model, lambda: _seeded(model.training,
                                                                                 lambda: model(*args, **kwargs)))
        except Exception as e:  # noqa: BLE001 - typed, with the model's own error attached
            before.restore()
            raise InputError(f"the model itself raises on these inputs: {type(e).__name__}: {e}") from e
        if changed:
            before.restore()  # capture changes nothing: the counter is where the caller left it
            raise _cannot_repeat(f"the forward (or a hook) changes values of its own on every call "
                                 f"({'; '.join(changed[:3])})")
        if with_cache is not None and with_cache != pytree.tree_structure(reference):
            raise _returns_a_cache()
        order = _frontends_running_hooks(model, order)  # and those its own run installed
        with cache_off(model):
            for name, attempt in _attempts(order):
                if name in failures:
                    continue
                gm = None
                try:
                    with stage(f"capture ({name})"), attributes_kept(model):
                        gm, decisions = attempt(model, args, kwargs)
                    with stage("calling convention"):
                        flat_inputs = _flatten_io(gm, model, args, kwargs, reference, name)
                        _decompose_attention(gm, flat_inputs, name)
                        functional.out_of_place(gm)
                    with stage("reproduction check"):
                        _reproduces(gm, flat_inputs, reference, model.training)
                    # after the run that recorded every value's rank and dtype
                    size_reads.as_dynamo_records(gm, keep={node for node, _ in decisions})
                    _number(gm)
                    with stage("shape guards"):
                        guard = _shape_guard(gm, name, flat_inputs, decisions)
                except Exception as e:  # each frontend fails in its own way; we keep the reason
                    if gm is not None and gm.meta.get("fxbt_block_reuse", (0, 0))[0]:
                        log.info("fxbt: the graph with repeated blocks reused failed (%s); tracing every block", e)
                        continue  # the next attempt traces every block
                    failures[name] = _short_reason(e)
                    blockers.setdefault(name, blocker(e))
                    log.info("fxbt: frontend %s failed: %s", name, failures[name])
                    continue
                cap = Capture(gm, name, failures, flat_inputs, shapes=guard, own_gradients=functions)
                calls, traced = gm.meta.get("fxbt_block_reuse", (0, 0))
                if calls > traced:
                    cap.notes.append(f"{calls} calls of repeated blocks captured from {traced} trace(s) of a block")
                if guard.static:
                    cap.notes.append("input sizes pinned to the example's: the graph has an op without symbolic sizes")
                return cap
    where = next((blockers[n] for n in ("dynamo", "fx", "hf_fx") if blockers.get(n)), None)
    raise CaptureError(failures, training=model.training, blocker=where)


def _frontends_running_hooks(model, order: tuple) -> tuple:
    """The frontends whose graph runs the model's forward hooks: all where it has none; dynamo, which traces
    them, where submodules have hooks whose every read the guard checks (fx makes a leaf module one node, its
    hooks left out); none for global hooks, or hooks that read what the guard cannot see (an object's field, a
    partial's arguments, an external module): those calls run through torch.compile, whose guards see them."""
    hooks = python_state.hooked(model)
    if not hooks:
        return order
    opaque = python_state.opaque_hooks(model)
    if opaque or "dynamo" not in order:
        where = opaque or hooks
        raise _cannot_repeat(f"forward hooks on {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}")
    return ("dynamo",)


def _cannot_repeat(why: str) -> CaptureError:
    """A graph holds the values its trace read and runs no Python: not a forward (or hook) that changes values of
    its own (a step counter, a list of recorded activations), nor hooks no frontend traces. Such calls are served
    by torch.compile (fxbt's backend), which replays them, or by the model's own forward."""
    return CaptureError({"every frontend": why + ": a graph cannot repeat them"},
                        advice="Calls run through torch.compile with the fxbt backend, or the model's own forward.")


def _returns_a_cache() -> CaptureError:
    return CaptureError({"every frontend": "the call returns a KV cache (a config has use_cache=True), which a graph, "
                                           "captured with the cache off, would not return; use_cache=False gets one"},
                        advice="Such calls run through torch.compile with the fxbt backend, which returns the cache. "
                               "Pass use_cache=False, or set config.use_cache=False, for fxbt's own graphs.")


def _output_with_cache(model, args, kwargs):
    """The structure of the call's output with the model's KV cache as configured, where a config switches one
    on (``cache_off`` would change the call); None where none does. A decoder called plainly returns its cache,
    and a caller may feed it back: a graph captured with the cache off would silently return none."""
    if not any(c.use_cache for c in cache_configs(model)):
        return None
    return pytree.tree_structure(_seeded(model.training, lambda: model(*args, **kwargs)))


@contextlib.contextmanager
def inputs_kept(inputs):
    """Capture and verification run the model on the example several times; a forward that writes into its inputs
    (``x.mul_(2)``) would change the caller's tensors each time. Their values are put back afterwards."""
    # plain tensors only: weights torch.compile passes as inputs are not the caller's, fakes have no values
    tensors = [x for x in pytree.tree_leaves(inputs) if type(x) is torch.Tensor and not x.is_nested
               and x.device.type != "meta"]
    saved = [x.detach().clone() for x in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for x, was in zip(tensors, saved):
                if not torch.equal(x, was):
                    with torch.inference_mode(x.is_inference()):
                        x.copy_(was)


def _attempts(order):
    """(frontend, capture function) in the order tried: dynamo with repeated blocks traced once, then, if
    that graph fails a check (it does not reproduce the model, say), dynamo tracing every block."""
    for name in order:
        yield name, _FRONTEND_FNS[name]
        if name == "dynamo":
            yield name, lambda model, args, kwargs: _dynamo(model, args, kwargs, reuse=False)


def _shape_guard(gm, frontend, flat_inputs, decisions) -> shapes.ShapeGuard:
    names = gm._fxbt_call.leaf_names
    if frontend == "dynamo":
        return shapes.from_dynamo(gm, flat_inputs, names)
    return shapes.propagate_symbolic(gm, flat_inputs, names, decisions)


def _seeded(training: bool, run):
    """In training mode, dropout draws random numbers: the model and its graph run under one seed."""
    if not training:
        return run()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        return run()


def _reproduces(gm, flat_inputs, reference, training: bool) -> None:
    """Run the graph once on the example (recording metadata) and insist it computes what the model did."""
    got = pytree.tree_leaves(_seeded(training, lambda: propagate(gm, flat_inputs)))
    want = pytree.tree_leaves(reference)
    if len(got) != len(want):
        raise RuntimeError(f"the graph returns {len(got)} values where the model returns {len(want)}")
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor) and not (g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5,
                                                                                      equal_nan=True)):
            raise RuntimeError("the captured graph does not reproduce the model's outputs on the example inputs")


_NOT_MODEL_CODE = re.compile(r"[/\\](torch|fxbt|_pytest|pluggy|contextlib\.py|functools\.py)[/\\.]")
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def blocker(e: Exception) -> str | None:
    """The line of model code capture stopped at, in one line (file:line in function: `code`): the last frame
    of the model's own code in dynamo's "from user code" trace, else in the exception's traceback."""
    found = [m.groups() for m in _USER_FRAME.finditer(str(e)) if not _NOT_MODEL_CODE.search(m.group(1))]
    if not found:
        frames = traceback.extract_tb(e.__traceback__)
        found = [(f.filename, str(f.lineno), f.name, f.line or "") for f in frames
                 if not _NOT_MODEL_CODE.search(f.filename)]
    if not found:
        return None
    path, line, function, code = found[-1]
    return f"{os.path.basename(path)}:{line} in {function}: `{code.strip()}`"


def _short_reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}"


@contextlib.contextmanager
def attributes_kept(model: torch.nn.Module):
    """Tracing runs the model's forward on proxies, and an attribute the forward assigns would keep one
    (CodeGen stores its position table on ``self`` when it moves it to the ids' device; rotary caches store
    their tables): the model would then fail on its next call. Every module's attributes, parameters,
    buffers and submodules are put back as they were, whether the trace succeeded or not."""
    saved = [(d, dict(d)) for m in model.modules() for d in (m.__dict__, m._parameters, m._buffers, m._modules)]
    try:
        yield
    finally:
        for now, before in saved:
            if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                now.clear()
                now.update(before)


@contextlib.contextmanager
def cache_off(model: torch.nn.Module):
    """HF decoders return a KV cache object unless told not to; capture without it.

    Sub-models keep configs of their own (T5's decoder stack copies its config), so every config
    reachable from the model's modules is switched, and restored afterwards.
    """
    configs = {id(c): c for c in cache_configs(model)}
    saved = {key: c.use_cache for key, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for key, c in configs.items():
            c.use_cache = saved[key]


def cache_configs(model: torch.nn.Module) -> list:
    """Every config reachable from the model's modules that says whether to return a KV cache."""
    return [c for m in model.modules() if (c := getattr(m, "config", None)) is not None
            and getattr(c, "use_cache", None) is not None]


def _concrete_defaults(model, args, kwargs) -> tuple[list[str], dict[str, Any]]:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    given = list(bound.arguments)
    concrete = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in given and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return given, concrete


def _hf_fx(model, args, kwargs) -> torch.fx.GraphModule:
    try:
        from transformers import PreTrainedModel
        from transformers.utils.fx import HFTracer
    except ImportError:
        raise _NotApplicable("transformers.utils.fx does not exist in this transformers version (removed in 5.x)")
    if not isinstance(model, PreTrainedModel):
        raise _NotApplicable("the HF tracer only traces transformers PreTrainedModel instances")
    given, concrete = _concrete_defaults(model, args, kwargs)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    dummy = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    concrete.update({k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)})
    tracer = _hf_tracer_class(HFTracer)()
    with _undo_hf_patches(HFTracer):
        graph = tracer.trace(model, concrete_args=concrete, dummy_inputs=dummy,
                             complete_concrete_args_with_inputs_not_in_dummy_inputs=False)
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    live = set(gm.graph.nodes)
    return gm, [(node, replay) for node, replay in tracer.decisions if node in live]


def _hf_tracer_class(base):
    """HFTracer that records what it decided from the example's sizes (``if seq_len > 1``: the HF tracer
    evaluates a proxy's truth, length or membership on the example's metadata) and lets other threads'
    module calls through."""
    from transformers.utils.fx import HFProxy

    class DecisionProxy(HFProxy):
        def __bool__(self):
            result = super().__bool__()
            self.tracer.decisions.append((self.node, lambda v, r=bool(result): _expect(bool(v), r)))
            return result

        def __len__(self):
            result = super().__len__()
            self.tracer.decisions.append((self.node, lambda v, r=result: _expect(len(v), r)))
            return result

        def __contains__(self, key):
            result = super().__contains__(key)
            self.tracer.decisions.append((self.node, lambda v, k=key, r=bool(result): _expect(k in v, r)))
            return result

    class Tracer(_OwnThreadOnly, base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.decisions = []

        def proxy(self, node):
            return DecisionProxy(node, self)

    return Tracer


def _expect(value, recorded) -> None:
    if value != recorded:
        raise RuntimeError(f"the traced decision does not replay ({value!r} != {recorded!r})")


class _OwnThreadOnly:
    """A tracer mixin: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it
    traces; calls from other threads go to the module as if no tracer were there."""

    def trace(self, *args, **kwargs):
        self._fxbt_thread = threading.get_ident()
        return super().trace(*args, **kwargs)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != getattr(self, "_fxbt_thread", None):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != getattr(self, "_fxbt_thread", None):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class _FxTracer(_OwnThreadOnly, torch.fx.Tracer):
    pass


@contextlib.contextmanager
def _undo_hf_patches(tracer_cls):
    """HFTracer patches torch functions and transformers classes while tracing and does not restore
    them when tracing fails (transformers 4.57); left patched, they break every later dynamo capture."""
    functions = {name: getattr(torch, name) for name in tracer_cls._TORCH_METHODS_TO_PATCH}
    try:
        yield
    finally:
        for name, fn in functions.items():
            setattr(torch, name, fn)
        undo = {patched: orig for orig, patched in tracer_cls._CLASSES_TO_PATCH.items()}
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("transformers") and mod is not None:
                for attr, value in list(vars(mod).items()):
                    if isinstance(value, type) and value in undo:
                        setattr(mod, attr, undo[value])


def _dynamo(model, args, kwargs, reuse: bool = True):
    """Dynamo's graph, repeated blocks traced once where ``reuse`` (fxbt/dynamo_frontend.py);
    ``torch._dynamo.export`` where that capture fails."""
    names = CallSpec.of(model, args, kwargs).leaf_names
    try:
        return dynamo_frontend.capture(model, args, kwargs, names, reuse), ()
    except Exception as e:  # noqa: BLE001 - export below reports its own failure
        log.info("fxbt: dynamo capture with block reuse failed, trying torch._dynamo.export: %s", e)
    return _dynamo_export(model, args, kwargs), ()


def _dynamo_export(model, args, kwargs):
    """``torch._dynamo.export`` with every input size dynamic, no duck sizing (batch == sequence on the
    example stays two sizes) and no 0/1 specialisation where dynamo can avoid it (its guards record the
    specialisations it still makes). No ``torch._dynamo.reset()``: other compiled code keeps its caches."""
    import torch._dynamo
    from torch.fx.experimental import _config as fx_config

    # every export runs through one wrapper function of dynamo's, whose compiled entries pile up while the
    # models captured so far are alive: eight of them would make the next export fail (recompile limit)
    limit = max(torch._dynamo.config.recompile_limit, 1024)
    with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True), \
            torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(
                torch._dynamo.config.accumulated_recompile_limit, limit)):
        result = torch._dynamo.export(model, assume_static_by_default=False)(*args, **kwargs)
    return result.graph_module


def _plain_fx(model, args, kwargs):
    given, concrete = _concrete_defaults(model, args, kwargs)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    concrete.update({k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)})
    tracer = _FxTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    name = model.__class__.__name__ if isinstance(model, torch.nn.Module) else model.__name__
    return torch.fx.GraphModule(tracer.root, graph, name), ()


_FRONTEND_FNS: dict[str, Callable] = {"hf_fx": _hf_fx, "dynamo": _dynamo, "fx": _plain_fx}


def _flatten_io(gm, model, args, kwargs, reference, frontend) -> list:
    """Give every frontend's graph one convention: flat tensor inputs, flat outputs, pytree codegen.

    Returns the example inputs flattened in the order of the graph's placeholders."""
    if frontend != "dynamo":  # dynamo already has one placeholder per leaf of (args, kwargs), in order
        _flatten_graph_io(gm, model, args, kwargs, reference)
    flat_inputs = pytree.tree_leaves((args, kwargs))
    install_drop_in(gm, CallSpec.of(model, args, kwargs), _out_spec(gm, reference))
    gm._fxbt_out_spec = _out_spec(gm, reference)
    make_picklable(gm)
    gm.train(model.training)  # a new GraphModule starts in training mode whatever the model's mode
    gm.meta = getattr(gm, "meta", {})
    return flat_inputs


def _decompose_attention(gm, flat_inputs, frontend) -> None:
    """PyTorch's multi-head attention calls written out as the ops they run (fxbt/decompose.py), and einsums
    in a layout of their own as permutes and matmul (fxbt/einsums.py)."""
    if einsums.needs_ranks(gm):  # an ellipsis stands for as many axes as the operands' ranks say
        propagate(gm, flat_inputs)
    added = einsums.write_out(gm)
    if decompose.candidates(gm):
        propagate(gm, flat_inputs)  # ranks and dtypes the calls' Python code decides from
        added += decompose.decompose(gm)
    if frontend == "dynamo":
        decompose.fake_values(gm, added)


def _number(gm) -> None:
    for pos, node in enumerate(gm.graph.nodes):
        node.meta["fxbt_pos"] = pos
        node.meta["fxbt_name"] = node.name  # unroll restores it, even for a node re-created elsewhere


def _flatten_graph_io(gm, model, args, kwargs, reference) -> None:
    """Placeholders become the leaves of the example's ``(args, kwargs)``, in order (an unused one for
    each non-tensor input the tracer baked in); the output becomes the flat list of output leaves."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    order = [name for name, _ in zip(bound, args)] + list(kwargs)
    if any(isinstance(bound[n], (tuple, list, dict)) for n in order):
        raise RuntimeError("nested (tuple, list or dict) inputs are captured by the dynamo frontend only")
    existing = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    body = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for name in order:
        node = existing.pop(name, None)
        if node is None:  # a non-tensor input the tracer made a constant: kept as an (unused) input
            with gm.graph.inserting_before(body):
                node = gm.graph.placeholder(f"{name}_value")
        body.prepend(node)
    for name, node in existing.items():
        if node.users:
            raise RuntimeError(f"the traced graph reads input {name!r}, which the example does not give")
        gm.graph.erase_node(node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_nodes, _ = pytree.tree_flatten(_as_plain(output.args[0]))
    if len(out_nodes) != len(pytree.tree_leaves(reference)):
        raise RuntimeError(f"graph returns {len(out_nodes)} values, the model {len(pytree.tree_leaves(reference))}")
    output.args = (tuple(out_nodes),)


def _out_spec(gm, reference):
    """The model's own output structure (a ModelOutput stays one)."""
    return pytree.tree_structure(reference)


def _as_plain(structure):
    """HF traced graphs return a dict in place of the ModelOutput: flatten it in the same key order."""
    if isinstance(structure, dict):
        return tuple(_as_plain(v) for v in structure.values())
    if isinstance(structure, (list, tuple)):
        return tuple(_as_plain(v) for v in structure)
    return structure
