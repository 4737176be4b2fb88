"""What a specialization was captured and proven under, checked on every call.

A specialization (a captured, rewritten and verified graph) serves a call only when:

- the call is of the same kind (`call_key`): the same inputs given, the same non-tensor values
  (``output_hidden_states=True``, ``return_dict=False``), every tensor of the same dtype, rank and
  device, every module of the model in the same training mode, and the same tensor inputs sharing memory
  (dynamo captures one tensor given for two inputs as one graph input);
- its input sizes pass the capture's `ShapeGuard` (fxbt/shapes.py);
- the model still holds the parameter and buffer objects the graph reads, with the dtype, device and
  shape they had (`StateGuard`). The graph reads parameters through these objects, so in-place changes
  (``load_state_dict``, an optimizer step) are seen as they happen; a replaced object
  (``module.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``, a buffer ``.to()``
  replaced, a submodule swapped) fails the guard and the call gets a new specialization.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import InputError
from .python_state import PythonState

OPAQUE = "opaque"  # a non-tensor input that is not a plain value (a KV cache object): no graph can take it


class Signature:
    """The model's forward signature: binds a call to parameter names, like Python would."""

    def __init__(self, model: torch.nn.Module):
        sig = inspect.signature(model.forward)
        kinds = {p.name: p.kind for p in sig.parameters.values()}
        self.params = [n for n, k in kinds.items() if k not in (inspect.Parameter.VAR_POSITIONAL,
                                                                inspect.Parameter.VAR_KEYWORD)]
        self.defaults = {p.name: p.default for p in sig.parameters.values() if p.default is not p.empty}
        self.var_keyword = inspect.Parameter.VAR_KEYWORD in kinds.values()
        self.var_positional = inspect.Parameter.VAR_POSITIONAL in kinds.values()

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """The inputs of a call by name, in parameter order; inputs equal to their default are left out. None for a
        call that passes inputs through ``*args``: they have no name for a graph to take them by."""
        if len(args) > len(self.params) and self.var_positional:
            return None
        if len(args) > len(self.params):
            raise InputError(f"{len(args)} positional inputs given; the model takes at most {len(self.params)}")
        bound = dict(zip(self.params, args))
        for name, value in kwargs.items():
            if name in bound:
                raise InputError(f"input {name!r} given both positionally and by keyword")
            if name not in self.params and not self.var_keyword:
                raise InputError(f"unknown input {name!r}; the model takes {', '.join(self.params)}")
            bound[name] = value
        return {n: v for n, v in bound.items() if not _is_default(v, self.defaults.get(n, inspect.Parameter.empty))}


def _is_default(value, default) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return value is default
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # noqa: BLE001 - an object without a usable == is not its default
        return False


def call_key(bound: dict[str, Any], modules: list[torch.nn.Module]) -> tuple:
    """What a graph is captured for, apart from sizes: one hashable value per call kind."""
    inputs = tuple((name, _describe(value)) for name, value in bound.items())
    return inputs, tuple(m.training for m in modules), _sharing(bound)


def _sharing(bound: dict[str, Any]) -> tuple:
    """Per tensor input, the first tensor input sharing its memory (itself where none does): dynamo captures
    one tensor given twice as one graph input, so a graph is used only for calls that share memory alike."""
    first: dict = {}
    tensors = [x for x in pytree.tree_leaves(bound) if isinstance(x, torch.Tensor)]
    return tuple(first.setdefault(_storage(x), i) for i, x in enumerate(tensors))


def _storage(x: torch.Tensor):
    try:
        ptr = x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # nested, sparse or functional tensors: identity alone
        ptr = 0
    return (x.device, ptr) if ptr else id(x)


def _describe(value):
    leaves, spec = pytree.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:
        return _leaf(value)
    return str(spec), tuple(_leaf(x) for x in leaves)


def _leaf(x):
    if isinstance(x, torch.Tensor):
        return "tensor", x.dtype, x.dim(), x.device, x.is_nested
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
        return "value", type(x).__name__, x
    return OPAQUE, type(x).__qualname__


def is_opaque(key: tuple) -> bool:
    return OPAQUE in repr(key[0])


def opaque_types(key: tuple) -> list[str]:
    """The types of a call's inputs no captured graph takes (a KV cache, a tokenizer's BatchEncoding)."""
    found = []

    def walk(x):
        if isinstance(x, tuple) and len(x) == 2 and x[0] == OPAQUE:
            found.append(x[1])
        elif isinstance(x, tuple):
            for y in x:
                walk(y)

    walk(key[0])
    return sorted(set(found))


def describe_key_difference(key: tuple, others: list[tuple]) -> str:
    """Why a call's key is none of ``others``, in words, against the closest of them, for the report."""
    def differences(other):
        mine, theirs = dict(key[0]), dict(other[0])
        found = []
        for name in list(mine) + [n for n in theirs if n not in mine]:
            if name not in theirs:
                found.append(f"input {name} given")
            elif name not in mine:
                found.append(f"input {name} not given")
            elif mine[name] != theirs[name]:
                found.append(f"input {name} is {_words(mine[name])}, not {_words(theirs[name])}")
        if key[1] != other[1]:
            found.append("training mode switched" if any(key[1]) != any(other[1]) else
                         "a submodule's training mode changed")
        if key[2] != other[2]:
            found.append("tensor inputs share memory differently (one tensor given for two inputs, or views of one)")
        return found

    closest = min((differences(o) for o in others), key=len)
    return "; ".join(closest) or "another kind of call"


def _words(desc) -> str:
    if isinstance(desc, tuple) and desc and desc[0] == "tensor":
        return f"a {desc[2]}-d {str(desc[1]).replace('torch.', '')} tensor" + (
            f" on {desc[3]}" if desc[3].type != "cpu" else "")
    if isinstance(desc, tuple) and desc and desc[0] == "value":
        return repr(desc[2])
    return str(desc)


class StateGuard:
    """The parameters, buffers and submodules a graph was captured with, as objects, with their metadata."""

    def __init__(self, model: torch.nn.Module):
        self.values = PythonState(model)  # its registries check the submodules per call
        self.edges = [(parent, name, child) for parent in model.modules()  # which one changed, for the message
                      for name, child in parent._modules.items() if child is not None]
        self.tensors = [(module, store, name, t, _meta(t)) for module in model.modules()
                        for store in ("_parameters", "_buffers")
                        for name, t in getattr(module, store).items() if t is not None]

    def holds(self) -> bool:
        return (all(getattr(m, store).get(name) is t and _meta(t) == meta for m, store, name, t, meta in self.tensors)
                and self.values.holds())

    def failing(self, model: torch.nn.Module) -> str:
        paths = {m: n for n, m in model.named_modules()}
        for parent, name, child in self.edges:
            if parent._modules.get(name) is not child:
                return f"submodule {_join(paths.get(parent, '?'), name)} was replaced"
        for m, store, name, t, meta in self.tensors:
            now = getattr(m, store).get(name)
            what = "parameter" if store == "_parameters" else "buffer"
            if now is not t:
                return f"{what} {_join(paths.get(m, '?'), name)} was replaced by another tensor"
            if _meta(now) != meta:
                return f"{what} {_join(paths.get(m, '?'), name)} changed dtype, device or shape"
        return self.values.failing()


def _meta(t: torch.Tensor):
    return t.dtype, t.device, t.shape


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
