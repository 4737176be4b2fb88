"""Two-operand einsums that are batched matrix products, written out as the permutes and matmul they compute.

``torch.einsum("bqhd,bkhd->bhqk", q, k)`` is Q·Kᵀ with the head axis moved; ``"bhqk,bkhd->bqhd"`` is P·V with
its output permuted. The canonical view already reads an einsum laid out like matmul as one (fxbt/canon.py);
an einsum with any other arrangement of its batch, row, contraction and column axes is written here, before
matching, as ``permute`` → ``matmul`` → ``permute`` nodes, so that attention written this way is recognised
like attention written with transposes. The right operand is written as ``[..., columns, contraction]``
transposed where its axes come in that order (the usual ``k.transpose(-2, -1)``). einsum computes a pair
product the same way (a permute of each operand, then one batched GEMM), and capture's reproduction check
holds the written-out graph to the model's outputs.
"""
from __future__ import annotations

import torch
import torch.fx


def write_out(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Rewrite every einsum of ``gm`` that is a batched matrix product in a layout matmul does not have;
    return the nodes added (they need fake values on dynamo graphs)."""
    added: list[torch.fx.Node] = []
    for node in list(gm.graph.nodes):
        operands = _operands(node)
        plan = _plan(node.args[0], operands) if operands else None
        if plan is None:
            continue
        a_perm, b_perm, transpose, out_perm = plan
        with gm.graph.inserting_before(node):
            a = _permuted(gm.graph, operands[0], a_perm, added)
            b = _permuted(gm.graph, operands[1], b_perm, added)
            if transpose:
                b = gm.graph.call_method("transpose", (b, -2, -1))
                added.append(b)
            out = gm.graph.call_function(torch.matmul, (a, b))
            added.append(out)
            out = _permuted(gm.graph, out, out_perm, added)
        out.meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val")})
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    if added:
        gm.recompile()
    return added


def _operands(node: torch.fx.Node) -> list | None:
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not node.args:
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    ok = len(operands) == 2 and all(isinstance(x, torch.fx.Node) for x in operands)
    return operands if ok and isinstance(node.args[0], str) else None


def _plan(equation: str, operands) -> tuple | None:
    """(left permutation, right permutation, transpose the right?, output permutation), or None where the
    einsum is not one batched matrix product, or is one in matmul's own layout already."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None  # a diagonal or a repeated output axis
    batch = [x for x in out if x in a and x in b]
    rows, cols = [x for x in a if x not in b], [x for x in b if x not in a]
    summed = [x for x in a if x in b and x not in out]
    if len(rows) != 1 or len(cols) != 1 or len(summed) != 1 or set(out) != set(batch + rows + cols):
        return None
    (i,), (j,), (c,) = rows, cols, summed
    a_perm = [a.index(x) for x in batch + [i, c]]
    transpose = b.index(j) < b.index(c)
    b_perm = [b.index(x) for x in batch + ([j, c] if transpose else [c, j])]
    product = batch + [i, j]
    out_perm = [product.index(x) for x in out]
    if all(_identity(p) for p in (a_perm, b_perm, out_perm)):
        return None  # matmul's layout, the right maybe transposed: the canonical view reads it as it is
    return a_perm, b_perm, transpose, out_perm


def _identity(perm: list[int]) -> bool:
    return perm == list(range(len(perm)))


def _permuted(graph: torch.fx.Graph, x: torch.fx.Node, perm: list[int], added: list) -> torch.fx.Node:
    if _identity(perm):
        return x
    node = graph.call_method("permute", (x, *perm))
    added.append(node)
    return node
