"""The rewrite pass: match rules on the canonical view, check each match, install regions, report.

Rules run in passes by priority (attention before encoder blocks, so an encoder pattern can see an
attention region as one op). Within a pass, matches are taken in graph order and never overlap.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.fx

from .accounting import account
from .canon import CanonicalGraph, Const, origin
from .errors import RewriteError
from .matcher import Match, find_matches
from .pattern import Accept, Decline, Rule
from .region import (Region, Slot, absorb_size_computations, boundary, escaping, extract, install,
                     metadata_stand_ins, rewire, topological_order)
from .report import Report, Row
from .stages import stage

log = logging.getLogger("fxbt")


def apply_rules(gm: torch.fx.GraphModule, rules: list[Rule], report: Report, options: dict | None = None) -> None:
    rules = [r for r in rules if r.enabled is None or r.enabled(options or {})]
    for _, group in itertools.groupby(sorted(rules, key=lambda r: r.priority), key=lambda r: r.priority):
        _run_pass(gm, list(group), report, options or {})
        with stage("lint and recompile"):
            _lint(gm)
    account(gm, report)  # a row for every softmax no rule rewrote or declined
    with stage("lint and recompile"):
        gm.recompile()


def apply_and_verify(gm: torch.fx.GraphModule, rules: list[Rule], report: Report, options: dict, inputs,
                     verify: bool = True) -> None:
    """``apply_rules``, then verification. Where verification reverts a region, the passes after its rule's run
    again on the subgraph it put back: a block template that did not fit the example (a mask that varies over
    heads) leaves its attentions to the padding-free pass, as if it had declined at its check."""
    from .verify import verify as verify_regions

    apply_rules(gm, rules, report, options)
    while verify:
        with stage("verification"):
            reverted = verify_regions(gm, inputs, report)
        priority = {r.name: r.priority for r in rules}
        first = min((priority[row.pattern] for row in report.rows if row.region in reverted and row.pattern in
                     priority), default=None)
        later = [r for r in rules if first is not None and r.priority > first]
        if not later:
            return
        apply_rules(gm, later, report, options)


def _run_pass(gm, rules, report, options) -> None:
    with stage("canonical view"):
        graph = CanonicalGraph(gm, options=options)
    taken: set[torch.fx.Node] = set()
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    installed: dict[str, list[str]] = {}
    for rule in rules:
        with stage("matching"):
            matches = list(find_matches(rule.graph, graph))
        for match in matches:
            if origin(match.root) in taken:
                continue
            with stage("checks"):
                verdict = _judge(rule, match, taken)
            if isinstance(verdict, Decline):
                log.info("fxbt: %s declined at %s: %s", rule.name, origin(match.root).name, verdict.reason)
                report.rows.append(Row(origin(match.root).name, rule.name, rule.kernel, "rejected",
                                       verdict.reason, report.frontend, nodes=len(match.nodes()),
                                       covers=frozenset(n.name for n in match.nodes())))
                continue
            interior, accept, stand_ins = verdict
            with stage("region extraction"):
                name = _install(gm, rule, match, interior, accept, stand_ins, replaced)
            taken |= interior
            row = Row(name, rule.name, rule.kernel, "rewritten", accept.note, report.frontend, impl=accept.impl,
                      nodes=len(interior))
            gm.get_submodule(name).calls = row.calls  # the row counts the region's calls as they happen
            report.rows.append(row)
            installed.setdefault(rule.name, []).append(name)
    for rule in rules:
        if rule.after_pass is not None and rule.name in installed:
            nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
            with stage("after-pass hooks"):
                rule.after_pass(gm, [(nodes[name], gm.get_submodule(name)) for name in installed[rule.name]], report)


def _judge(rule: Rule, match: Match, taken: set) -> Decline | tuple[set, Accept, dict]:
    try:
        verdict = rule.check(match) if rule.check is not None else Accept(dict(match.bindings))
    except Exception as e:  # a check that crashes must not take the whole optimisation down
        return Decline(f"check {rule.name} failed: {type(e).__name__}: {e}")
    if verdict is None or verdict is True:
        verdict = Accept(dict(match.bindings))
    if verdict is False:
        verdict = Decline(f"check {rule.name} returned False")
    if isinstance(verdict, Decline):
        return verdict
    root = _roots(match, verdict)
    interior = absorb_size_computations(match.nodes() | {origin(k) for k in verdict.absorb})
    if interior & taken:
        return Decline("overlaps a region already rewritten in this pass")
    leaks = escaping(interior, root)
    if leaks:
        names = ", ".join(sorted(n.name for n in leaks))
        return Decline(f"intermediate value(s) {names} are also used outside the match")
    stand_ins = metadata_stand_ins(interior, root, boundary(interior, origin(match.root).graph))
    if isinstance(stand_ins, str):
        return Decline(stand_ins)
    return interior, verdict, stand_ins


def _roots(match: Match, accept: Accept):
    """The region's output: the match root, or the tuple of outputs the check named."""
    return tuple(origin(k) for k in accept.outputs) if accept.outputs else origin(match.root)


def _install(gm, rule, match, interior, accept, stand_ins, replaced) -> str:
    root = _roots(match, accept)
    inputs = boundary(interior, gm.graph)
    # values only the replacement reads (run-time checks: positions a later op picks) come after the original's
    read: list = []
    torch.fx.node.map_arg(tuple(accept.inputs.values()), read.append)
    extra = [n for n in dict.fromkeys(replaced.get(n, n) for n in read) if n not in inputs and n not in interior]
    position = {n: i for i, n in enumerate(inputs + extra)}
    slots = {name: _slot(value, position, replaced) for name, value in accept.inputs.items()}
    rewire(stand_ins)
    original = extract(gm, interior, root, inputs)
    region = Region(rule.name, rule.kernel, original, rule.replacement, slots, dict(accept.params), rule.fallback)
    call = install(gm, region, interior, root, inputs + extra)
    if extra:
        topological_order(gm.graph)
    if not isinstance(root, tuple):
        replaced[root] = call
    return call.target


def _slot(value, position, replaced):
    if isinstance(value, (list, tuple)):
        return Slot(index=tuple(_index(v, position, replaced) for v in value), many=True)
    if isinstance(value, Const):
        return Slot(value=value.value)
    if isinstance(value, torch.fx.Node):
        return Slot(index=_index(value, position, replaced))
    return Slot(value=value)


def _index(value, position, replaced):
    if isinstance(value, Const):
        return value
    node = replaced.get(value, value)
    if node not in position:
        raise RewriteError(f"replacement input {node.name} is not an input of the region")
    return position[node]


def _lint(gm: torch.fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise RewriteError(f"the rewritten graph is malformed: {e}") from e
