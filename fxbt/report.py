"""The report: what was rewritten, what was declined and why, and how the graph was captured."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


@dataclass
class Report:
    frontend: str
    failures: dict[str, str] = field(default_factory=dict)  # frontend -> why it failed
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def rewritten(self, kernel: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.status == "rewritten" and (kernel is None or r.kernel == kernel)]

    def rejected(self, kernel: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.status == "rejected" and (kernel is None or r.kernel == kernel)]

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        head = f"captured with {self.frontend}"
        if self.failures:
            head += " (" + "; ".join(f"{k} failed: {v}" for k, v in self.failures.items()) + ")"
        if self.notes:
            head += "\n" + "\n".join(f"note: {n}" for n in self.notes)
        cols = ["region", "pattern", "kernel", "impl", "status", "reason"]
        table = tabulate.tabulate([[getattr(r, c) for c in cols] for r in self.rows], headers=cols)
        summary = f"{len(self.rewritten())} rewritten, {len(self.rejected())} rejected"
        return f"{head}\n{table}\n{summary}"
