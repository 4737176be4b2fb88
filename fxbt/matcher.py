"""Structural matching of a pattern graph against a model's canonical graph.

Candidates come from anchor nodes: every model node whose canonical op is the pattern root's op.
From there the match walks the networkx graph downwards along operands, so the cost per pattern is
proportional to the number of anchors (linear in model depth), never a whole-graph isomorphism search.

The walk understands:
- wildcards: a pattern argument binds any value (a node or a constant); the same argument used
  twice must bind the same value;
- commutative operands (``add``, ``mul``): both orders are tried;
- transparent ops (dropout, contiguous, float casts): skipped in the model graph and kept in the match;
- constraints: a pattern op's attributes (``dim=-1``, ``approximate='none'``) must equal the model's;
  attributes the pattern leaves as None are free;
- markers (`chain`, `views`): zero or more ops of a given kind, backtracking over their length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.fx

from .canon import COMMUTATIVE, TRANSPARENT, CanonicalGraph, Const, origin
from .pattern import PatternGraph

MARKER_OPS = {
    "chain": frozenset({"mul", "div", "add", "sub", "masked_fill", "where", "float_cast", "reshape"}),
    "views": frozenset({"reshape"}),
    # head split/merge; elementwise ops are let through so a check can name them (rotary embeddings)
    "heads": frozenset({"reshape", "transpose", "permute", "unsqueeze", "mul", "add", "sub", "neg", "cat",
                        "float_cast",
                        # taking Q, K or V out of one packed projection: qkv[0], qkv.unbind(0)[i], qkv.chunk(3)[i]
                        "getitem", "method:unbind", "fn:unbind", "method:chunk", "fn:chunk", "method:split",
                        "fn:split"}),
}
_CHAIN_LIMIT = 16


@dataclass
class Match:
    """One way a pattern matched: wildcard bindings, matched model keys, chains."""

    graph: CanonicalGraph
    root: Any
    bindings: dict[str, Any] = field(default_factory=dict)
    keys: list = field(default_factory=list)  # model keys the pattern's ops matched (not wildcards)
    chains: dict[str, list] = field(default_factory=dict)  # marker node name -> [(key, continuing operand index)]
    by_pattern: dict = field(default_factory=dict)  # pattern key -> model key

    def nodes(self) -> set[torch.fx.Node]:
        return {origin(k) for k in self.keys}

    @property
    def options(self) -> dict:
        """The options given to `fxbt.optimize` (checks read their own, e.g. ``encoder_impl``)."""
        return self.graph.options


class _State:
    """Immutable-by-copy matching state (patterns are small; copying is cheap and keeps backtracking simple)."""

    __slots__ = ("bind", "keys", "chains", "by_pattern")

    def __init__(self, bind=None, keys=(), chains=None, by_pattern=None):
        self.bind = bind or {}
        self.keys = keys
        self.chains = chains or {}
        self.by_pattern = by_pattern or {}

    def with_key(self, pkey, key, skipped=()):
        return _State(self.bind, self.keys + tuple(skipped) + (key,), self.chains, {**self.by_pattern, pkey: key})

    def with_bind(self, name, value):
        return _State({**self.bind, name: value}, self.keys, self.chains, self.by_pattern)


def find_matches(pattern: PatternGraph, graph: CanonicalGraph) -> Iterator[Match]:
    """Every anchor in ``graph`` where ``pattern`` matches (the first way it matches there)."""
    for anchor in graph.by_op.get(pattern.anchor_op, ()):
        state = next(_match(pattern, pattern.root, graph, anchor, _State(), transparent_ok=False), None)
        if state is not None:
            yield Match(graph, anchor, dict(state.bind), list(dict.fromkeys(state.keys)), state.chains, state.by_pattern)


def _match(pg: PatternGraph, p, g: CanonicalGraph, t, state: _State, transparent_ok=True) -> Iterator[_State]:
    pc = pg.canon
    if isinstance(p, Const):
        if isinstance(t, Const) and _same_const(p.value, t.value):
            yield state
        return
    pop = pc.op(p)
    if pop == "input":
        yield from _bind(p.target, t, state)
        return
    if isinstance(t, Const):
        return
    marker = pg.marker(p)
    if marker:
        yield from _match_chain(pg, p, g, t, state, 0, MARKER_OPS[marker])
        return
    skipped = []
    if transparent_ok and pop not in TRANSPARENT:
        t, skipped = g.through_transparent(t)
        if isinstance(t, Const):
            return
    if g.op(t) != pop or not _attrs_fit(pc.canon(p).attrs, g.canon(t).attrs):
        return
    state = state.with_key(p, t, skipped)
    p_operands, t_operands = pc.operands(p), g.operands(t)
    if len(p_operands) > len(t_operands):
        return
    orders = [t_operands]
    if pop in COMMUTATIVE and len(t_operands) == 2:
        orders.append([t_operands[1], t_operands[0]])
    for operands in orders:
        yield from _match_operands(pg, p_operands, g, operands, state)


def _match_operands(pg, ps, g, ts, state) -> Iterator[_State]:
    if not ps:
        yield state
        return
    for s in _match(pg, ps[0], g, ts[0], state):
        yield from _match_operands(pg, ps[1:], g, ts[1:], s)


def _bind(name, t, state: _State) -> Iterator[_State]:
    if name in state.bind:
        if _same_value(state.bind[name], t):
            yield state
        return
    yield state.with_bind(name, t)


def _match_chain(pg, p, g, t, state, depth, allowed) -> Iterator[_State]:
    """Zero modifiers first (``t`` itself must match the marker's operand), then one more and recurse."""
    inner = pg.canon.operands(p)[0]
    name = p.name
    steps = state.chains.get(name, [])
    done = _State(state.bind, state.keys, {**state.chains, name: steps}, state.by_pattern)
    yield from _match(pg, inner, g, t, done)
    if depth >= _CHAIN_LIMIT or isinstance(t, Const):
        return
    op = g.op(t)
    if op not in allowed and op not in TRANSPARENT:
        return
    for pos in _continuing_operands(g, t, op):
        nxt = g.operands(t)[pos]
        if isinstance(nxt, Const):
            continue
        grown = _State(state.bind, state.keys + (t,), {**state.chains, name: steps + [(t, pos)]}, state.by_pattern)
        yield from _match_chain(pg, p, g, nxt, grown, depth + 1, allowed)


def _continuing_operands(g, t, op) -> tuple[int, ...]:
    if op in ("add", "mul"):
        return (0, 1)
    if op == "where":
        return (1, 2)
    return (0,)


def _attrs_fit(pattern_attrs: dict, model_attrs: dict) -> bool:
    """Pattern attributes left as None, ``...`` or a pattern argument are free; others must be equal."""
    return all(v is None or v is Ellipsis or isinstance(v, torch.fx.Node) or _same_const(model_attrs.get(k), v)
               for k, v in pattern_attrs.items())


def _same_const(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _same_value(a, b) -> bool:
    if isinstance(a, Const) and isinstance(b, Const):
        return _same_const(a.value, b.value)
    return a is b
