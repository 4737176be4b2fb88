"""The Python values a model's forward reads besides its inputs, parameters and buffers.

A captured graph holds the values its trace read as constants: a module's ``scale`` or ``eps``, a flag,
a config field (``config.output_hidden_states``), an activation chosen by attribute, a global of the
forward's module; it runs no ``forward`` set on a submodule. So a graph may serve a call only while all of
these are what they were when it was captured (`PythonState`, checked on every call with the other guards).
A forward that changes such a value itself (a step counter, an attention map it stores on ``self``) cannot
be repeated by a graph at all (`changes_itself`). Forward hooks on submodules are traced into the graph by
dynamo, the only frontend that runs them, where the guard sees all they read (`transparent`); the others
(`opaque_hooks`) cannot be carried by a graph either.
"""
from __future__ import annotations

import copy
import dis
import enum
import types
from collections.abc import Mapping
from operator import itemgetter

import torch

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum,
          type, range, slice)
_MODULE_OWN = frozenset(vars(torch.nn.Module())) - {"training"}  # what every module keeps for itself
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
# globals holding state a library's forward sets and resets within every call: transformers 5's output
# recorder, whose hooks record only while the forward asking for hidden states runs (the call's key says so)
_PER_CALL_STATE = {"transformers.utils.output_capturing": ("_active_collector",)}
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


class _Cells(Mapping):
    """A function's closure read like a namespace: each free variable's value now (a hook's ``scale``)."""

    def __init__(self, fn: types.FunctionType):
        self.cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))

    def __getitem__(self, name):
        try:
            return self.cells[name].cell_contents
        except ValueError:  # a free variable not bound yet
            raise KeyError(name) from None

    def __setitem__(self, name, value):
        self.cells[name].cell_contents = value

    def __iter__(self):
        return (name for name in self.cells if name in self)

    def __len__(self):
        return sum(1 for _ in self)


class _FunctionParts(Mapping):
    """A function's code and defaults read like a namespace: a hook whose ``__code__`` is swapped is another."""

    NAMES = ("__code__", "__defaults__", "__kwdefaults__")

    def __init__(self, fn: types.FunctionType):
        self.fn = fn

    def __getitem__(self, name):
        return getattr(self.fn, name)

    def __setitem__(self, name, value):
        setattr(self.fn, name, value)

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self):
        return len(self.NAMES)


def _contents(value, depth: int = 0):
    """What a container holds, by identity, and what the containers in it hold: a list a forward appends to
    (``self.maps[name].append(...)``) is the same list with more in it."""
    if depth > _DEPTH:
        return None
    if isinstance(value, (list, set, frozenset, tuple)):
        return tuple((id(v), _contents(v, depth + 1)) for v in value)
    if isinstance(value, dict):
        return tuple((id(k), id(v), _contents(v, depth + 1)) for k, v in value.items())
    return None


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
        self._keys = frozenset(d) if sized else None

    def values_hold(self) -> bool:
        """The plain values alone."""
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

    def contents(self) -> tuple:
        return tuple(_contents(v) for v in self.kept)

    def restore(self) -> None:
        """Plain values as they were (a container refilled in place), objects back where they were, and, in a
        namespace read whole, tensors stored since removed (an activation a hook stored on its module; not the
        flags a library sets once, as transformers does when it installs its hooks, which stay installed)."""
        for key, was in zip(self.other, self.kept):
            if self.d.get(key, _ABSENT) is not was:
                self.d[key] = was
        if self.size is not None and len(self.d) != self.size:
            for key in [k for k, v in self.d.items() if k not in self._keys and isinstance(v, torch.Tensor)]:
                del self.d[key]
        for key, was in zip(self.plain, self.values):
            now = self.d.get(key, _ABSENT)
            if now == was:
                continue
            if type(now) is not type(was) or not isinstance(now, (list, dict, set)):
                self.d[key] = copy.deepcopy(was)
            elif isinstance(now, list):  # the same container refilled: others (a hook's caller) hold it too
                now[:] = copy.deepcopy(was)
            else:
                now.clear()
                now.update(copy.deepcopy(was))

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
        seen: set[int] = set()
        functions = {type(m).forward for m in model.modules()}  # code whose globals (and callees') are read
        self.registries = registries(model)
        for path, module in model.named_modules():
            label = path or type(model).__name__
            skip = ("forward",) if module is model else ()  # the root's forward is fxbt's dispatcher
            self._add(vars(module), label, [k for k in vars(module) if k not in _MODULE_OWN and k not in skip], seen, 0)
            if module is not model:  # the root's hooks run around the dispatcher, as ever
                for hook in (h for name in _HOOKS for h in getattr(module, name).values()):
                    self._add_function(hook, f"a hook of {label}", seen, 0, functions)
        for globs, names, where in _globals_read_by(functions):
            # a module's globals grow as it imports: only these names matter, not its size
            self.spaces.append(_Namespace(globs, f"a global of {where}", sorted(names), False))

    def _add_function(self, fn, label: str, seen: set, depth: int, functions: set) -> None:
        """A hook: its closure's values and the objects in it, the globals its code reads, and the same of the
        functions it closes over; a bound method's object, a callable object's fields."""
        owner = getattr(fn, "__self__", None)
        if owner is not None and _read_through(owner) and id(owner) not in seen:
            seen.add(id(owner))
            self._add(vars(owner), f"{label} (its object)", list(vars(owner)), seen, depth + 1)
        fn = getattr(fn, "__func__", fn)
        if not isinstance(fn, types.FunctionType):
            if _read_through(fn) and id(fn) not in seen:
                seen.add(id(fn))
                self._add(vars(fn), label, list(vars(fn)), seen, depth + 1)
            return
        if id(fn) in seen:
            return
        seen.add(id(fn))
        functions.add(fn)
        self._add(_FunctionParts(fn), f"{label} (its code)", list(_FunctionParts.NAMES), seen, _DEPTH)
        cells = _Cells(fn)
        self._add(cells, label, list(cells), seen, depth)
        for name in cells:
            if isinstance(cells[name], (types.FunctionType, types.MethodType)) and depth < _DEPTH:
                self._add_function(cells[name], label, seen, depth + 1, functions)

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
        return all(s.holds() for s in self.spaces) and registries_hold(self.registries)

    def restore(self) -> None:
        """Put back the plain values (numbers, flags, ...) that changed since the snapshot."""
        for s in self.spaces:
            s.restore()

    def failing(self) -> str:
        for s in self.spaces:
            if not s.holds():
                return s.failing() or f"{s.label} changed"
        return next(iter(_registries_changed(self.registries)), "")


def _globals_read_by(functions) -> list[tuple[dict, set, str]]:
    """(globals, the names read from them, whose they are) for the code of ``functions`` and of the functions
    they call by a global name (``apply_rotary_pos_emb``), and theirs: a helper's constant counts, and so does a
    global list a hook appends to, or a helper replaced after capture."""
    found: dict[int, tuple[dict, set, str]] = {}
    seen: set[int] = set()
    todo = [(fn, 0) for fn in functions]
    while todo:
        fn, depth = todo.pop()
        fn = getattr(fn, "__func__", fn)
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        globs, names = _globals_read(fn)
        if not names:
            continue
        _, read, _ = found.setdefault(id(globs), (globs, set(), getattr(fn, "__module__", None) or "?"))
        for name in names:
            value = globs[name]
            if not isinstance(value, types.ModuleType):  # ``torch``, ``F``: the same module as long as we run
                read.add(name)
            if isinstance(value, types.FunctionType) and depth < _DEPTH:
                todo.append((value, depth + 1))
    return [entry for entry in found.values() if entry[1]]


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


def registries(model: torch.nn.Module) -> list[tuple[dict, tuple, str]]:
    """(dict, its keys now, what it is) for every module's submodules and (but the root's, which run around
    fxbt's dispatcher) hooks, and torch's global module hooks, which run on every module of the model."""
    from torch.nn.modules import module as nn_module

    found = [(getattr(nn_module, name), _entries(getattr(nn_module, name)), "torch's global module hooks")
             for name in _GLOBAL_HOOKS]
    for path, module in model.named_modules():
        label = path or type(model).__name__
        found.append((module._modules, _entries(module._modules), f"the submodules of {label}"))
        if module is not model:
            found += [(getattr(module, h), _entries(getattr(module, h)), f"the hooks of {label}") for h in _HOOKS]
    return found


def _entries(d: dict) -> tuple:
    """Keys and what is there, by identity: a hook replaced under its handle's id is another hook."""
    return tuple((k, id(v)) for k, v in d.items())


def registries_hold(found) -> bool:
    # most dicts are empty (hooks): their length says all, and costs no tuple
    return all(len(d) == len(entries) and (not entries or _entries(d) == entries) for d, entries, _ in found)


def _registries_changed(found) -> list[str]:
    return [f"{what} were added, removed or replaced" for d, entries, what in found if _entries(d) != entries]


def hooked(model: torch.nn.Module) -> list[str]:
    """Submodules with forward hooks, and global module hooks."""
    found = [path for path, m in model.named_modules() if m is not model and (m._forward_hooks or m._forward_pre_hooks)]
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        found.append("every module (global hooks)")
    return found


def opaque_hooks(model: torch.nn.Module) -> list[str]:
    """The hooks a graph cannot carry, by where they are: global module hooks, and hooks of submodules that
    read anything the Python-values guard cannot see (`transparent`)."""
    from torch.nn.modules import module as nn_module

    found = ["every module (global hooks)"] if any(getattr(nn_module, h) for h in _GLOBAL_HOOKS) else []
    for path, m in model.named_modules():
        if m is not model and not all(transparent(h) for name in _HOOKS for h in getattr(m, name).values()):
            found.append(path)
    return found


def transparent(fn, depth: int = 0) -> bool:
    """A function whose every read the guard checks: plain defaults, a closure of plain values and such functions,
    and globals that are plain values or such functions. Not a partial, a bound method or a callable object, nor
    a function closing over or loading an object, a class or a module: their fields (a tensor in a dict, an
    external module's weights, ``os.environ``, a class attribute) may change unseen. transformers'
    output-recording hooks read one object besides: the per-call collector their model's forward sets and
    clears around every call (`_PER_CALL_STATE`)."""
    if not isinstance(fn, types.FunctionType) or depth > _DEPTH:
        return False
    if not _constant(fn.__defaults__) or not _constant(fn.__kwdefaults__):
        return False
    cells = _Cells(fn)
    if not all(_constant(cells[n]) or transparent(cells[n], depth + 1) for n in cells):
        return False
    globs, names = _globals_read(fn)
    allowed = _PER_CALL_STATE.get(fn.__module__, ())
    return all(_constant(v) or name in allowed or transparent(v, depth + 1) for name in names for v in (globs[name],))


def _constant(value) -> bool:
    """A plain value no one can change in place: a list or dict a hook reads, even empty, is one it may fill, and
    a class has attributes."""
    return _plain(value) and not any(isinstance(v, (list, dict, set, type)) for v in _walk(value))


def _walk(value):
    yield value
    if isinstance(value, (tuple, frozenset)):
        for v in value:
            yield from _walk(v)


def changes_itself(model: torch.nn.Module, run) -> list[str]:
    """What ``run()``, a call of the model's forward, changes of the model's values, the objects it holds and its
    hooks': a step counter, a flag it flips, a tensor it stores on ``self`` (attention maps kept for a look
    later), a list a hook appends to. Call it after a first call, which may fill caches (rotary tables built on
    first use): a second must change nothing, for a graph changes nothing."""
    before = PythonState(model)
    contents = [s.contents() for s in before.spaces]
    run()
    changed = [s.failing() or f"{s.label} changed" for s, was in zip(before.spaces, contents)
               if not s.holds() or s.contents() != was]
    return changed + _registries_changed(before.registries)
