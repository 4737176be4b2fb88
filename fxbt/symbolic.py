"""Symbolic sizes for graphs captured by fx or the HF tracer, by propagation rules.

Every input dimension is a symbol; every node's shape follows from its inputs' by a rule per operator:
views and layouts, broadcasting, linear and matmul, reductions, indexing, constructors, convolutions.
Scalars computed from sizes (``x.size(1) // heads``) are symbolic too. The example's concrete shapes
check every rule: a result that disagrees with the example, or an operator without a rule, makes the
node opaque (fresh symbols, so that no proof goes through it).

Where an operator relies on two sizes being equal (broadcasting two sizes that are not 1, a matmul's
inner sizes, a linear's input features), the sizes are unified, and where broadcasting relied on a size
being 1, that size is pinned. Each such fact, and each decision the tracer made on the example's sizes,
becomes a condition of the graph's `ShapeGuard`: a call outside them gets a graph of its own.

This is what dynamo's ShapeEnv does for its graphs, for the operators transformer graphs use, at a few
microseconds per node (fake-tensor propagation costs milliseconds per node).
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any

import sympy
import torch
import torch.fx
from torch.utils._sympy.functions import FloorDiv

from .meta import TensorInfo


class Opaque(Exception):
    """No rule gives this node's shape (or the rule disagrees with the example)."""


class Propagation:
    """Symbolic values of a graph's nodes, the facts they rely on, and the input symbols they are over."""

    def __init__(self, gm: torch.fx.GraphModule, flat_inputs: list):
        self.gm = gm
        self.values: dict[torch.fx.Node, Any] = {}
        self.conditions: list = []  # sympy relations over input symbols that every admitted call satisfies
        self.sources: dict[sympy.Symbol, tuple[int, int]] = {}  # input symbol -> (flat input, dim)
        self.example: dict[sympy.Symbol, int] = {}  # every symbol -> its value on the example
        self.subs: dict[sympy.Symbol, Any] = {}  # unified symbols
        self._fresh = 0
        self.opaque: dict[torch.fx.Node, str] = {}  # why a node has no symbolic value (for logs and tests)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, (node, x) in enumerate(zip(placeholders, flat_inputs)):
            if isinstance(x, torch.Tensor):
                dims = []
                for d, size in enumerate(x.shape):
                    s = sympy.Symbol(f"i{i}_{d}", integer=True, nonnegative=True)
                    self.sources[s], self.example[s] = (i, d), sympy.Integer(int(size))
                    dims.append(s)
                self.values[node] = tuple(dims)
            else:
                self.values[node] = x

    # -- running ----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            try:
                value = _RULES_BY_OP[node.op](self, node)
                self._check(node, value)
            except Exception as e:  # noqa: BLE001 - no rule, or an argument form no rule expected: opaque
                self.opaque[node] = f"{type(e).__name__}: {e}"
                value = self._opaque(node.meta.get("fxbt_val"))
            self.values[node] = value

    def value(self, x):
        """The symbolic value of an argument: a node's, or a constant's (lists and tuples element-wise)."""
        if isinstance(x, torch.fx.Node):
            return self.resolve(self.values[x])
        if isinstance(x, (tuple, list)):
            return type(x)(self.value(v) for v in x)
        if isinstance(x, slice):
            return slice(self.value(x.start), self.value(x.stop), self.value(x.step))
        return x

    def resolve(self, value):
        if isinstance(value, sympy.Basic):
            return _canonical(value.xreplace(self.subs)) if self.subs else value
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        return value

    # -- facts --------------------------------------------------------------------------------------
    def fact(self, relation) -> bool:
        """Record a fact every admitted call satisfies, as a guard condition; False when it is over a size no
        input carries (an opaque node's), so that no call could be checked against it."""
        relation = self.resolve(relation)
        if relation in (sympy.true, True):
            return True
        if relation in (sympy.false, False) or not _truth(relation, self.example):
            raise Opaque(f"{relation} does not hold on the example")
        if not self.expressible(relation):
            return False
        if relation not in self.conditions:
            self.conditions.append(relation)
        return True

    def pin(self, relation) -> None:
        """A fact a result relies on and no operator enforces: a guard condition, or the node is opaque."""
        if not self.fact(relation):
            raise Opaque(f"{relation} is over a size no input carries")

    def unify(self, a, b):
        """Sizes the operator itself requires equal (a matmul's inner sizes): it raises on a call where they
        differ, so the equality holds wherever the graph runs; the guard gets it where it can check it."""
        a, b = self.resolve(_sym(a)), self.resolve(_sym(b))
        if a == b:
            return a
        if _concrete(a, self.example) != _concrete(b, self.example):
            raise Opaque(f"{a} != {b} on the example")
        self.fact(sympy.Eq(a, b))
        target, other = _substitution(a, b, self)
        if target is not None:
            self.subs = {k: v.xreplace({target: other}) if isinstance(v, sympy.Basic) else v for k, v in self.subs.items()}
            self.subs[target] = other
        return self.resolve(a)

    def broadcast(self, *shapes) -> tuple:
        rank = max(len(s) for s in shapes)
        padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
        out = []
        for sizes in zip(*padded):
            result = sympy.Integer(1)
            for size in sizes:
                result = self._broadcast_pair(result, size)
            out.append(result)
        return tuple(out)

    def _broadcast_pair(self, a, b):
        """The size two broadcast sizes make, relying only on facts the guard checks (broadcasting does not
        raise where one size is 1, so an equality here is no operator's requirement)."""
        a, b = self.resolve(_sym(a)), self.resolve(_sym(b))
        if a == b:
            return a
        ca, cb = _concrete(a, self.example), _concrete(b, self.example)
        if ca != 1 and cb != 1:
            if self.fact(sympy.Eq(a, b)):
                return self.unify(a, b)
            for kept in (a, b):  # the other is 1 or equal to it, or broadcasting raises: the result is this one
                if self.fact(sympy.Ne(kept, 1)):
                    return kept
            raise Opaque(f"broadcasting {a} and {b} relies on sizes no input carries")
        if ca == 1 and cb == 1:
            self.pin(sympy.Eq(a, 1))
            self.pin(sympy.Eq(b, 1))
            return sympy.Integer(1)
        one, other = (a, b) if ca == 1 else (b, a)
        if self.fact(sympy.Eq(one, 1)) or self.fact(sympy.Ne(other, 1)):
            return other
        raise Opaque(f"broadcasting {a} and {b} relies on sizes no input carries")

    # -- checks ---------------------------------------------------------------------------------------
    def _check(self, node, value) -> None:
        info = node.meta.get("fxbt_val")
        if isinstance(info, TensorInfo):
            if not isinstance(value, tuple) or len(value) != len(info.shape) or any(
                    _concrete(v, self.example) != c for v, c in zip(value, info.shape)):
                raise Opaque(f"{node.name}: rule gives {value}, example {tuple(info.shape)}")
        elif isinstance(info, bool) or _is_boolean(value):
            if _truth(value, self.example) != info:
                raise Opaque(f"{node.name}: rule gives {value}")
        elif isinstance(info, (int, float)) and isinstance(value, sympy.Basic):
            if not math.isclose(float(_concrete(value, self.example)), float(info), rel_tol=1e-9, abs_tol=1e-12):
                raise Opaque(f"{node.name}: rule gives {value}, example {info}")

    def _opaque(self, info):
        if isinstance(info, TensorInfo):
            return tuple(self._fresh_symbol(size) for size in info.shape)
        if isinstance(info, (tuple, list)):
            return tuple(self._opaque(v) for v in info)
        if isinstance(info, bool):
            return None
        if isinstance(info, int):
            return self._fresh_symbol(info)
        return info if isinstance(info, (float, str, torch.dtype, torch.device, type(None))) else None

    def _fresh_symbol(self, size):
        self._fresh += 1
        s = sympy.Symbol(f"u{self._fresh}", integer=True, nonnegative=True)
        self.example[s] = sympy.Integer(int(size))
        return s

    # -- results --------------------------------------------------------------------------------------
    def expressible(self, relation) -> bool:
        return relation.free_symbols <= self.sources.keys()


def _substitution(a, b, p):
    """Which of two equal sizes to replace by the other: an opaque symbol first, then any symbol."""
    def rank(x):
        if not isinstance(x, sympy.Symbol):
            return 2
        return 0 if x not in p.sources else 1
    if min(rank(a), rank(b)) == 2:
        return None, None
    return (a, b) if rank(a) <= rank(b) else (b, a)


def _is_boolean(value) -> bool:
    return isinstance(value, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanAtom,
                              sympy.logic.boolalg.BooleanFunction))


def _sym(x):
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    return sympy.Integer(x) if isinstance(x, int) else x


def _is_one(x) -> bool:
    return x == 1


def _concrete(x, example):
    if isinstance(x, sympy.Basic):
        value = x.xreplace(example)
        if value.is_number:
            return int(value) if value.is_integer else float(value)
        if value in (sympy.true, sympy.false):
            return bool(value)
        raise Opaque(f"{x} has no value on the example")
    return x


def _truth(x, example):
    return bool(_concrete(x, example)) if isinstance(x, sympy.Basic) else bool(x)


def _canonical(expr):
    """Integer results as Integers; exact floor divisions (s0*8 // 8) as the quotient."""
    if isinstance(expr, sympy.Basic) and expr.has(FloorDiv):
        def exact(e):
            quotient = sympy.cancel(e.args[0] / e.args[1])
            return quotient if sympy.fraction(quotient)[1] == 1 else e
        expr = expr.replace(lambda e: isinstance(e, FloorDiv), exact)
    return expr


def _int(x):
    """A concrete Python int where a rule needs one (a dim index, a chunk count)."""
    if isinstance(x, int):
        return x
    if isinstance(x, sympy.Basic) and x.is_number:
        return int(x)
    raise Opaque(f"{x} is not a fixed number")


def _shape(p: Propagation, x) -> tuple:
    value = p.value(x)
    if not isinstance(value, tuple):
        raise Opaque("not a tensor")
    return value


def _dim(d, rank) -> int:
    d = _int(d)
    return d + rank if d < 0 else d


def _prod(sizes):
    out = sympy.Integer(1)
    for s in sizes:
        out = out * _sym(s)
    return out


# --- rules: one function per family of operators, looked up by target ------------------------------------


def _elementwise(p, node):
    shapes = [_shape(p, a) for a in _tensor_args(p, node)]
    if not shapes:
        raise Opaque("no tensor operand")
    return p.broadcast(*shapes)


def _tensor_args(p, node):
    return [a for a in list(node.args) + list(node.kwargs.values())
            if isinstance(a, torch.fx.Node) and isinstance(p.values.get(a), tuple) and _is_tensor(a)]


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("fxbt_val"), TensorInfo)


def _same_shape(p, node):
    return _shape(p, node.args[0])


def _linear(p, node, weight=None):
    x = _shape(p, node.args[0])
    w = weight if weight is not None else _shape(p, _arg(node, 1, "weight"))
    p.unify(x[-1], w[-1])
    return x[:-1] + (w[0],)


def _matmul(p, node):
    a, b = _shape(p, node.args[0]), _shape(p, node.args[1])
    if len(a) == 1 and len(b) == 1:
        p.unify(a[0], b[0])
        return ()
    a2, b2 = (a if len(a) > 1 else (1,) + a), (b if len(b) > 1 else b + (1,))
    p.unify(a2[-1], b2[-2])
    batch = p.broadcast(a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _baddbmm(p, node):
    product = _matmul_of(p, _arg(node, 1, "batch1"), _arg(node, 2, "batch2"))
    return p.broadcast(_shape(p, _arg(node, 0, "input")), product)


def _matmul_of(p, a, b):
    a, b = _shape(p, a), _shape(p, b)
    p.unify(a[-1], b[-2])
    return p.broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


def _einsum(p, node):
    equation = node.args[0].replace(" ", "")
    operands = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
    if "." in equation or "->" not in equation:
        raise Opaque("einsum with ellipsis or implicit output")
    inputs, output = equation.split("->")
    sizes: dict[str, Any] = {}
    for letters, operand in zip(inputs.split(","), operands):
        shape = _shape(p, operand)
        for letter, size in zip(letters, shape):
            sizes[letter] = p._broadcast_pair(sizes[letter], size) if letter in sizes else size
    return tuple(sizes[letter] for letter in output)


def _view(p, node):
    x = _shape(p, node.args[0])
    target = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.fx.Node))) \
        else node.args[1]
    if "shape" in node.kwargs or "size" in node.kwargs:
        target = node.kwargs.get("shape", node.kwargs.get("size"))
    sizes = list(p.value(target))
    if isinstance(sizes, tuple):
        sizes = list(sizes)
    total = _prod(x)
    if any(_is_minus_one(s) for s in sizes):
        known = _prod(s for s in sizes if not _is_minus_one(s))
        sizes = [_canonical(FloorDiv(total, known)) if _is_minus_one(s) else s for s in sizes]
    return tuple(_sym(s) for s in sizes)


def _is_minus_one(s) -> bool:
    return isinstance(s, (int, sympy.Integer)) and s == -1


def _view_as(p, node):
    return _shape(p, node.args[1])


def _flatten(p, node):
    x = _shape(p, node.args[0])
    start = _dim(_arg(node, 1, "start_dim", 0), len(x)) if x else 0
    end = _dim(_arg(node, 2, "end_dim", -1), len(x)) if x else 0
    return x[:start] + (_prod(x[start:end + 1]),) + x[end + 1:]


def _unflatten(p, node):
    x = _shape(p, node.args[0])
    d = _dim(_arg(node, 1, "dim"), len(x))
    sizes = list(p.value(_arg(node, 2, "sizes")))
    if any(_is_minus_one(s) for s in sizes):
        known = _prod(s for s in sizes if not _is_minus_one(s))
        sizes = [FloorDiv(x[d], known) if _is_minus_one(s) else s for s in sizes]
    return x[:d] + tuple(_sym(s) for s in sizes) + x[d + 1:]


def _transpose(p, node):
    x = list(_shape(p, node.args[0]))
    a, b = _dim(_arg(node, 1, "dim0"), len(x)), _dim(_arg(node, 2, "dim1"), len(x))
    x[a], x[b] = x[b], x[a]
    return tuple(x)


def _t(p, node):
    x = _shape(p, node.args[0])
    return x[::-1] if len(x) == 2 else x


def _permute(p, node):
    x = _shape(p, node.args[0])
    dims = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))) else node.args[1]
    dims = node.kwargs.get("dims", dims)
    return tuple(x[_dim(d, len(x))] for d in dims)


def _unsqueeze(p, node):
    x = _shape(p, node.args[0])
    d = _dim(_arg(node, 1, "dim"), len(x) + 1)
    return x[:d] + (sympy.Integer(1),) + x[d:]


def _squeeze(p, node):
    x = _shape(p, node.args[0])
    dims = _arg(node, 1, "dim")
    chosen = range(len(x)) if dims is None else [_dim(d, len(x)) for d in (dims if isinstance(dims, (tuple, list))
                                                                        else (dims,))]
    keep = []
    for i, size in enumerate(x):
        if i in chosen and _concrete(size, p.example) == 1:
            p.pin(sympy.Eq(size, 1))
            continue
        if i in chosen:
            p.pin(sympy.Ne(size, 1))
        keep.append(size)
    return tuple(keep)


def _expand(p, node):
    x = _shape(p, node.args[0])
    target = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.fx.Node))) \
        else node.args[1]
    if node.op == "call_method" and node.target == "expand_as":
        return _shape(p, node.args[1])
    sizes = list(p.value(target))
    lead = len(sizes) - len(x)
    out = []
    for i, s in enumerate(sizes):
        if i < lead:
            out.append(_sym(s))
        elif _is_minus_one(s):
            out.append(x[i - lead])
        else:
            out.append(p._broadcast_pair(x[i - lead], s) if x[i - lead] != 1 else _sym(s))
    return tuple(out)


def _repeat(p, node):
    x = _shape(p, node.args[0])
    reps = node.args[1:] if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))) else node.args[1]
    reps = list(p.value(reps))
    x = (1,) * (len(reps) - len(x)) + x
    return tuple(_sym(a) * _sym(r) for a, r in zip(x, reps))


def _repeat_interleave(p, node):
    x = _shape(p, node.args[0])
    repeats, dim = p.value(_arg(node, 1, "repeats")), _arg(node, 2, "dim")
    if isinstance(repeats, tuple) or dim is None:
        raise Opaque("repeat_interleave by a tensor or flattened")
    d = _dim(dim, len(x))
    return x[:d] + (x[d] * _sym(repeats),) + x[d + 1:]


def _cat(p, node):
    tensors = _arg(node, 0, "tensors")
    d = _arg(node, 1, "dim", 0)
    shapes = [_shape(p, t) for t in tensors]
    shapes = [s for s in shapes if not (len(s) == 1 and s[0] == 0)]  # torch skips empty 1-d tensors
    d = _dim(d, len(shapes[0]))
    for s in shapes[1:]:
        for i, (a, b) in enumerate(zip(shapes[0], s)):
            if i != d:
                p.unify(a, b)
    return shapes[0][:d] + (sum((s[d] for s in shapes), sympy.Integer(0)),) + shapes[0][d + 1:]


def _stack(p, node):
    tensors = _arg(node, 0, "tensors")
    shapes = [_shape(p, t) for t in tensors]
    d = _dim(_arg(node, 1, "dim", 0), len(shapes[0]) + 1)
    for s in shapes[1:]:
        for a, b in zip(shapes[0], s):
            p.unify(a, b)
    return shapes[0][:d] + (sympy.Integer(len(shapes)),) + shapes[0][d:]


def _chunk(p, node):
    x = _shape(p, node.args[0])
    chunks, d = _int(_arg(node, 1, "chunks")), _dim(_arg(node, 2, "dim", 0), len(x))
    size = _int(x[d]) if not isinstance(x[d], sympy.Symbol) else None
    if size is None or size % chunks:
        raise Opaque("chunks of a size that can change")
    return tuple(x[:d] + (sympy.Integer(size // chunks),) + x[d + 1:] for _ in range(chunks))


def _split(p, node):
    x = _shape(p, node.args[0])
    sizes, d = p.value(_arg(node, 1, "split_size_or_sections")), _dim(_arg(node, 2, "dim", 0), len(x))
    if isinstance(sizes, (list, tuple)):
        p.unify(x[d], sum((_sym(s) for s in sizes), sympy.Integer(0)))
        return tuple(x[:d] + (_sym(s),) + x[d + 1:] for s in sizes)
    total = _int(x[d]) if x[d].is_number else None
    if total is None:
        raise Opaque("split of a size that can change")
    step = _int(sizes)
    return tuple(x[:d] + (sympy.Integer(min(step, total - i)),) + x[d + 1:] for i in range(0, total, step))


def _unbind(p, node):
    x = _shape(p, node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), len(x))
    return tuple(x[:d] + x[d + 1:] for _ in range(_int(x[d])))


def _getitem(p, node):
    container, index = p.value(node.args[0]), node.args[1]
    if isinstance(node.args[0], torch.fx.Node) and _is_tensor(node.args[0]):
        return _index_tensor(p, _shape(p, node.args[0]), index)
    index = p.value(index)
    if isinstance(container, (tuple, list)):
        if isinstance(index, slice):
            return tuple(container[_int(index.start) if index.start is not None else None:
                                   _int(index.stop) if index.stop is not None else None:
                                   _int(index.step) if index.step is not None else None])
        return container[_int(index)]
    raise Opaque("indexing something that is not a tensor or tuple")


def _index_tensor(p, shape, index):
    index = index if isinstance(index, tuple) else (index,)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise Opaque("several ellipses")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if sum(1 for i in index if isinstance(i, list)) > 1:
        raise Opaque("several index lists")  # advanced indices broadcast together: not followed
    out, d = [], 0
    for item in index:
        if item is Ellipsis:
            span = len(shape) - consumed
            out.extend(shape[d:d + span])
            d += span
        elif item is None:
            out.append(sympy.Integer(1))
        elif isinstance(item, slice):
            out.append(_slice_size(p, shape[d], p.value(item)))
            d += 1
        elif isinstance(item, (int, torch.fx.Node)) and not (isinstance(item, torch.fx.Node) and _is_tensor(item)):
            value = _sym(p.value(item))
            bound = value if _concrete(value, p.example) >= 0 else -value - 1
            p.unify(sympy.Min(bound, shape[d] - 1), bound)  # indexing raises out of range
            d += 1
        elif isinstance(item, list) and item and all(isinstance(i, int) for i in item):
            for i in item:  # one list of positions (Falcon's ``qkv[..., [-2], :]``): its length, where it stands
                bound = sympy.Integer(i if i >= 0 else -i - 1)
                p.unify(sympy.Min(bound, shape[d] - 1), bound)  # indexing raises out of range
            out.append(sympy.Integer(len(item)))
            d += 1
        else:
            raise Opaque("advanced indexing")
    return tuple(out) + tuple(shape[d:])


def _slice_size(p, size, s: slice):
    step = _int(s.step) if s.step is not None else 1
    if step < 1:
        raise Opaque("a slice with a step below 1")
    start = _sym(s.start) if s.start is not None else sympy.Integer(0)
    stop = _sym(s.stop) if s.stop is not None else _sym(size)
    start, stop = _clamped(p, start, size), _clamped(p, stop, size)
    length = stop - start
    if _concrete(length, p.example) < 0:
        raise Opaque("an empty slice")
    p.pin(sympy.Ge(length, 0))
    return length if step == 1 else _canonical(FloorDiv(length + step - 1, step))


def _clamped(p, bound, size):
    """A slice bound as a position in [0, size], with the case the example took pinned."""
    bound, size = _sym(bound), _sym(size)
    b = _concrete(bound, p.example)
    if b < 0:
        bound = size + bound
        b = _concrete(bound, p.example)
    if b > _concrete(size, p.example):
        p.pin(sympy.Ge(bound, size))
        return size
    p.pin(sympy.Le(bound, size))
    return bound


def _size(p, node):
    x = _shape(p, node.args[0])
    d = _arg(node, 1, "dim")
    return x if d is None else x[_dim(d, len(x))]


def _getattr(p, node):
    obj, name = node.args
    if isinstance(obj, torch.fx.Node) and _is_tensor(obj):
        if name == "shape":
            return _shape(p, obj)
        if name == "ndim":
            return sympy.Integer(len(_shape(p, obj)))
        if name == "T":
            return _shape(p, obj)[::-1]
        if name in ("dtype", "device", "is_cuda", "is_nested", "requires_grad"):
            return node.meta.get("fxbt_val")  # fixed by the kind of call (dtypes, devices are in its key)
        raise Opaque(f"attribute {name} of a tensor")
    return _folded(p, node)


def _folded(p, node):
    """An operator on constants only (``torch.finfo(dtype).min``, ``dtype == torch.float16``): its value,
    the same on every call (dtypes and devices are fixed by the call's kind)."""
    args, kwargs = p.value(node.args), {k: p.value(v) for k, v in node.kwargs.items()}
    leaves = list(args) + list(kwargs.values())
    if any(isinstance(v, (sympy.Basic, tuple, list, torch.fx.Node)) for v in leaves):
        raise Opaque("not constant")
    if node.op == "call_method":
        value = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        value = node.target(*args, **kwargs) if node.target is not getattr else getattr(*args)
    return tuple(sympy.Integer(d) for d in value.shape) if isinstance(value, torch.Tensor) else value


def _numel(p, node):
    return _prod(_shape(p, node.args[0]))


def _dim_count(p, node):
    return sympy.Integer(len(_shape(p, node.args[0])))


_SCALAR_OPS = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.neg: operator.neg, operator.pow: operator.pow,
    operator.floordiv: lambda a, b: FloorDiv(a, b), operator.mod: lambda a, b: sympy.Mod(a, b),
    operator.eq: sympy.Eq, operator.ne: sympy.Ne, operator.lt: sympy.Lt, operator.le: sympy.Le,
    operator.gt: sympy.Gt, operator.ge: sympy.Ge, math.sqrt: sympy.sqrt,
}


def _scalar_or_elementwise(p, node):
    """Python arithmetic on sizes, or the same operator on tensors (elementwise)."""
    if any(isinstance(a, torch.fx.Node) and _is_tensor(a) for a in node.args):
        return _elementwise(p, node)
    values = [p.value(a) for a in node.args]
    if node.target is operator.add and all(isinstance(v, (tuple, list)) for v in values):
        return tuple(values[0]) + tuple(values[1])  # sizes concatenated: size()[:-1] + (heads, dim)
    args = [_sym(v) for v in values]
    if not all(isinstance(a, sympy.Basic) or isinstance(a, float) for a in args):
        raise Opaque("not sizes")
    return _canonical(_SCALAR_OPS[node.target](*args))


def _to_int(p, node):
    value = p.value(node.args[0])
    if isinstance(value, sympy.Basic) and value.is_integer:
        return value
    raise Opaque("a non-integer made an int")


def _arange(p, node):
    args = [p.value(a) for a in node.args if not isinstance(a, torch.dtype)]
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
    start, end, step = _sym(start), _sym(end), _sym(step)
    if step != 1:
        raise Opaque("arange with a step")
    return (end - start,)


def _filled(p, node):
    sizes = node.args[0] if len(node.args) == 1 and isinstance(node.args[0], (list, tuple, torch.fx.Node)) \
        else node.args
    sizes = node.kwargs.get("size", sizes)
    if node.target in (torch.full,):
        sizes = _arg(node, 0, "size")
    return tuple(_sym(s) for s in p.value(sizes))


def _like(p, node):
    return _shape(p, node.args[0])


def _reduction(p, node):
    x = _shape(p, node.args[0])
    dim = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dim is None:
        return ()
    dims = {_dim(d, len(x)) for d in (dim if isinstance(dim, (list, tuple)) else (dim,))}
    return tuple(sympy.Integer(1) if i in dims else s for i, s in enumerate(x) if keepdim or i not in dims)


def _max_like(p, node):
    """max/min: elementwise with a second tensor, a reduction with a dim (values and indices), or all."""
    if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) and _is_tensor(node.args[1]):
        return _elementwise(p, node)
    shape = _reduction(p, node)
    return (shape, shape) if _arg(node, 1, "dim") is not None else shape


def _embedding(p, node, weight=None):
    ids = _shape(p, node.args[0])
    w = weight if weight is not None else _shape(p, _arg(node, 1, "weight"))
    return ids + (w[-1],)


def _index_select(p, node):
    x = _shape(p, node.args[0])
    d = _dim(_arg(node, 1, "dim"), len(x))
    index = _shape(p, _arg(node, 2, "index"))
    return x[:d] + index + x[d + 1:]


def _gather(p, node):
    return _shape(p, _arg(node, 2, "index"))


def _sdpa(p, node):
    q, v = _shape(p, node.args[0]), _shape(p, node.args[2])
    return q[:-1] + v[-1:]


def _pad(p, node):
    x = list(_shape(p, node.args[0]))
    pad = list(p.value(_arg(node, 1, "pad")))
    for i in range(len(pad) // 2):
        d = len(x) - 1 - i
        x[d] = x[d] + _sym(pad[2 * i]) + _sym(pad[2 * i + 1])
    return tuple(x)


def _conv(p, node, module=None):
    x = _shape(p, node.args[0])
    if module is not None:
        weight, stride, padding, dilation = module.weight.shape, module.stride, module.padding, module.dilation
        out_channels = module.out_channels
    else:
        weight = _shape(p, node.args[1])
        stride = _tuple(p.value(_arg(node, 3, "stride", 1)), len(weight) - 2)
        padding = _tuple(p.value(_arg(node, 4, "padding", 0)), len(weight) - 2)
        dilation = _tuple(p.value(_arg(node, 5, "dilation", 1)), len(weight) - 2)
        out_channels = weight[0]
    if isinstance(padding, str):
        raise Opaque("padding by name")
    spatial = len(weight) - 2
    sizes = tuple(FloorDiv(x[-spatial + i] + 2 * padding[i] - dilation[i] * (int(weight[2 + i]) - 1) - 1,
                           stride[i]) + 1 for i in range(spatial))
    return x[:-spatial - 1] + (_sym(out_channels),) + sizes


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _tensor_of(p, node):
    info = node.meta.get("fxbt_val")
    if isinstance(info, TensorInfo):
        return tuple(sympy.Integer(s) for s in info.shape)
    raise Opaque("not a tensor")


def _arg(node, index, name, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


_ELEMENTWISE = {"add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
                "erf", "erfc", "tanh", "sigmoid", "relu", "gelu", "silu", "mish", "softplus", "elu", "leaky_relu",
                "hardswish", "hardsigmoid", "sin", "cos", "clamp", "clip", "where", "masked_fill", "eq", "ne",
                "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or",
                "bitwise_not", "__and__", "__or__", "__invert__", "and_", "or_", "invert", "__add__", "__radd__",
                "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__pow__", "__rpow__",
                "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__neg__", "reciprocal", "square",
                "sign", "floor", "ceil", "round", "minimum", "maximum", "fmod", "remainder", "lerp", "addcmul",
                "addcdiv", "isinf", "isnan", "isneginf", "isposinf", "nan_to_num", "add_", "mul_", "sub_", "div_",
                "masked_fill_", "clamp_", "xlogy", "softmax", "log_softmax", "dropout", "layer_norm", "rms_norm",
                "float", "half", "bfloat16", "double", "int", "long", "bool", "to", "type", "type_as", "contiguous",
                "clone", "detach", "tril", "triu", "cumsum", "cumprod", "silu_", "relu_", "gelu_", "fill_",
                "zero_", "copy_", "group_norm", "batch_norm", "instance_norm", "normalize", "alpha_dropout",
                "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "glu"}
_SAME = {"softmax", "log_softmax", "dropout", "layer_norm", "rms_norm", "float", "half", "bfloat16", "double",
         "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone", "detach", "tril", "triu", "cumsum",
         "cumprod", "fill_", "zero_", "group_norm", "batch_norm", "instance_norm", "normalize", "alpha_dropout",
         "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
_BY_NAME = {
    "linear": _linear, "matmul": _matmul, "bmm": _matmul, "__matmul__": _matmul, "baddbmm": _baddbmm,
    "einsum": _einsum, "view": _view, "reshape": _view, "view_as": _view_as, "reshape_as": _view_as,
    "flatten": _flatten, "unflatten": _unflatten, "transpose": _transpose, "swapaxes": _transpose, "t": _t,
    "permute": _permute, "unsqueeze": _unsqueeze, "squeeze": _squeeze, "expand": _expand, "expand_as": _expand,
    "broadcast_to": _expand,
    "repeat": _repeat, "repeat_interleave": _repeat_interleave, "cat": _cat, "concat": _cat, "concatenate": _cat,
    "stack": _stack, "chunk": _chunk, "split": _split, "unbind": _unbind, "getitem": _getitem, "size": _size,
    "getattr": _getattr, "numel": _numel, "dim": _dim_count, "sym_size": _size, "arange": _arange,
    "zeros": _filled, "ones": _filled, "empty": _filled, "full": _filled, "rand": _filled, "randn": _filled,
    "zeros_like": _like, "ones_like": _like, "empty_like": _like, "full_like": _like, "rand_like": _like,
    "randn_like": _like, "new_zeros": _filled, "new_ones": _filled, "new_empty": _filled, "new_full": _filled,
    "sum": _reduction, "mean": _reduction, "amax": _reduction, "amin": _reduction, "prod": _reduction,
    "any": _reduction, "all": _reduction, "norm": _reduction, "var": _reduction, "std": _reduction,
    "logsumexp": _reduction, "argmax": _reduction, "argmin": _reduction, "max": _max_like, "min": _max_like,
    "embedding": _embedding, "index_select": _index_select, "gather": _gather,
    "scaled_dot_product_attention": _sdpa, "pad": _pad, "conv1d": _conv, "conv2d": _conv,
    "tensor": _tensor_of, "scalar_tensor": _tensor_of, "as_tensor": _tensor_of, "int_": _to_int,
    "setitem": lambda p, node: None,  # an in-place assignment: the target keeps its shape, the node has none
}


def _new_sized(p, node):
    """``x.new_zeros(sizes)``: the sizes, like ``torch.zeros(sizes)``."""
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.fx.Node)) \
        else node.args[1:]
    return tuple(_sym(s) for s in p.value(sizes))


def _call_function(p, node):
    target = node.target
    if not any(isinstance(a, torch.fx.Node) and _is_tensor(a) for a in node.all_input_nodes):
        try:
            return _folded(p, node)
        except Opaque:
            pass
    if target in _SCALAR_OPS:
        return _scalar_or_elementwise(p, node)
    if target is int:
        return _to_int(p, node)
    if target is getattr:
        return _getattr(p, node)
    if target is torch.ops.aten.sym_size.int:
        return _size(p, node)
    name = getattr(target, "__name__", "")
    return _by_name(p, node, name)


def _by_name(p, node, name):
    if name in _BY_NAME:
        if name.startswith("new_"):
            return _new_sized(p, node)
        return _BY_NAME[name](p, node)
    if name in _SAME:
        return _same_shape(p, node)
    if name in _ELEMENTWISE:
        return _elementwise(p, node)
    raise Opaque(f"no rule for {name}")


def _call_method(p, node):
    return _by_name(p, node, node.target)


def _call_module(p, node):
    module = p.gm.get_submodule(node.target)
    if isinstance(module, torch.nn.Linear):
        return _linear(p, node, weight=tuple(module.weight.shape))
    if isinstance(module, torch.nn.Embedding):
        return _embedding(p, node, weight=tuple(module.weight.shape))
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return _conv(p, node, module)
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.Dropout, torch.nn.GELU, torch.nn.ReLU, torch.nn.Tanh,
                           torch.nn.SiLU, torch.nn.Identity, torch.nn.Softmax, torch.nn.Sigmoid, torch.nn.GroupNorm,
                           torch.nn.LeakyReLU, torch.nn.Mish, torch.nn.Hardswish, torch.nn.ELU, torch.nn.Softplus)) or \
            type(module).__name__ in ("RMSNorm",):
        return _same_shape(p, node)
    raise Opaque(f"no rule for module {type(module).__name__}")


def _get_attr(p, node):
    info = node.meta.get("fxbt_val")
    if isinstance(info, TensorInfo):
        return tuple(sympy.Integer(s) for s in info.shape)
    return info


_RULES_BY_OP = {"call_function": _call_function, "call_method": _call_method, "call_module": _call_module,
                "get_attr": _get_attr}


# --- the result: node metadata and guard conditions ------------------------------------------------------


def propagate(gm: torch.fx.GraphModule, flat_inputs: list, decisions=()) -> Propagation:
    """Symbolic values for every node of ``gm`` (``meta["fxbt_sym"]``), the facts they rely on, and
    the tracer's ``decisions`` (node, replay) replayed on their nodes' symbolic values as facts too."""
    p = Propagation(gm, flat_inputs)
    p.run()
    for node, replay in decisions:
        replay_symbolic(p, node, replay)
    for node in gm.graph.nodes:
        node.meta["fxbt_sym"] = _plain(p.resolve(p.values.get(node)))
    return p


def replay_symbolic(p: Propagation, node, replay) -> None:
    value = p.resolve(p.values.get(node))
    if isinstance(value, (bool, int, float)):
        replay(value)  # a constant (a dtype comparison): fixed by the call's kind
    elif isinstance(value, sympy.Basic) and not value.free_symbols:
        replay(_concrete(value, p.example))
    elif isinstance(value, sympy.Basic):
        truth = _truth(value, p.example)
        replay(truth)  # the tracer's decision must be the example's
        p.pin(value if truth else sympy.Not(value))  # Opaque (sizes pinned) where no input carries it
    elif isinstance(value, tuple):
        replay(value)  # a rank or membership on a size tuple: fixed by the call's kind
    else:
        raise Opaque(f"the tracer decided on {node.name}, whose value is unknown")


def _plain(value):
    if isinstance(value, sympy.Integer):
        return int(value)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def conditions_as_python(p: Propagation) -> list[str] | None:
    """The facts as Python over ``L['t<i>'].size()[d]``; None if one is over a size no input carries."""
    from torch.utils._sympy.printers import PythonPrinter

    printer, found = PythonPrinter(), []
    stand_in = {s: sympy.Symbol(f"fxbt_t{i}_{d}", integer=True) for s, (i, d) in p.sources.items()}
    for relation in p.conditions:
        if not p.expressible(relation):
            return None
        text = printer.doprint(relation.xreplace(stand_in))
        found.append(re.sub(r"fxbt_t(\d+)_(\d+)", lambda m: f"L['t{m[1]}'].size()[{m[2]}]", text))
    return found
