"""The report: what was rewritten, what was declined and why, how each graph was captured, and what ran.

A `Report` describes one graph (one specialization, or one graph torch.compile handed over): a row per
candidate region with what the rule decided, and for each rewritten region live counters of how its
calls went (the fast path, or the original subgraph and why). A `ModelReport` is what
``fxbt.report(model)`` returns for an optimized model: every specialization in use with the reason it
was made, the calls that ran the model's own forward and why, and the graphs of calls with a KV cache.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

import tabulate


@dataclass
class Row:
    region: str  # the region's module name, or the candidate's root node for a declined match
    pattern: str  # rule name
    kernel: str  # "sdpa", "fused_encoder", or a custom rule's kernel
    status: str  # "rewritten" or "rejected"
    reason: str  # why it was rejected, or a note on the rewrite
    frontend: str
    impl: str = ""  # the implementation that runs, where a kernel has several
    nodes: int = 0  # model nodes the match covered
    calls: Counter = field(default_factory=Counter)  # "fast" or the reason the original ran -> calls
    covers: frozenset = frozenset()  # names of the model nodes a declined match covered (fxbt/accounting.py)

    def runs(self) -> str:
        """How this region's calls went, e.g. "3 fast, 1 original (gradients enabled)"."""
        fast = self.calls.get("fast", 0)
        others = [f"{n} original ({why})" for why, n in self.calls.items() if why != "fast"]
        return ", ".join(([f"{fast} fast"] if fast or not others else []) + others) if self.calls else ""


@dataclass
class Report:
    frontend: str
    failures: dict[str, str] = field(default_factory=dict)  # frontend -> why it failed
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    reason: str = ""  # why this graph was made (the call it was specialized for)

    def rewritten(self, kernel: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.status == "rewritten" and (kernel is None or r.kernel == kernel)]

    def rejected(self, kernel: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.status == "rejected" and (kernel is None or r.kernel == kernel)]

    def as_dicts(self) -> list[dict]:
        return [{f.name: dict(r.calls) if f.name == "calls" else getattr(r, f.name) for f in fields(r)
                 if f.name != "covers"} for r in self.rows]

    def __str__(self) -> str:
        head = f"captured with {self.frontend}" + (f", for: {self.reason}" if self.reason else "")
        if self.failures:
            head += " (" + "; ".join(f"{k} failed: {v}" for k, v in self.failures.items()) + ")"
        if self.notes:
            head += "\n" + "\n".join(f"note: {n}" for n in self.notes)
        cols = ["region", "pattern", "kernel", "impl", "status", "reason"]
        body = [[getattr(r, c) for c in cols] + [r.runs()] for r in self.rows]
        table = tabulate.tabulate(body, headers=cols + ["calls"])
        summary = f"{len(self.rewritten())} rewritten, {len(self.rejected())} rejected"
        return f"{head}\n{table}\n{summary}"


@dataclass
class ModelReport:
    """Every graph an optimized model uses, and what ran on its calls."""

    reports: list[Report]  # specializations in use, most recently used first
    history: list[str] = field(default_factory=list)  # specializations made and dropped, with reasons
    original_calls: Counter = field(default_factory=Counter)  # reason -> calls the model's own forward ran
    compiled: list[Report] = field(default_factory=list)  # torch.compile's graphs (KV caches, uncaptured calls)

    @property
    def rows(self) -> list[Row]:
        return [row for r in self.reports + self.compiled for row in r.rows]

    @property
    def frontend(self) -> str:
        return self.reports[-1].frontend if self.reports else "torch.compile" if self.compiled else ""

    @property
    def failures(self) -> dict[str, str]:
        return self.reports[-1].failures if self.reports else {}

    @property
    def notes(self) -> list[str]:
        return self.reports[-1].notes if self.reports else []

    def rewritten(self, kernel: str | None = None) -> list[Row]:
        return [row for r in self.reports + self.compiled for row in r.rewritten(kernel)]

    def rejected(self, kernel: str | None = None) -> list[Row]:
        return [row for r in self.reports + self.compiled for row in r.rejected(kernel)]

    def __str__(self) -> str:
        parts = [f"specialization {i + 1} of {len(self.reports)}: {r}" for i, r in enumerate(reversed(self.reports))]
        parts += [f"graph {i + 1} from torch.compile: {r}" for i, r in enumerate(self.compiled)]
        if not parts:
            parts.append("no graph yet: the first call is captured")
        if self.original_calls:
            parts.append("calls run by the model's own forward:\n" + "\n".join(
                f"  {n} x {why}" for why, n in self.original_calls.items()))
        if len(self.history) > len(self.reports):
            parts.append("history:\n" + "\n".join(f"  {h}" for h in self.history))
        return "\n\n".join(parts)
