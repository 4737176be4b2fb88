"""The Python values a model's forward reads besides its inputs, parameters and buffers.

A captured graph holds the values its trace read as constants: a module's ``scale`` or ``eps``, a flag,
a config field (``config.output_hidden_states``), an activation chosen by attribute, a global of the
forward's module; it runs no hook of a submodule and no ``forward`` set on one. So a graph may serve a
call only while all of these are what they were when it was captured (`PythonState`, checked on every
call with the other guards). A forward that changes such a value itself (a step counter) cannot be
repeated by a graph at all (`changes_itself`); nor can hooks on submodules be run by one (`hooked`).
"""
from __future__ import annotations

import copy
import dis
import enum
import types
from operator import itemgetter

import torch

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum,
          type, range, slice)
_MODULE_OWN = frozenset(vars(torch.nn.Module())) - {"training"}  # what every module keeps for itself
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_DEPTH = 2  # objects held by a module (a config), and theirs (a sub-config), are read through
_MAX_FIELDS = 512  # beyond this an object is compared by identity alone
_ABSENT = object()


def _plain(value, depth: int = 0) -> bool:
    """A value equal to a copy of it means the same to a forward: numbers, strings, dtypes, and containers of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, set, frozenset)) and depth < 3 and len(value) <= _MAX_FIELDS:
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3 and len(value) <= _MAX_FIELDS:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _read_through(value) -> bool:
    """An object whose own fields a forward reads (a config), as opposed to a tensor, module, function or class."""
    return (hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, torch.nn.Module, types.FunctionType,
                                                                   types.MethodType, types.ModuleType, type))
            and isinstance(vars(value), dict) and len(vars(value)) <= _MAX_FIELDS)


def _tuple_getter(keys):
    if not keys:
        return lambda d: ()
    return itemgetter(*keys) if len(keys) > 1 else (lambda d, k=keys[0]: (d[k],))


class _Namespace:
    """One ``__dict__`` (or globals) at some keys: the plain values there, compared by value against a copy, and
    the objects at the others, compared by identity; and its size (None: not checked)."""

    def __init__(self, d: dict, label: str, keys, sized: bool = True):
        self.d, self.label, self.size = d, label, len(d) if sized else None
        self.plain = tuple(k for k in keys if _plain(d[k]))
        self.other = tuple(k for k in keys if not _plain(d[k]))
        self.values = copy.deepcopy(tuple(d[k] for k in self.plain))
        self.kept = tuple(d[k] for k in self.other)  # the objects stay alive, so their ids stay theirs
        self._ids = tuple(map(id, self.kept))
        self._values_of, self._objects_of = _tuple_getter(self.plain), _tuple_getter(self.other)

    def values_hold(self) -> bool:
        """The plain values alone (a forward replacing a cached tensor on ``self`` changes no plain value)."""
        try:
            return self._values_of(self.d) == self.values
        except KeyError:
            return False

    def holds(self) -> bool:
        try:
            return ((self.size is None or len(self.d) == self.size) and self.values_hold() and
                    tuple(map(id, self._objects_of(self.d))) == self._ids)
        except KeyError:
            return False

    def restore(self) -> None:
        for key, was in zip(self.plain, self.values):
            if self.d.get(key, _ABSENT) != was:
                self.d[key] = copy.deepcopy(was)

    def failing(self) -> str:
        for key in self.plain + self.other:
            if key not in self.d:
                return f"{self.label}.{key} was deleted"
        for key, was in zip(self.plain, self.values):
            if self.d[key] != was:
                return f"{self.label}.{key} changed from {was!r:.60} to {self.d[key]!r:.60}"
        for key, was in zip(self.other, self.kept):
            if self.d[key] is not was:
                return f"{self.label}.{key} was replaced"
        if self.size is not None and len(self.d) != self.size:
            return f"{self.label} gained or lost attributes"
        return ""


class PythonState:
    """Every module's own values, the objects they hold (configs) and theirs, the hooks of submodules, and the
    plain globals the modules' ``forward`` code reads; as they are now."""

    def __init__(self, model: torch.nn.Module):
        self.spaces: list[_Namespace] = []
        self.registries = []  # (a module's hooks or submodules dict, its keys, what it is)
        seen: set[int] = set()
        for path, module in model.named_modules():
            label = path or type(model).__name__
            skip = ("forward",) if module is model else ()  # the root's forward is fxbt's dispatcher
            self._add(vars(module), label, [k for k in vars(module) if k not in _MODULE_OWN and k not in skip], seen, 0)
            self.registries.append((module._modules, tuple(module._modules), f"the submodules of {label}"))
            if module is not model:  # the root's hooks run around the dispatcher, as ever
                self.registries += [(getattr(module, h), tuple(getattr(module, h)), f"the hooks of {label}")
                                    for h in _HOOKS]
        for fn in {type(m).forward for m in model.modules()}:
            globs, names = _globals_read(fn)
            plain = [n for n in names if _plain(globs[n])]
            if plain:  # a module's globals grow as it imports: only these names matter, not its size
                self.spaces.append(_Namespace(globs, f"a global of {getattr(fn, '__module__', '?')}", plain, False))

    def _add(self, d: dict, label: str, keys, seen: set, depth: int) -> None:
        self.spaces.append(_Namespace(d, label, keys))
        if depth >= _DEPTH:
            return
        for key in keys:
            value = d[key]
            if _read_through(value) and id(value) not in seen:
                seen.add(id(value))
                self._add(vars(value), f"{label}.{key}", list(vars(value)), seen, depth + 1)

    def holds(self) -> bool:
        return all(s.holds() for s in self.spaces) and all(tuple(d) == keys for d, keys, _ in self.registries)

    def restore(self) -> None:
        """Put back the plain values (numbers, flags, ...) that changed since the snapshot."""
        for s in self.spaces:
            s.restore()

    def failing(self) -> str:
        for s in self.spaces:
            if not s.holds():
                return s.failing() or f"{s.label} changed"
        for d, keys, what in self.registries:
            if tuple(d) != keys:
                return f"{what} were added or removed"
        return ""


def _globals_read(fn) -> tuple[dict, list[str]]:
    """``fn``'s globals and the names its code (and the code nested in it) loads from them."""
    fn = getattr(fn, "__func__", fn)
    code, globs = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or globs is None:
        return {}, []
    names, stack = set(), [code]
    while stack:
        c = stack.pop()
        names |= {i.argval for i in dis.get_instructions(c) if i.opname == "LOAD_GLOBAL" and i.argval in globs}
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return globs, sorted(names)


def hooked(model: torch.nn.Module) -> list[str]:
    """Submodules with forward hooks, and global module hooks: a graph runs none of them."""
    found = [path for path, m in model.named_modules() if m is not model and (m._forward_hooks or m._forward_pre_hooks)]
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        found.append("every module (global hooks)")
    return found


def changes_itself(model: torch.nn.Module, run) -> list[str]:
    """The plain values of the model (and of the objects it holds) that ``run()``, a call of its forward, changes:
    a step counter, a flag it flips. Call it after a first call, which may fill caches: a second must change
    none. Tensors a forward keeps on ``self`` (rotary tables) are caches the graph reads as they were."""
    before = PythonState(model)
    run()
    return [s.failing() for s in before.spaces if not s.values_hold()]
