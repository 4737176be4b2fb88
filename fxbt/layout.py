"""Layouts proven by replay: what a chain of view, transpose, permute, getitem... ops does to a value's
elements, found by running the same ops on numbered elements.

Models split heads, pack Q, K and V, merge heads back and move batch and sequence axes in many ways
(``qkv.reshape(b, s, 3, h, d).permute(2, 0, 3, 1, 4)[0]``, PyTorch's ``proj.unflatten(-1, (3, e))
.unsqueeze(0).transpose(0, -2).squeeze(-2)[0].view(s, b * h, d).transpose(0, 1)``, ``[b*h, s, d]`` for
bmm). Rather than a rule per spelling, a check runs the chain on a tensor whose every element is its own
index and compares the result with the layout it needs. The ops' size arguments are read at the example's
sizes; the checks also compare symbolic shapes, so that what the replay shows holds for every admitted size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx

from .canon import TRANSPARENT, Const, Virtual, origin
from .meta import TensorInfo, val

# canonical ops that only move elements (or pick some of them)
LAYOUT_OPS = frozenset({"reshape", "transpose", "permute", "unsqueeze", "getitem", "expand", "method:unbind",
                        "fn:unbind", "method:chunk", "fn:chunk", "method:split", "fn:split"}) | TRANSPARENT


def path_down(g, top, stop: Callable) -> tuple[list, object]:
    """The layout ops from ``top`` down to the first key ``stop`` accepts, top first, and that key; where
    another op comes first, the path so far and that op's key (the caller tells them apart)."""
    path, key = [], top
    for _ in range(32):
        if isinstance(key, Const) or stop(key):
            return path, key
        if g.op(key) not in LAYOUT_OPS:
            return path, key
        path.append(key)
        key = g.operands(key)[0]
    return path, key


def replay(g, path: list, value: torch.Tensor):
    """``value`` through the ops of ``path`` (top first, as `path_down` gives it), bottom up; None where an
    op cannot be replayed."""
    try:
        for key in reversed(path):
            value = _replay_one(g, key, value)
    except Exception:  # noqa: BLE001 - an op whose arguments do not fit numbered elements: no proof
        return None
    return value if isinstance(value, torch.Tensor) else None


def _replay_one(g, key, value):
    op = g.op(key)
    if op in TRANSPARENT:  # the same elements (``contiguous`` lays them out afresh, which a later view may need)
        return value.contiguous()
    if isinstance(key, Virtual):  # part of an einsum: its canonical op says what it does
        attrs = g.canon(key).attrs
        if op == "permute":
            return value.permute(attrs["perm"])
        if op == "transpose":
            return value.transpose(*attrs["dims"])
        raise ValueError(op)
    return replay_node(origin(key), value)


def replay_node(node: torch.fx.Node, value):
    """One FX node's op applied to ``value`` in place of its first argument, other arguments at their example
    values."""
    def arg(a):
        if isinstance(a, torch.fx.Node):
            v = val(a)
            return tuple(v) if isinstance(v, (list, tuple)) else v
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    args = [arg(a) for a in node.args[1:]]
    kwargs = {k: arg(v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(value, node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(value, *args, **kwargs)
    raise ValueError(node.op)


def numbered(shape) -> torch.Tensor:
    """A tensor of ``shape`` whose every element is its own flat index."""
    return torch.arange(math.prod(shape)).view(tuple(shape))


def token_rows(value: torch.Tensor, width: int) -> torch.Tensor | None:
    """Where every last-axis row of ``value`` is one token's features in order (``token * width + f``): the
    token of each row, shaped like ``value`` without its last axis; else None."""
    if value.dim() < 1 or value.shape[-1] != width:
        return None
    rows = value.reshape(-1, width)
    first = rows[:, :1]
    if not torch.equal(rows, first + torch.arange(width)) or bool((first % width != 0).any()):
        return None
    return (first[:, 0] // width).view(value.shape[:-1])


def broadcast_source(g, key, owned: Callable) -> tuple[object, list]:
    """The earliest value ``key`` is a broadcast of, through layout ops only this use reads (``owned(op, ops
    above it)``):
    ``(source, the ops between, top first)``; ``(key, [])`` where there is none.

    PyTorch's multi-head attention expands a [batch, 1, 1, keys] padding mask over heads, reshapes it to
    [batch·heads, 1, keys] and views it back as [batch, heads, 1, keys]: every head holds the same values,
    and a consumer that broadcasts (SDPA) can take the [batch, 1, 1, keys] tensor itself. The ops replayed on
    the source's numbered elements must give the source broadcast to ``key``'s shape, and the symbolic shapes
    must broadcast the same way for every admitted size."""
    from .shapes import same, sym

    target, target_sym = _info_shape(key), sym(origin(key)) if not isinstance(key, Virtual) else None
    best = (key, [])
    if target is None or not isinstance(target_sym, tuple):
        return best
    path, current = [], key
    while not isinstance(current, Const) and not isinstance(current, Virtual) and g.op(current) in LAYOUT_OPS \
            and g.op(current) not in TRANSPARENT and owned(current, path):
        path.append(current)
        current = g.operands(current)[0]
        shape, shape_sym = _info_shape(current), sym(origin(current)) if not isinstance(current, Virtual) else None
        if shape is None or not isinstance(shape_sym, tuple) or len(shape) > len(target):
            break
        aligned = (1,) * (len(target) - len(shape)) + tuple(shape_sym)
        if not all(a == 1 or same(a, t) for a, t in zip(aligned, target_sym)):
            continue
        source = numbered(shape)
        moved = replay(g, path, source)
        try:
            broadcast = source.expand(target)
        except RuntimeError:
            continue
        if moved is not None and tuple(moved.shape) == tuple(target) and torch.equal(moved, broadcast):
            best = (current, list(path))
    return best


def _info_shape(key):
    if isinstance(key, (Const, Virtual)):
        return None
    info = val(key)
    return tuple(info.shape) if isinstance(info, TensorInfo) else None
