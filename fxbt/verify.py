"""Verification: every region against its original subgraph, on the example inputs.

The graph runs once; at each region both the replacement and the original are computed from the same
inputs and compared (fp32 max abs error). A region whose outputs differ beyond the tolerance is reverted:
its original subgraph is put back in the graph, and the report row says why. Regions whose output is
packed (the middle of a fused encoder stack) are compared after unpacking; padded positions, which fused
encoder blocks leave as zeros by design, are not compared.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from .region import Region, slot_value, inline_region, materialize

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def verify(gm: torch.fx.GraphModule, flat_inputs: list, report) -> list[str]:
    """Revert the regions of ``gm`` that disagree with their originals; return their names."""
    errors: dict[str, float] = {}

    class Checker(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            module = self.fetch_attr(target)
            out = super().call_module(target, args, kwargs)
            if isinstance(module, Region) and module.kernel not in ("deferred",):
                errors[target] = _difference(out, module, args)
            return out

    with torch.no_grad():
        Checker(gm).run(*flat_inputs)
    bad = [name for name, (err, tol) in errors.items() if err > tol]
    for name in bad:
        inline_region(gm, name)
        err, tol = errors[name]
        for row in report.rows:
            if row.region == name:
                row.status, row.reason = "rejected", f"verification: outputs differ by {err:.1e} (tolerance {tol:.0e})"
    if bad:
        gm.graph.lint()
        gm.recompile()
    return bad


def _difference(out, region: Region, args) -> tuple[float, float]:
    want = region.original(*map(materialize, args))
    keep = getattr(out, "keep", None)
    got = materialize(out)
    worst, tol = 0.0, 0.0
    for w, g in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        diff = (w.float() - g.float()).abs()
        if keep is not None and diff.dim() == 3 and diff.shape[:2] == keep.shape:
            diff = diff * keep[..., None]
        elif region.kernel == "fused_encoder" and diff.dim() == 3:
            diff = diff * _keep_of(region, args, diff)
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        tol = max(tol, TOLERANCE.get(w.dtype, 1e-5))
    return worst, tol or 1e-5


def _keep_of(region: Region, args, diff):
    """The real-token mask of a fused encoder block's input, from the model's own mask."""
    from .patterns.encoder import key_padding

    terms = slot_value(region.slots["mask_terms"], args)
    x = slot_value(region.slots["x"], args)
    keep = key_padding(region.params["spec"], terms, x) if isinstance(x, torch.Tensor) else x.keep
    return torch.ones_like(diff[..., :1]) if keep is None else keep[..., None].to(diff.dtype)
