"""Verification: every region against its original subgraph, on the example inputs.

The graph runs once; at each region both the replacement and the original are computed from the same
inputs and compared (max abs error; in fp16 and bf16 relative to the output's magnitude). A region whose
outputs differ beyond the tolerance, or whose replacement cannot compute the example at all (it raises, or
finds a run-time assumption broken), is reverted: its original subgraph is put back in the graph, and the
report row says why. Regions whose
output is packed (the middle of a padding-free stack) are compared after unpacking; padded positions,
which such stacks leave as zeros by design, are not compared.

A graph captured in training mode draws random numbers in dropout, differently in a region and in its
original; it is verified with dropout off on both sides. A padding-free stack verified on an example with no
padding (a batch of one) runs its packed path on every token rather than its original (`verifying`): what a
padded call adds to that path, the restricted masks, is checked on every call.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .canon import canonical_op
from .region import Region, UseOriginal, inline_region, materialize, slot_value

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_STATE = threading.local()


def verifying() -> bool:
    """True while verification runs a graph: dropout is off, and replacements compute what they would skip
    (replacements ask this)."""
    return getattr(_STATE, "verifying", False)


@contextlib.contextmanager
def _verifying():
    _STATE.verifying = True
    try:
        yield
    finally:
        _STATE.verifying = False


def verify(gm: torch.fx.GraphModule, flat_inputs: list, report) -> list[str]:
    """Revert the regions of ``gm`` that disagree with their originals; return their names."""
    verdicts: dict[str, tuple[float, float] | str] = {}

    class Checker(_DropoutFree):
        def call_module(self, target, args, kwargs):
            module = self.fetch_attr(target)
            if not isinstance(module, Region) or module.kernel == "deferred":
                return super().call_module(target, args, kwargs)
            count = sum(1 for n in module.original.graph.nodes if n.op == "placeholder")
            want = _DropoutFree(module.original).run(*map(materialize, args[:count]))
            try:
                got = _replacement_of(module, args)
                verdicts[target] = _difference(want, got, module, args)
            except Exception as e:  # noqa: BLE001 - a replacement that cannot compute the example is reverted
                verdicts[target] = str(e) if isinstance(e, UseOriginal) else f"{type(e).__name__}: {e}"
                return want
            return got

    with torch.no_grad(), _verifying():
        Checker(gm).run(*flat_inputs)
    bad = [name for name, v in verdicts.items() if isinstance(v, str) or v[0] > v[1]]
    reverted_with = {}  # a reverted region that checked the zeros other regions leave: they go with it
    for name in bad:
        for source in getattr(gm.get_submodule(name), "padding_sources", ()):
            if source not in bad:
                reverted_with.setdefault(source, name)
    bad += list(reverted_with)
    for name in bad:
        inline_region(gm, name)
        verdict = verdicts.get(name)
        why = (f"verification: an attention reading its padded positions was reverted ({reverted_with[name]})"
               if name in reverted_with else
               f"verification: the replacement cannot compute the example ({verdict})" if isinstance(verdict, str)
               else f"verification: outputs differ by {verdict[0]:.1e} (tolerance {verdict[1]:.0e})")
        for row in report.rows:
            if row.region == name:
                row.status, row.reason = "rejected", why
    if bad:
        gm.graph.lint()
        gm.recompile()
    return bad


def _replacement_of(region: Region, args):
    """The region's replacement on ``args``, strictly: no fallback to the original."""
    reason = region.fallback(region, args) if region.fallback is not None else None
    if reason:
        raise UseOriginal(reason)
    kwargs = {name: slot_value(slot, args) for name, slot in region.slots.items()}
    if region.wants_training:
        kwargs["training"] = region.training
    return region.replacement(**kwargs, **region.params)


class _DropoutFree(torch.fx.Interpreter):
    """Runs a graph with every dropout an identity."""

    def call_function(self, target, args, kwargs):
        if self._is_dropout():
            return args[0]
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if self._is_dropout():
            return args[0]
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if isinstance(self.fetch_attr(target), torch.nn.Dropout):
            return args[0]
        return super().call_module(target, args, kwargs)

    def _is_dropout(self) -> bool:
        return canonical_op(self._current, self.module).op == "dropout"

    def run_node(self, n):
        self._current = n
        return super().run_node(n)


def run_without_dropout(gm: torch.fx.GraphModule, inputs) -> Any:
    """``gm`` on ``inputs`` with every dropout an identity (a replacement that runs a graph, verified)."""
    return _DropoutFree(gm).run(*inputs)


def _difference(want, out, region: Region, args) -> tuple[float, float]:
    keep = getattr(out, "keep", None)
    real = getattr(out, "fxbt_real", None)  # per output, where it holds real tokens (padded positions are zeros)
    got = materialize(out)
    worst, tol = 0.0, 0.0
    leaves = zip(pytree.tree_leaves(want), pytree.tree_leaves(got), real or itertools.repeat(None))
    for w, g, where in leaves:
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        if w.shape != g.shape:
            return float("inf"), 0.0
        diff = (w.float() - g.float()).abs()
        same_nan = torch.isnan(w) & torch.isnan(g)
        diff = torch.where(same_nan, torch.zeros_like(diff), torch.nan_to_num(diff, nan=float("inf")))
        if where is not None:
            diff = torch.where(where, diff, 0.0)
        elif keep is not None and diff.dim() == 3 and diff.shape[:2] == keep.shape:
            diff = torch.where(keep[..., None], diff, 0.0)
        elif region.kernel == "fused_encoder" and diff.dim() == 3:
            diff = torch.where(_keep_of(region, args, diff), diff, 0.0)
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        tol = max(tol, _tolerance(w))
    return worst, tol or 1e-5


def _tolerance(want: torch.Tensor) -> float:
    """fp32 and fp64: absolute. fp16 and bf16: relative to the output's largest magnitude, since their rounding
    is (two kernels' roundings of one sum differ by a few units in the last place of its magnitude)."""
    tol = TOLERANCE.get(want.dtype, 1e-5)
    if want.dtype in (torch.float16, torch.bfloat16) and want.numel():
        tol *= max(1.0, torch.nan_to_num(want.float(), nan=0.0, posinf=0.0, neginf=0.0).abs().max().item())
    return tol


def _keep_of(region: Region, args, diff):
    """The real-token mask of a fused encoder block's input, from the model's own mask."""
    from .patterns.encoder import key_padding

    terms = slot_value(region.slots["mask_terms"], args)
    x = slot_value(region.slots["x"], args)
    keep = key_padding(region.params["spec"], terms, x) if isinstance(x, torch.Tensor) else x.real()
    return torch.ones_like(diff[..., :1], dtype=torch.bool) if keep is None else keep[..., None]
