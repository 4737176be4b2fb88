"""Patterns and rules.

A rule is a small value: a *pattern* (an example function written like the code it matches), a
*replacement* (a function with the same inputs), and an optional *check* that reads node metadata and
either accepts the match, saying what the replacement receives, or declines it with a reason.

    def pattern(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def replacement(x, weight, eps):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)

The pattern is traced with torch.fx and seen through the canonical view, so ``x / s`` and
``x * (1/s)``, ``a @ b`` and ``torch.bmm(a, b)``, ``nn.Linear`` and ``F.linear`` need one pattern.
A pattern may call `chain(x)` to stand for zero or more score-modifying ops (scale, add, mask) ending
in ``x``: one pattern then covers every order in which models apply scale, bias and mask.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from .canon import CanonicalGraph
from .errors import PatternError


def _marker_call(marker, x):
    """Inside a traced pattern a marker is one node of its own, however it was referenced."""
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", marker, (x,), {})
    return x


def chain(x):
    """Pattern marker: zero or more elementwise score modifiers (scale, add, masked_fill, where) on ``x``."""
    return _marker_call(chain, x)


def views(x):
    """Pattern marker: zero or more reshapes of ``x`` (``view``/``reshape`` between equal element counts)."""
    return _marker_call(views, x)


def heads(x):
    """Pattern marker: zero or more layout ops of ``x`` (view, transpose, permute) splitting or merging heads."""
    return _marker_call(heads, x)


MARKERS = {"chain": chain, "views": views, "heads": heads}


@dataclass(frozen=True)
class Accept:
    """A check's verdict: rewrite, calling the replacement with ``inputs`` (graph values) and ``params``."""

    inputs: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    absorb: tuple = ()  # extra nodes (keys) that become part of the region
    outputs: tuple = ()  # the region's outputs, where it has several (the match root otherwise)
    note: str = ""
    impl: str = ""  # which implementation runs, where a kernel has several (shown in the report)


@dataclass(frozen=True)
class Decline:
    """A check's verdict: leave the match alone, for this reason (shown in the report)."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(eq=False)
class Rule:
    name: str
    pattern: Callable
    replacement: Callable
    check: Callable | None = None
    kernel: str | None = None
    priority: int = 0  # lower runs first; rules of one priority share one pass
    fallback: Callable | None = None  # fallback(region, inputs) -> reason to run the original, or None
    after_pass: Callable | None = None  # after_pass(gm, [(call node, Region)], report): link a pass's regions
    enabled: Callable | None = None  # enabled(options) -> whether the options given to optimize ask for this rule
    defined_at: str = ""
    graph: "PatternGraph | None" = None

    def __post_init__(self):
        if self.kernel is None:
            self.kernel = self.name
        self.graph = PatternGraph.trace(self.pattern, self.name)
        _check_signatures(self)
        if not self.defined_at:
            try:
                src = inspect.getsourcefile(self.pattern)
                line = inspect.getsourcelines(self.pattern)[1]
                self.defined_at = f"{src}:{line}"
            except (OSError, TypeError):
                self.defined_at = "<unknown>"


def _check_signatures(rule: Rule) -> None:
    pattern_params = list(inspect.signature(rule.pattern).parameters)
    replacement_params = inspect.signature(rule.replacement).parameters
    if rule.check is None:
        names = [p for p in replacement_params if p != "training"]
        if names != pattern_params:
            raise PatternError(
                f"rule {rule.name!r}: the pattern takes ({', '.join(pattern_params)}) but the replacement takes "
                f"({', '.join(names)}). Give both functions the same parameters, in the same order."
            )
    unused = rule.graph.unused_inputs()
    if unused:
        raise PatternError(
            f"rule {rule.name!r}: pattern argument(s) {', '.join(unused)} are never used by the pattern, so "
            "nothing could bind them. Use them in the pattern or remove them from both functions."
        )


def _trace_function(fn: Callable) -> torch.fx.Graph:
    """Trace a pattern by calling it on proxies. Unlike ``torch.fx.Tracer``, this patches nothing
    process-wide (fx's tracer swaps ``nn.Module.__call__`` while it runs), so registering a pattern is safe
    while other threads run models."""
    graph = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    proxies = [torch.fx.Proxy(graph.placeholder(name), tracer) for name in inspect.signature(fn).parameters]
    result = fn(*proxies)
    graph.output(result.node if isinstance(result, torch.fx.Proxy) else result)
    return graph


@dataclass
class PatternGraph:
    """A traced pattern in the canonical view: wildcards (the arguments) and the op tree above them."""

    fx_graph: torch.fx.Graph
    canon: CanonicalGraph
    root: Any
    wildcards: list

    @classmethod
    def trace(cls, fn: Callable, name: str) -> "PatternGraph":
        try:
            graph = _trace_function(fn)
        except Exception as e:
            raise PatternError(f"pattern {name!r} could not be traced by torch.fx: {e}") from None
        canon = CanonicalGraph(None, graph)
        out = next(n for n in graph.nodes if n.op == "output")
        root = out.args[0]
        if not isinstance(root, torch.fx.Node) or root.op == "placeholder":
            raise PatternError(f"pattern {name!r} must return one computed tensor, got {root!r}")
        wildcards = [n for n in graph.nodes if n.op == "placeholder"]
        return cls(graph, canon, root, wildcards)

    @property
    def anchor_op(self) -> str:
        return self.canon.op(self.root)

    def unused_inputs(self) -> list[str]:
        return [w.target for w in self.wildcards if not w.users]

    def marker(self, key) -> str | None:
        """The marker a pattern node stands for ("chain", "views"), or None for an ordinary op."""
        op = self.canon.op(key)
        return op[3:] if op.startswith("fn:") and op[3:] in MARKERS else None
