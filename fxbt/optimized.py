"""The optimized model: the user's own model, whose calls run fxbt's graphs.

`fxbt.optimize` touches the model in one place: its ``forward``, as an instance attribute (`OptimizedForward`)
that carries the model's own signature. ``model(...)`` reaches it through ``nn.Module.__call__``, hooks
and all, and so do libraries that call ``model.forward(...)`` directly (sentence-transformers does).
Everything else is the model's own: its class, attributes, config, ``state_dict`` keys, ``.to()``,
``.generate()``, ``.save_pretrained()``. `fxbt.restore` removes the attribute. Like ``nn.Module.compile()``,
a deepcopy or pickle of the model is the plain model.

Each call is served by a `Specialization` whose guards it passes (fxbt/guards.py, fxbt/shapes.py). A call
that none covers gets a new one, captured, rewritten and verified on that call, kept in a bounded cache and
listed in the report with the reason it was made. Calls that pass or ask for a KV cache (objects no
captured graph takes or returns) run through ``torch.compile`` with the fxbt backend, whose dynamo guards
cover them; so do calls no frontend captures as one graph (a branch on tensor values: dynamo breaks the graph
there and runs the branch in Python), unless the caller chose a frontend. A call whose optimized graph
raises runs the model's own forward; the report counts those calls and says why.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import own_gradients, python_state, recompute
from .errors import CaptureError, FxbtError, InputError
from .guards import Signature, StateGuard, call_key, describe_key_difference, is_opaque, opaque_types
from .python_state import PythonState
from .region import RecomputeCall
from .shapes import ShapeGuard


UNNAMED = "inputs given through *args, which a graph cannot take by name"


@dataclass
class Options:
    patterns: Any = None
    frontend: str | None = None
    encoder_impl: str = "auto"
    verify: bool = True
    max_specializations: int = 8


@dataclass(eq=False)
class Specialization:
    """A graph and the conditions it was captured and proven under."""

    key: tuple
    shapes: ShapeGuard
    state: StateGuard
    gm: torch.fx.GraphModule
    reason: str
    constants: list = field(default_factory=list)  # the tensors the graph reads besides its inputs
    replayable: bool = False  # the graph can run again for a backward (recompute.py)
    own_gradients: list = field(default_factory=list)  # autograd.Functions the model calls (own_gradients.py)
    calls: int = 0
    _flat: Callable | None = field(default=None, repr=False)
    _flat_code: str | None = field(default=None, repr=False)

    @property
    def report(self):
        return self.gm.fxbt_report

    def run(self, leaves: list):
        """Run the graph on flat inputs (the call was bound and guarded already)."""
        if self._flat is None or self._flat_code is not self.gm.code:
            self._flat, self._flat_code = flat_forward(self.gm), self.gm.code
        graph = lambda given: self._flat(self.gm, *given)  # noqa: E731
        reached = recompute.records(leaves, self.constants)
        if reached is not None and self.own_gradients:
            raise RecomputeCall(own_gradients.reason(self.own_gradients))
        self.calls += 1
        outputs = recompute.run(graph, leaves, reached) if reached is not None and self.replayable else graph(leaves)
        return pytree.tree_unflatten(list(outputs), self.gm._fxbt_out_spec)


def flat_forward(gm: torch.fx.GraphModule) -> Callable:
    """The graph's code taking its flat inputs positionally, without the drop-in binding of ``forward``."""
    from torch.fx.graph import CodeGen
    from torch.fx.graph_module import _forward_from_src

    codegen = gm.graph._codegen
    gm.graph._codegen = CodeGen()
    try:
        code = gm.graph.python_code(root_module="self")
    finally:
        gm.graph._codegen = codegen
    return _forward_from_src(code.src, code.globals)


class Optimized:
    """The dispatcher behind an optimized model's ``forward``."""

    def __init__(self, model: torch.nn.Module, options: Options):
        self.model = model
        self.own_forward = model.forward  # the model's forward before fxbt (its class's, or one set on it)
        self.options = options
        self.signature = Signature(model)
        self.modules = list(model.modules())
        self.specializations: list[Specialization] = []  # most recently used first
        self.history: list[str] = []  # every specialization made, and every one dropped, with the reason
        self.refused: dict[tuple, str] = {}  # call kinds no graph can be captured for: the model's own forward
        self.uncaptured: dict[tuple, str] = {}  # call kinds no one graph captures: torch.compile, and why
        self.original_calls: Counter = Counter()  # reason -> calls run by the model's own forward
        self.compiled = None  # torch.compile route for calls with KV caches
        self.compiled_reports: list = []
        self.compile_reason = ""  # what the calls now going through torch.compile are (their graphs' reports)
        self._lock = threading.RLock()

    # -- the call ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        bound = self.signature.bind(args, kwargs)
        if bound is None:
            return self._original(args, kwargs, UNNAMED)
        key = call_key(bound, self.modules)
        if bound.get("use_cache") is True:
            return self._compiled_call(args, kwargs, "a call with a KV cache")
        if is_opaque(key):
            return self._compiled_call(args, kwargs, "a call with inputs no captured graph takes "
                                                     f"({', '.join(opaque_types(key))})")
        if key in self.uncaptured:
            return self._compiled_call(args, kwargs, self.uncaptured[key])
        if key in self.refused:
            return self._original(args, kwargs, self.refused[key])
        leaves = pytree.tree_leaves(bound)
        spec = self._find(key, leaves)
        if spec is None:
            try:
                spec = self._specialize(key, bound, leaves)
            except InputError as e:  # capture runs the model without its KV cache: the call as made decides
                return self._original(args, kwargs, f"the model raised when run for capture ({e})")
            if spec is None and key in self.uncaptured:
                return self._compiled_call(args, kwargs, self.uncaptured[key])
            if spec is None:
                return self._original(args, kwargs, self.refused[key])
        try:
            return spec.run(leaves)
        except FxbtError:
            raise
        except RecomputeCall as e:  # a check in the graph found the fast path cannot serve this call
            return self._original(args, kwargs, str(e), as_captured=True)
        except Exception as e:  # noqa: BLE001 - whatever broke, the model's own forward decides
            return self._original(args, kwargs, f"the optimized graph raised {type(e).__name__}: {e}",
                                  as_captured=True)

    # -- finding and making specializations ------------------------------------------------------
    def _find(self, key, leaves) -> Specialization | None:
        for spec in list(self.specializations):
            if spec.key != key or not spec.shapes(leaves):
                continue
            if not spec.state.holds():  # the model changed: this graph can never serve it again
                self._drop(spec, spec.state.failing(self.model))
                continue
            if self.specializations[0] is not spec:
                self.specializations.remove(spec)
                self.specializations.insert(0, spec)
            return spec
        return None

    def _specialize(self, key, bound, leaves) -> Specialization | None:
        with self._lock:
            spec = self._find(key, leaves)  # another thread may have made it meanwhile
            if spec is not None:
                return spec
            reason = self._why_new(key, leaves)
            try:
                spec = build(self.model, bound, key, self.options, reason)
            except CaptureError as e:
                if not self._compile_instead(key, e):
                    self.refused[key] = f"no specialization could be captured for this kind of call ({e.short()})"
                    self.history.append(f"refused: {reason}: {e.short()}")
                return None
            self.specializations.insert(0, spec)
            self.history.append(f"specialization made: {reason}")
            while len(self.specializations) > self.options.max_specializations:
                self._drop(self.specializations[-1], "least recently used, over the limit of "
                                                     f"{self.options.max_specializations} specializations")
            return spec

    def _why_new(self, key, leaves) -> str:
        same_kind = [s for s in self.specializations if s.key == key]
        if same_kind:
            return f"input sizes outside the guards of the others ({same_kind[0].shapes.failing(leaves)})"
        if self.specializations:
            return describe_key_difference(key, [s.key for s in reversed(self.specializations)])
        dropped = [h for h in self.history if h.startswith("specialization dropped")]
        return dropped[-1].replace("specialization dropped: ", "the model changed: ") if dropped else "first call"

    def _drop(self, spec: Specialization, why: str) -> None:
        if spec in self.specializations:
            self.specializations.remove(spec)
            self.history.append(f"specialization dropped: {why}")
        self.modules = list(self.model.modules())  # the module tree may have changed

    def add(self, example_args: tuple, example_kwargs: dict, reason: str) -> Specialization:
        """Make a specialization for an example call now (``fxbt.optimize`` with example inputs)."""
        bound = self.signature.bind(example_args, example_kwargs)
        if bound is None:
            raise InputError(f"the example passes inputs through *args: {UNNAMED}. Optimize a module whose forward "
                             "names them (a wrapper: def forward(self, x, mask): return model(x, mask))")
        key = call_key(bound, self.modules)
        if is_opaque(key):
            raise InputError("the example inputs hold objects no captured graph can take (a KV cache?); "
                             "optimize with tensor inputs: calls with a cache run through torch.compile")
        try:
            spec = build(self.model, bound, key, self.options, reason)
        except CaptureError as e:
            if not self._compile_instead(key, e):
                raise
            from .capture import inputs_kept

            if python_state.hooked(self.model):  # a run would call hooks, which may record: the first call compiles
                return None
            # compiled, rewritten and verified now, as a specialization would be; the example and the model's own
            # values (a step counter) left as they were
            kept = PythonState(self.model)
            try:
                with torch.no_grad(), inputs_kept((example_args, example_kwargs)):
                    self._compiled_call(example_args, example_kwargs, self.uncaptured[key])
            finally:
                kept.restore()
            return None
        self.specializations.insert(0, spec)
        self.history.append(f"specialization made: {reason}")
        return spec

    def _compile_instead(self, key, error: CaptureError) -> bool:
        """Calls of this kind go through torch.compile, which breaks the graph where one graph cannot be
        captured; not where the caller chose a frontend, or for a model in training mode (eval() is the fix)."""
        if self.options.frontend is not None or error.training:
            return False
        self.uncaptured[key] = (f"a call no frontend captures as one graph (blocked at {error.blocker}); dynamo "
                                "breaks the graph there" if error.blocker else f"a call no graph of fxbt's serves "
                                                                                f"({error.short()})")
        self.history.append(f"no one graph: {error.short()}; calls of this kind run through torch.compile")
        return True

    # -- the other routes ------------------------------------------------------------------------
    def _original(self, args, kwargs, why: str, as_captured: bool = False):
        """The model's own forward; ``as_captured`` for a call a graph serves otherwise, so that its outputs
        have the graph's form whichever runs it (capture switched the KV cache off: no cache returned)."""
        self.original_calls[why] += 1
        try:
            if not as_captured:
                return self.own_forward(*args, **kwargs)
            from .capture import LOCK, cache_off

            with LOCK, cache_off(self.model):  # configs are shared: one switch at a time
                return self.own_forward(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - typed, with the model's own error attached
            raise InputError(f"the model itself raises on these inputs: {type(e).__name__}: {e}") from e

    def _compiled_call(self, args, kwargs, why: str):
        self.compile_reason = why
        if self.compiled is not None and not python_state.registries_hold(self.compiled_registries):
            # dynamo does not guard on module hooks (skip_nnmodule_hook_guards): its code would run without a
            # hook added since, or with one removed
            self.history.append("torch.compile's graphs dropped: hooks or submodules were added, removed or replaced")
            self.compiled = None
        if self.compiled is None:
            from .backend import compile_route

            self.compiled_registries = python_state.registries(self.model)
            self.compiled = compile_route(self.own_forward, self.options, self.compiled_reports,
                                          lambda: self.compile_reason)
        try:
            return self.compiled(*args, **kwargs)
        except FxbtError:
            raise
        except Exception as e:  # noqa: BLE001
            return self._original(args, kwargs, f"torch.compile raised {type(e).__name__}: {e}")

    def __getstate__(self):  # reached only through a copy of fxbt's own objects, never the model's
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "compiled", "compiled_registries")}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.RLock(), compiled=None)


def build(model: torch.nn.Module, bound: dict, key: tuple, options: Options, reason: str) -> Specialization:
    """Capture, rewrite and verify a graph for one kind of call."""
    from . import registry
    from .capture import capture, inputs_kept
    from .report import Report
    from .rewrite import apply_and_verify

    from .stages import stage

    with stage("rules"):
        rules = registry.select(options.patterns)
    with inputs_kept(bound):  # the call's (or example's) tensors as they were: the call itself runs after
        captured = capture(model, bound, options.frontend)
        gm = captured.gm
        report = Report(captured.frontend, captured.failures, captured.notes, reason=reason)
        apply_and_verify(gm, rules, report, {"encoder_impl": options.encoder_impl}, captured.flat_inputs,
                         options.verify)
    gm.fxbt_report = report
    return Specialization(key, captured.shapes, StateGuard(model), gm, reason, recompute.constants(gm),
                          recompute.replayable(gm, key[1]), captured.own_gradients)


# --- installing -------------------------------------------------------------------------------------


class OptimizedForward:
    """``model.forward`` while fxbt optimizes the model: the dispatcher, with the model's own signature
    (pipelines and ``generate()`` read it to choose what to pass)."""

    def __init__(self, dispatcher: Optimized):
        self.dispatcher = dispatcher
        self.__signature__ = inspect.signature(dispatcher.own_forward)
        self.__wrapped__ = dispatcher.own_forward
        self.__doc__ = getattr(dispatcher.own_forward, "__doc__", None)

    def __call__(self, *args, **kwargs):
        return self.dispatcher.forward(*args, **kwargs)

    def __deepcopy__(self, memo):  # a copy of the model is the plain model, as with nn.Module.compile()
        return _own_forward(memo.get(id(self.dispatcher.model), self.dispatcher.model))

    def __reduce__(self):
        return _own_forward, (self.dispatcher.model,)


def _own_forward(model: torch.nn.Module):
    return types.MethodType(type(model).forward, model)


def installed(module: torch.nn.Module) -> Optimized | None:
    found = module.__dict__.get("forward")
    return found.dispatcher if isinstance(found, OptimizedForward) else None


def install(module: torch.nn.Module, dispatcher: Optimized) -> None:
    module.forward = OptimizedForward(dispatcher)


def uninstall(module: torch.nn.Module) -> None:
    dispatcher = installed(module)
    if dispatcher is None:
        return
    own = dispatcher.own_forward
    if getattr(own, "__func__", None) is type(module).forward and getattr(own, "__self__", None) is module:
        del module.forward
    else:  # a forward set on the instance before fxbt (accelerate's hooks, say): put it back
        module.forward = own


@contextlib.contextmanager
def detached(model: torch.nn.Module):
    """The model's own forward for the duration, also when fxbt optimized it (capture traces the model), and
    none of the model's own hooks: they run around the dispatcher, as around any forward, so a graph that
    holds them would have them run twice."""
    dispatcher = installed(model)
    hooks = {name: getattr(model, name) for name in _ROOT_HOOKS}
    for name, found in hooks.items():
        setattr(model, name, type(found)())
    if dispatcher is not None:
        model.forward = dispatcher.own_forward
    try:
        yield model
    finally:
        if dispatcher is not None:
            model.forward = OptimizedForward(dispatcher)
        for name, found in hooks.items():
            setattr(model, name, found)


_ROOT_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")
