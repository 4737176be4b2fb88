"""Token-wise dataflow: where the padded positions of a value can reach.

Padding removal computes only the real tokens and leaves zeros at padded positions. That is exact for
everything computed position by position (linears, norms, activations, residuals): a padded position of
the result depends only on padded positions of its inputs. It is not exact where something mixes
positions — pooling, convolution or a cumulative sum over the sequence, a shift, an upsampling — since
the original there reads the padded positions' actual values.

`padded_reads` follows a [batch, seq, ...] value through position-wise ops (and layout ops that keep the
batch and sequence axes apart) to the graph's outputs and says what reads its padded positions:

- positions read by a fixed index (``hidden[:, 0]``, a pooler): exact whenever those positions are real,
  which the caller checks per call;
- positions picked per call by index tensors over both token axes (``hidden[arange(b), eos_position]``,
  CLIP's pooler), where the caller accepts them (``gathers=True``): exact whenever the picked positions are
  computed, which the caller ensures per call;
- attention regions that take it as keys or values (cross-attention over an encoder's output): exact
  whenever the attention's own mask masks every padded key, which that region checks per call (as
  queries, attention is position-wise: each query's output follows from its own query);
- a product with a factor, or a ``masked_fill`` with a condition, of the value's own [batch, sequence] sizes
  computed apart from it (``hidden * mask[..., None]`` before a mean over tokens, ``masked_fill(mask == 0,
  -inf)`` before a max): where the factor is zero, or the condition true, at every padded position, the result
  is the same whatever the value holds there; the caller checks that per call (``factors=True``);
- otherwise, the first op that mixes positions: the caller must not leave zeros there. The outputs of a
  graph whose outputs more of the model's code reads (torch.compile broke the model's forward after it) count
  as such an op: that code is not in the graph, so nothing proves it reads real positions only.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from .canon import canonical_op
from .meta import is_size_query, target_name as _name
from .shapes import same, sym

# canonical ops computed independently at every position of their inputs
POSITIONWISE = frozenset({
    "add", "sub", "mul", "div", "pow", "neg", "sqrt", "rsqrt", "float_cast", "cast", "to_device", "dropout",
    "contiguous", "clone", "identity", "linear", "layer_norm", "gelu", "relu", "silu", "tanh", "sigmoid",
    "masked_fill", "where",
})
_ELEMENTWISE_NAMES = frozenset({
    "erf", "exp", "log", "abs", "clamp", "clip", "square", "sin", "cos", "tanh", "sigmoid", "relu", "gelu",
    "silu", "mish", "softplus", "elu", "leaky_relu", "hardswish", "hardsigmoid", "rms_norm", "detach", "type",
    "float", "half", "bfloat16", "to", "type_as", "erfc", "reciprocal", "sign", "floor", "ceil", "round",
})
_LAST_DIM_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "norm", "softmax", "log_softmax",
                                  "var", "std", "logsumexp"})
_LAYOUT = frozenset({"transpose", "permute"})
# a graph's meta key: its outputs are read by more of the model's code (a graph torch.compile broke), not returned
OUTPUTS_READ_BY_CODE = "fxbt_outputs_read_by_code"


@dataclass
class PaddedReads:
    positions: tuple = ()  # sequence positions read by a fixed index
    attention: list = field(default_factory=list)  # (region call node, "k" or "v") reading it as keys/values
    gathers: list = field(default_factory=list)  # (batch index node, sequence index node) picking positions
    factors: list = field(default_factory=list)  # (factor node, value's token axes, "zero" or "fill") to check
    mixes: str | None = None  # the first op that mixes positions, in words


def padded_reads(gm: torch.fx.GraphModule, value: torch.fx.Node, through=frozenset(), axes=(0, 1),
                 gathers=False, factors=False) -> PaddedReads:
    """What reads the padded positions of ``value`` (its batch and sequence axes at ``axes``: (1, 0) for
    [sequence, batch, ...]) on the way to the outputs. ``through``: users known to read only real positions (the
    rest of a padding-free region); ``gathers``: positions picked by index tensors are reported, not mixes;
    ``factors``: products with a factor (fills under a condition) that blanks padded positions are reported."""
    shape = sym(value)
    if not isinstance(shape, tuple) or len(shape) < 2 or max(axes) >= len(shape):
        return PaddedReads(mixes=f"{value.name} has no [batch, sequence] symbolic shape")
    token_axes = (shape[axes[0]], shape[axes[1]])
    found, positions = PaddedReads(), set()
    frontier, seen = [(value, tuple(axes))], {value}
    while frontier:
        node, axes = frontier.pop()
        for user in node.users:
            if user.op == "output" and gm.meta.get(OUTPUTS_READ_BY_CODE):
                found.mixes = "the graph's output, which the model's code reads after the graph"
                return found
            if user in seen or user.op == "output" or user in through or is_size_query(user) or \
                    _reads_shape_only(user, node, through):
                continue
            seen.add(user)
            reader = _attention_reader(gm, user, node, axes)
            if reader in ("k", "v"):
                found.attention.append((user, reader))
                continue
            if reader == "q":  # each query position's output: its own query against the keys
                frontier.append((user, axes))
                continue
            position = _position_read(user, node) if axes == (0, 1) else None
            if position is not None:
                positions.add(position)
                continue
            picked = _gather(user, node) if axes == (0, 1) and gathers else None
            if picked is not None:
                found.gathers.append(picked)
                continue
            blank = blanking(gm, user, node, axes) if factors else None
            if blank is not None:
                found.factors.append((blank[0], axes, blank[1]))
                continue
            moved = _follow(gm, user, node, axes, token_axes)
            if isinstance(moved, str):
                found.mixes = moved
                return found
            frontier.append((user, moved))
    found.positions = tuple(sorted(positions))
    return found


def _attention_reader(gm, user, node, axes) -> str | None:
    """``node`` ([batch, heads, seq, dim], batch and seq at 0 and -2) as an SDPA region's keys or values."""
    if user.op != "call_module":
        return None
    region = gm.get_submodule(user.target)
    if getattr(region, "kernel", None) != "sdpa" or "k" not in getattr(region, "slots", {}):
        return None
    rank = len(sym(node)) if isinstance(sym(node), tuple) else 0
    if rank < 3 or axes != (0, rank - 2) or region.params.get("k_transposed"):
        return None
    for name in ("q", "k", "v"):
        slot = region.slots[name]
        if slot.index is not None and user.args[slot.index] is node:
            return name
    return None


def _position_read(user: torch.fx.Node, node: torch.fx.Node):
    """``node[:, p]`` with a constant p: the positions a pooler reads."""
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
        index = user.args[1]
        if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], int):
            return index[1]
    if user.op in ("call_method", "call_function") and _name(user) == "select" and user.args[0] is node:
        dim, index = (list(user.args[1:3]) + [None, None])[:2]
        if dim == 1 and isinstance(index, int):
            return index
    return None


def _gather(user: torch.fx.Node, node: torch.fx.Node):
    """``node[b_index, s_index]`` (trailing axes whole) with index tensors: the positions CLIP's pooler reads."""
    if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node):
        return None
    index = user.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or not all(isinstance(i, torch.fx.Node) for i in index[:2]):
        return None
    if not all(i == slice(None) or i is Ellipsis for i in index[2:]):
        return None
    return index[0], index[1]


def _follow(gm, user: torch.fx.Node, node: torch.fx.Node, axes, token_axes):
    """Where the batch and sequence axes are in ``user``'s output when it computes each (batch, position) from
    the same (batch, position) of ``node``; otherwise why not."""
    op = canonical_op(user, gm).op
    out = sym(user)
    found = _axes_of(out, token_axes)
    name = _name(user)
    if op in POSITIONWISE or name in _ELEMENTWISE_NAMES:
        return found if found == axes and _not_last(out, found) else f"{user.name} ({op}) changes the [batch, sequence] axes"
    if op in _LAYOUT and found is not None:
        return found  # elements move, but each keeps its batch and position
    if op in ("reshape", "unsqueeze") and found is not None and _same_prefix(sym(node), out, max(axes), found == axes):
        return found  # only dimensions after the batch and sequence axes are split, merged or added
    if op == "getitem" and axes == (0, 1) and found == (0, 1) and _trailing_index(user.args[1]):
        return found
    if (op == "softmax" or name in _LAST_DIM_REDUCTIONS) and _over_last_dim(user) and found == axes and \
            _not_last(sym(node), axes):
        return found
    return f"{user.name} ({name}) mixes positions"


def blanking(gm, user: torch.fx.Node, node: torch.fx.Node, axes):
    """(factor, "zero") for ``node * factor``, (condition, "fill") for ``node.masked_fill(condition, v)``: a tensor of
    ``node``'s rank and token sizes (at ``axes``), not ``node`` itself; else None."""
    op = canonical_op(user, gm).op
    if op == "mul" and len(user.args) == 2 and not user.kwargs:
        other = [a for a in user.args if a is not node]
        kind, factor = "zero", (other[0] if len(other) == 1 else None)
    elif op == "masked_fill" and user.args and user.args[0] is node and len(user.args) >= 2:
        kind, factor = "fill", user.args[1]
    else:
        return None
    mine = sym(node)
    if not _token_sized(factor, mine, axes) or sym(user) != mine:
        return None
    while True:  # what is checked is the factor before it is broadcast (and, for a product, cast)
        inner = _unbroadcast(factor, kind)
        if inner is None or not _token_sized(inner, mine, axes):
            return factor, kind
        factor = inner


def _reads_shape_only(user: torch.fx.Node, node: torch.fx.Node, through) -> bool:
    """``x.expand_as(node)``, ``x.type_as(node)``: sizes or the dtype of ``node``, none of its values; and what it
    computes does not flow back into ``through`` (a region that would then read a value made from its own)."""
    if not (_name(user) in ("expand_as", "type_as", "view_as", "reshape_as") and len(user.args) == 2 and
            user.args[1] is node and user.args[0] is not node):
        return False
    seen, frontier = set(), [user]
    while frontier:
        n = frontier.pop()
        if n in through:
            return False
        if n not in seen:
            seen.add(n)
            frontier.extend(n.users)
    return True


def _token_sized(x, shape, axes) -> bool:
    """``x`` is a node of ``shape``'s rank and of its sizes at the token ``axes``."""
    theirs = sym(x) if isinstance(x, torch.fx.Node) else None
    return isinstance(theirs, tuple) and len(theirs) == len(shape) and all(same(theirs[a], shape[a]) for a in set(axes))


_BROADCASTS = frozenset({"expand", "expand_as", "broadcast_to"})
_CASTS = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "double"})  # zero stays zero, not truth


def _unbroadcast(x: torch.fx.Node, kind: str):
    """The input of a broadcast (``expand_as`` reads only the sizes of its other operand), or of a cast where only
    zeros matter; else None."""
    name = _name(x)
    if x.op in ("call_method", "call_function") and (name in _BROADCASTS or kind == "zero" and name in _CASTS) \
            and x.args and isinstance(x.args[0], torch.fx.Node):
        return x.args[0]
    return None


def _axes_of(shape, token_axes):
    """The indices of the batch and sequence sizes in ``shape``, when each appears exactly once."""
    if not isinstance(shape, tuple):
        return None
    found = []
    for size in token_axes:
        hits = [i for i, s in enumerate(shape) if same(s, size)]
        if len(hits) != 1:
            return None
        found.append(hits[0])
    return tuple(found)


def _same_prefix(before, after, last: int, kept: bool) -> bool:
    """The dimensions up to ``last`` are the same before and after, so the op touches only later ones."""
    return kept and isinstance(before, tuple) and isinstance(after, tuple) and len(before) > last and \
        len(after) > last and all(same(a, b) for a, b in zip(before[:last + 1], after[:last + 1]))


def _not_last(shape, axes) -> bool:
    return isinstance(shape, tuple) and all(a != len(shape) - 1 for a in axes)


def _trailing_index(index) -> bool:
    return isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and index[1] == slice(None)


def _over_last_dim(node: torch.fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    ndim = len(sym(node.args[0])) if isinstance(node.args[0], torch.fx.Node) and isinstance(
        sym(node.args[0]), tuple) else None
    return all(isinstance(d, int) and (d == -1 or (ndim is not None and d == ndim - 1)) for d in dims)

