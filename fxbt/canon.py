"""The canonical view: one vocabulary of operations over every capture dialect.

An FX graph from the HF tracer says ``call_module Linear`` and ``call_method transpose``; one from dynamo
says ``torch._C._nn.linear`` and ``torch.matmul``; a hand-written model says ``x @ w.t()`` or
``torch.einsum``. `CanonicalGraph` sees all of them as the same small set of ops
(``linear``, ``matmul``, ``softmax``, ``add``, ``mul``, ``transpose``, ``reshape``, ...) with
operands in a fixed order and the arguments that matter as attributes. Patterns are written once
against this vocabulary.

The view is a networkx ``DiGraph`` whose nodes are FX nodes plus a few *virtual* nodes, for an FX node
that means more than one canonical op (``einsum`` with a transposed operand, ``baddbmm``). Constants
(Python scalars, None) are operands too, wrapped in `Const`; they are not graph nodes.

Some ops are *transparent*: ``dropout``, ``contiguous``, ``clone``, float dtype casts and device moves
do not change what is computed for matching purposes. The matcher looks through them; the region that
replaces a match still contains them, so unrolling restores them exactly.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F

from .meta import TensorInfo, val

TRANSPARENT = frozenset({"dropout", "contiguous", "clone", "float_cast", "to_device", "identity"})
COMMUTATIVE = frozenset({"add", "mul"})


@dataclass(frozen=True)
class Const:
    """A non-tensor operand: a Python number, None, a dtype..."""

    value: Any


@dataclass(frozen=True)
class Virtual:
    """A canonical op that is part of the meaning of one FX node (``origin``)."""

    origin: torch.fx.Node
    tag: str

    def __repr__(self) -> str:
        return f"{self.origin.name}.{self.tag}"


Key = "torch.fx.Node | Virtual"


@dataclass
class CanonOp:
    op: str
    operands: list = field(default_factory=list)  # keys or Const
    attrs: dict = field(default_factory=dict)


def origin(key) -> torch.fx.Node:
    return key.origin if isinstance(key, Virtual) else key


# ---------------------------------------------------------------------------------------------
# Argument access that works for call_function, call_method and keyword forms alike.


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _operand(x):
    return x if isinstance(x, torch.fx.Node) else Const(x)


def _dims(node, args) -> tuple:
    """Dims given as varargs or as one tuple (permute, view)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def _norm_dim(d, ndim):
    if isinstance(d, int) and ndim is not None and d < 0:
        return d + ndim
    return d


def _rank_of(node_or_key) -> int | None:
    v = val(origin(node_or_key)) if isinstance(node_or_key, (torch.fx.Node, Virtual)) else None
    return v.ndim if isinstance(v, TensorInfo) else None


# ---------------------------------------------------------------------------------------------
# One small function per family of FX targets. Each takes the node (with ``self`` already placed
# first for call_method) and returns a CanonOp.


def _binary(op):
    def canon(node, a):
        return CanonOp(op, [_operand(a[0]), _operand(a[1])])

    return canon


def _rbinary(op):
    def canon(node, a):
        return CanonOp(op, [_operand(a[1]), _operand(a[0])])

    return canon


def _unary(op, **attrs):
    def canon(node, a):
        return CanonOp(op, [_operand(a[0])], dict(attrs))

    return canon


def _matmul(node, a):
    return CanonOp("matmul", [_operand(a[0]), _operand(a[1])])


def _softmax(node, a):
    x = a[0]
    dim = node.kwargs.get("dim", a[1] if len(a) > 1 else None)
    dtype = node.kwargs.get("dtype", a[2] if len(a) > 2 and not isinstance(a[2], int) else None)
    return CanonOp("softmax", [_operand(x)], {"dim": _last_dim(x, dim), "dtype": dtype})


def _last_dim(x, dim):
    """Normalise a softmax/transpose dim to -k form where the rank is known."""
    r = _rank_of(x)
    if isinstance(dim, int) and dim >= 0 and r is not None:
        return dim - r
    return dim


def _transpose(node, a):
    x, d0, d1 = a[0], _arg_at(node, a, 1, "dim0"), _arg_at(node, a, 2, "dim1")
    return CanonOp("transpose", [_operand(x)], {"dims": tuple(sorted((_last_dim(x, d0), _last_dim(x, d1))))})


def _arg_at(node, a, i, name):
    return node.kwargs.get(name, a[i] if len(a) > i else None)


def _t(node, a):
    return CanonOp("transpose", [_operand(a[0])], {"dims": (-2, -1)})


def _permute(node, a):
    x = a[0]
    perm = _dims(node, a[1:]) or tuple(node.kwargs.get("dims", ()))
    r = len(perm)
    perm = tuple(p % r if isinstance(p, int) else p for p in perm)
    swapped = r >= 2 and perm == tuple(range(r - 2)) + (r - 1, r - 2)
    if swapped:
        return CanonOp("transpose", [_operand(x)], {"dims": (-2, -1)})
    return CanonOp("permute", [_operand(x)], {"perm": perm})


def _reshape(node, a):
    return CanonOp("reshape", [_operand(a[0])])


def _cast(node, a):
    """``x.to(...)``, ``x.float()``, ``x.type_as(y)``: transparent unless it leaves floating point."""
    target = _cast_target(node, a)
    if target is None or (isinstance(target, torch.dtype) and target.is_floating_point):
        return CanonOp("float_cast" if target is not None else "to_device", [_operand(a[0])], {"dtype": target})
    return CanonOp("cast", [_operand(a[0])], {"dtype": target})


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _cast_target(node, a):
    if node.op == "call_method" and node.target in _CAST_METHODS:
        return _CAST_METHODS[node.target]
    if node.op == "call_method" and node.target == "type_as":
        v = val(a[1]) if isinstance(a[1], torch.fx.Node) else None
        return v.dtype if isinstance(v, TensorInfo) else torch.float32
    if node.op == "call_method" and node.target in ("bool", "int", "long"):
        return {"bool": torch.bool, "int": torch.int32, "long": torch.int64}[node.target]
    for x in list(a[1:]) + [node.kwargs.get("dtype")]:
        x = val(x) if isinstance(x, torch.fx.Node) else x
        if isinstance(x, torch.dtype):
            return x
    return None


def _dropout(node, a):
    p = _arg(node, 1, "p", 0.5) if node.op == "call_function" else node.kwargs.get("p", a[1] if len(a) > 1 else 0.5)
    training = _arg(node, 2, "training", True) if node.op == "call_function" else True
    return CanonOp("dropout", [_operand(a[0])], {"p": p, "training": training})


def _masked_fill(node, a):
    return CanonOp("masked_fill", [_operand(a[0]), _operand(a[1]), _operand(a[2])])


def _where(node, a):
    return CanonOp("where", [_operand(a[0]), _operand(a[1]), _operand(a[2])])


def _linear(node, a):
    bias = a[2] if len(a) > 2 else node.kwargs.get("bias")
    return CanonOp("linear", [_operand(a[0]), _operand(a[1]), _operand(bias)], {"weight_layout": "out_in"})


def _addmm(node, a):
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        return CanonOp("addmm", [_operand(x) for x in a[:3]])
    return CanonOp("linear", [_operand(a[1]), _operand(a[2]), _operand(a[0])], {"weight_layout": "in_out"})


def _layer_norm(node, a):
    shape = _arg(node, 1, "normalized_shape")
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = _arg(node, 4, "eps", 1e-5)
    return CanonOp("layer_norm", [_operand(a[0]), _operand(w), _operand(b)], {"eps": eps, "shape": shape})


def _gelu(node, a):
    return CanonOp("gelu", [_operand(a[0])], {"approximate": node.kwargs.get("approximate", "none")})


def _sdpa(node, a):
    """Only arguments the call gives are attributes: a pattern that leaves them out does not constrain them."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = [_arg(node, i, n) for i, n in enumerate(names)]
    attrs = {"dropout_p": args[4], "is_causal": args[5], "scale": node.kwargs.get("scale"),
             "enable_gqa": node.kwargs.get("enable_gqa")}
    return CanonOp("sdpa", [_operand(x) for x in args[:4]], attrs)


def _full(node, a):
    size = _arg(node, 0, "size")
    fill = _arg(node, 1, "fill_value")
    if isinstance(size, (tuple, list)) and len(size) == 0:
        return CanonOp("scalar_tensor", [_operand(fill)])
    return CanonOp("full", [_operand(fill)])


def _scalar_tensor(node, a):
    data = a[0] if a else None
    if isinstance(data, (int, float)) or isinstance(data, torch.fx.Node):
        return CanonOp("scalar_tensor", [_operand(data)])
    return CanonOp("tensor", [])


def _einsum(node, a):
    eq, operands = a[0], list(a[1:])
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    form = _einsum_as_matmul(eq) if isinstance(eq, str) and len(operands) == 2 else None
    if form is None:
        return CanonOp("einsum", [_operand(x) for x in operands], {"equation": eq})
    return CanonOp("matmul", [_operand(operands[0]), _operand(operands[1])], {"einsum_rhs": form})


def _einsum_as_matmul(eq: str) -> str | None:
    """'...ij,...kj->...ik' is matmul with the rhs transposed; '...ij,...jk->...ik' is plain matmul."""
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if len(a) != len(b) or len(a) != len(out) or len(a) < 2:
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    i, c = a[-2], a[-1]
    if out[-2:] == i + b[-2] and b[-1] == c and b[-2] not in (i, c):
        return "transposed"
    if out[-2:] == i + b[-1] and b[-2] == c and b[-1] not in (i, c):
        return "plain"
    return None


def _baddbmm(node, a):
    x, b1, b2 = _arg_at(node, a, 0, "input"), _arg_at(node, a, 1, "batch1"), _arg_at(node, a, 2, "batch2")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    return CanonOp("baddbmm", [_operand(x), _operand(b1), _operand(b2)], {"beta": beta, "alpha": alpha})


def _repeat_interleave(node, a):
    reps = _arg_at(node, a, 1, "repeats")
    dim = _arg_at(node, a, 2, "dim")
    return CanonOp("repeat_interleave", [_operand(a[0])], {"repeats": reps, "dim": dim})


def _getitem(node, a):
    return CanonOp("getitem", [_operand(a[0])], {"index": a[1]})


def _expand(node, a):
    return CanonOp("expand", [_operand(a[0])], {"sizes": _dims(node, a[1:])})


def _unsqueeze(node, a):
    return CanonOp("unsqueeze", [_operand(a[0])], {"dim": _arg_at(node, a, 1, "dim")})


_FUNCTIONS: dict[Any, Callable] = {
    operator.add: _binary("add"), torch.add: _binary("add"), operator.iadd: _binary("add"),
    operator.sub: _binary("sub"), torch.sub: _binary("sub"), operator.isub: _binary("sub"),
    operator.mul: _binary("mul"), torch.mul: _binary("mul"), operator.imul: _binary("mul"),
    operator.truediv: _binary("div"), torch.div: _binary("div"), operator.itruediv: _binary("div"),
    operator.matmul: _matmul, torch.matmul: _matmul, torch.bmm: _matmul,
    torch.softmax: _softmax, F.softmax: _softmax,
    torch.transpose: _transpose, torch.permute: _permute,
    torch.reshape: _reshape, torch.flatten: _reshape, torch.unflatten: _reshape,
    torch.unsqueeze: _unsqueeze, torch.squeeze: _reshape,
    F.dropout: _dropout, torch.dropout: _dropout,
    torch.masked_fill: _masked_fill, torch.where: _where,
    F.linear: _linear, torch.addmm: _addmm,
    F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm,
    F.gelu: _gelu, F.relu: _unary("relu"), torch.relu: _unary("relu"),
    F.silu: _unary("silu"), torch.tanh: _unary("tanh"), torch.sigmoid: _unary("sigmoid"),
    F.scaled_dot_product_attention: _sdpa,
    torch.full: _full, torch.tensor: _scalar_tensor, torch.scalar_tensor: _scalar_tensor,
    torch.einsum: _einsum, torch.baddbmm: _baddbmm, torch.repeat_interleave: _repeat_interleave,
    operator.getitem: _getitem, operator.neg: _unary("neg"), torch.neg: _unary("neg"),
    torch.sqrt: _unary("sqrt"), math.sqrt: _unary("sqrt"), operator.pow: _binary("pow"),
    torch.rsqrt: _unary("rsqrt"),
}

_METHODS: dict[str, Callable] = {
    "add": _binary("add"), "__add__": _binary("add"), "__radd__": _rbinary("add"), "add_": _binary("add"),
    "sub": _binary("sub"), "__sub__": _binary("sub"), "__rsub__": _rbinary("sub"),
    "mul": _binary("mul"), "__mul__": _binary("mul"), "__rmul__": _rbinary("mul"), "mul_": _binary("mul"),
    "div": _binary("div"), "__truediv__": _binary("div"), "div_": _binary("div"),
    "matmul": _matmul, "bmm": _matmul, "__matmul__": _matmul,
    "softmax": _softmax, "transpose": _transpose, "t": _t, "permute": _permute,
    "view": _reshape, "reshape": _reshape, "view_as": _reshape, "flatten": _reshape, "unflatten": _reshape,
    "squeeze": _reshape, "unsqueeze": _unsqueeze, "expand": _expand, "expand_as": _expand,
    "to": _cast, "float": _cast, "half": _cast, "bfloat16": _cast, "double": _cast, "type_as": _cast,
    "type": _cast, "bool": _cast, "int": _cast, "long": _cast,
    "contiguous": _unary("contiguous"), "clone": _unary("clone"),
    "masked_fill": _masked_fill, "baddbmm": _baddbmm, "repeat_interleave": _repeat_interleave,
    "relu": _unary("relu"), "tanh": _unary("tanh"), "sigmoid": _unary("sigmoid"), "sqrt": _unary("sqrt"),
    "neg": _unary("neg"), "rsqrt": _unary("rsqrt"), "pow": _binary("pow"),
}


def _module_canon(module: torch.nn.Module, node) -> CanonOp | None:
    region_view = getattr(module, "canonical_view", None)
    if region_view is not None:  # a region already rewritten: it shows the op it computes
        return region_view(node)
    x = _operand(node.args[0]) if node.args else None
    if isinstance(module, torch.nn.Linear):
        return CanonOp("linear", [x, Const(module.weight), Const(module.bias)], {"weight_layout": "out_in"})
    if isinstance(module, torch.nn.LayerNorm):
        return CanonOp(
            "layer_norm", [x, Const(module.weight), Const(module.bias)],
            {"eps": module.eps, "shape": tuple(module.normalized_shape)},
        )
    if isinstance(module, torch.nn.Dropout):
        return CanonOp("dropout", [x], {"p": module.p, "training": "module"})
    if isinstance(module, torch.nn.Softmax):
        return CanonOp("softmax", [x], {"dim": _last_dim(node.args[0], module.dim), "dtype": None})
    if isinstance(module, torch.nn.GELU):
        return CanonOp("gelu", [x], {"approximate": module.approximate})
    simple = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.Tanh: "tanh", torch.nn.Identity: "identity"}
    for cls, op in simple.items():
        if type(module) is cls:
            return CanonOp(op, [x])
    return None


def canonical_op(node: torch.fx.Node, gm: torch.nn.Module | None) -> CanonOp:
    """The canonical meaning of one FX node; an op written in a form we do not know stays opaque."""
    try:
        return _canonical_op(node, gm)
    except Exception:  # an unusual argument form: the node is simply not part of any pattern
        return CanonOp(f"opaque:{node.op}", [_operand(x) for x in node.all_input_nodes])


def _canonical_op(node: torch.fx.Node, gm: torch.nn.Module | None) -> CanonOp:
    if node.op in ("placeholder", "get_attr", "output"):
        kind = {"placeholder": "input", "get_attr": "param", "output": "output"}[node.op]
        return CanonOp(kind, [_operand(x) for x in node.all_input_nodes])
    if node.op == "call_module":
        module = gm.get_submodule(node.target) if gm is not None else None
        found = _module_canon(module, node) if module is not None else None
        return found or CanonOp(f"module:{type(module).__name__}", [_operand(x) for x in node.args])
    if node.op == "call_method":
        fn = _METHODS.get(node.target)
        return fn(node, list(node.args)) if fn else CanonOp(f"method:{node.target}", [_operand(x) for x in node.args])
    fn = _FUNCTIONS.get(node.target)
    if fn is not None:
        return fn(node, list(node.args))
    name = getattr(node.target, "__name__", str(node.target))
    return CanonOp(f"fn:{name}", [_operand(x) for x in node.args])


class CanonicalGraph:
    """The canonical view of an FX graph, as a networkx DiGraph of keys (FX nodes or `Virtual`)."""

    def __init__(self, gm: torch.fx.GraphModule | None, graph: torch.fx.Graph | None = None, options=None):
        self.gm = gm
        self.options = dict(options or {})
        self.graph = graph if graph is not None else gm.graph
        self.nx = nx.DiGraph()
        self.by_op: dict[str, list] = {}
        for node in self.graph.nodes:
            self._add(node, canonical_op(node, gm))

    def _add(self, key, canon: CanonOp) -> None:
        canon = self._expand_virtual(key, canon)
        self.nx.add_node(key, canon=canon)
        self.by_op.setdefault(canon.op, []).append(key)
        for pos, operand in enumerate(canon.operands):
            if not isinstance(operand, Const):
                self.nx.add_edge(operand, key, pos=pos)

    def _expand_virtual(self, key, canon: CanonOp) -> CanonOp:
        """Split FX nodes that mean several canonical ops into virtual nodes."""
        if canon.op == "matmul" and canon.attrs.get("einsum_rhs") == "transposed":
            rhs_t = Virtual(key, "rhs_t")
            self._add(rhs_t, CanonOp("transpose", [canon.operands[1]], {"dims": (-2, -1)}))
            return CanonOp("matmul", [canon.operands[0], rhs_t])
        if canon.op == "baddbmm":
            bias, b1, b2 = canon.operands
            product = Virtual(key, "product")
            self._add(product, CanonOp("matmul", [b1, b2]))
            scaled = Virtual(key, "alpha")
            self._add(scaled, CanonOp("mul", [product, Const(canon.attrs["alpha"])]))
            weighted = Virtual(key, "beta")
            self._add(weighted, CanonOp("mul", [bias, Const(canon.attrs["beta"])]))
            return CanonOp("add", [scaled, weighted])
        return canon

    # -- queries -------------------------------------------------------------------------------
    def canon(self, key) -> CanonOp:
        return self.nx.nodes[key]["canon"]

    def op(self, key) -> str:
        return self.canon(key).op if key in self.nx else "const"

    def operands(self, key) -> list:
        return self.canon(key).operands

    def users(self, key) -> list:
        return list(self.nx.successors(key))

    def through_transparent(self, key) -> tuple[Any, list]:
        """Follow transparent ops down to the first meaningful producer; return it and the skipped keys."""
        skipped = []
        while not isinstance(key, Const) and self.op(key) in TRANSPARENT:
            skipped.append(key)
            key = self.operands(key)[0]
        return key, skipped
