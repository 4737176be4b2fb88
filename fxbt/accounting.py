"""Every softmax accounted for: a report row for each softmax (and each PyTorch attention call) that no
rule rewrote or declined, saying why it was left alone.

After the rules ran, a softmax still in the top-level graph is either part of a declined match (its row
says why) or was never matched. For the latter this module reads the graph around it and names what
keeps it from being attention SDPA can compute:

- the softmax is not over the last axis (over the queries, say);
- the scores pass through an op no attention rule absorbs before the softmax (a clamp, tanh
  soft-capping, an opaque function);
- the scores are not a product of two tensors (Q·Kᵀ);
- the probabilities are changed before they meet the values (reweighted, gated), or never meet them
  (a classifier's softmax);
- both products are there but laid out in a way the rule does not know (the einsum's output order).

PyTorch multi-head attention calls that capture left whole (fxbt/decompose.py) get a row with their
reason too. Nothing here changes the graph.
"""
from __future__ import annotations

import torch
import torch.fx

from .canon import TRANSPARENT, CanonicalGraph, Const, Virtual, origin
from .decompose import OPAQUE
from .meta import target_name
from .report import Report, Row

PATTERN = "softmax_attention"
# what the attention rule's score chain absorbs between Q·Kᵀ and the softmax, and views around P
_SCORE_OPS = frozenset({"mul", "div", "add", "sub", "masked_fill", "where", "reshape"}) | TRANSPARENT
_VIEW_OPS = frozenset({"reshape"}) | TRANSPARENT
_PRODUCTS = ("matmul", "baddbmm")


def account(gm: torch.fx.GraphModule, report: Report) -> None:
    """Add a "rejected" row for each softmax and PyTorch attention call of ``gm`` no row covers yet."""
    covered = set().union(*(r.covers for r in report.rows)) if report.rows else set()
    graph = None
    for node in gm.graph.nodes:
        if node.meta.get(OPAQUE) and node.name not in covered:
            report.rows.append(Row(node.name, "multi_head_attention", "sdpa", "rejected", node.meta[OPAQUE],
                                   report.frontend, nodes=1))
        elif _is_softmax(node) and node.name not in covered:
            graph = graph or CanonicalGraph(gm)
            report.rows.append(Row(node.name, PATTERN, "sdpa", "rejected", why_not_attention(graph, node),
                                   report.frontend, nodes=1))


def _is_softmax(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, torch.nn.functional.softmax, torch.ops.aten._softmax.default,
                               torch.ops.aten.softmax.int, torch._softmax)
    return node.op == "call_method" and node.target == "softmax"


def why_not_attention(g: CanonicalGraph, node: torch.fx.Node) -> str:
    """Why the softmax at ``node`` is not attention SDPA can compute, in words."""
    try:
        attrs = g.canon(node).attrs
    except KeyError:
        return "not attention: fxbt cannot read this softmax"
    if attrs.get("dim") != -1:
        return (f"not attention: the softmax is over axis {attrs.get('dim')}, not the last (keys) axis "
                "(over the queries?)")
    scores, between = _up(g, g.operands(node)[0])
    if isinstance(scores, Const):
        return "not attention: the softmax is over a constant"
    if g.op(scores) not in _PRODUCTS:
        what = _describe(g, scores)
        if between or _product_above(g, scores):
            return (f"not attention: the scores pass through {what} before the softmax, which SDPA cannot apply "
                    "(a clamp or soft-capping?)")
        return f"not attention: the softmax input is not a product of queries and keys (it comes from {what})"
    user = _down(g, node)
    if user is None:
        return "not attention: the probabilities are not multiplied with values (used as they are)"
    if g.op(user) != "matmul":
        return (f"not attention: the probabilities are changed by {_describe(g, user)} before they are multiplied "
                "with the values")
    if g.operands(user)[0] is not _first_operand_root(g, user, node):
        return "not attention: the probabilities are the right operand of their product (P·V expected)"
    return ("attention not matched: Q·Kᵀ, softmax and P·V are there, but in a layout the attention rule does not "
            f"know ({_describe(g, scores)} and {_describe(g, user)})")


def _product_above(g, key) -> bool:
    """Whether a product Q·Kᵀ feeds ``key`` through its largest operands: an op between the scores and the
    softmax that no rule absorbs (tanh soft-capping, a clamp written as ``max(scores, finfo.min)``)."""
    for _ in range(8):
        key = _scores_operand(g, key)
        if key is None:
            return False
        if g.op(key) in _PRODUCTS:
            return True
    return False


def _up(g, key):
    """Up from the softmax input through the ops the score chain absorbs: (the first other op, whether it
    had to pass any op)."""
    passed = False
    for _ in range(32):
        if isinstance(key, Const) or g.op(key) not in _SCORE_OPS:
            return key, passed
        operand = _scores_operand(g, key)
        if operand is None:
            return key, passed
        key, passed = operand, True
    return key, passed


def _scores_operand(g, key):
    """The operand of ``key`` that carries the scores: the one with the most elements (a mask or bias
    broadcasts to them); None where every operand is a constant."""
    operands = [o for o in g.operands(key) if not isinstance(o, Const)]
    return max(operands, key=_numel) if operands else None


def _down(g, key):
    """Down from the softmax through views and transparent ops to the one op that uses the probabilities."""
    for _ in range(32):
        users = g.users(key)
        if len(users) != 1:
            return None if not users else users[0]
        key = users[0]
        if g.op(key) not in _VIEW_OPS:
            return key
    return None


def _first_operand_root(g, user, softmax):
    first = g.operands(user)[0]
    key = first
    for _ in range(32):
        if key is softmax or isinstance(key, Const) or g.op(key) not in _VIEW_OPS:
            break
        key = g.operands(key)[0]
    return first if key is softmax else None


def _numel(key) -> int:
    from .meta import TensorInfo, val

    info = val(origin(key)) if not isinstance(key, (Const, Virtual)) else None
    return int(torch.Size(info.shape).numel()) if isinstance(info, TensorInfo) else 0


def _describe(g, key) -> str:
    node = origin(key)
    if node.op == "call_function" and target_name(node) == "einsum":
        return f"einsum {node.args[0]!r}"
    return f"{node.name} ({target_name(node)})"
