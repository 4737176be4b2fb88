"""fxbt: a torch.fx rewriting pass that makes transformer inference fast without touching model code.

    gm = fxbt.optimize(model, example_inputs)   # a drop-in GraphModule
    print(fxbt.report(gm))                      # what was rewritten, and why not
    original = fxbt.unroll(gm)                  # the captured graph, exactly
"""
from . import backend  # noqa: F401  (fxbt.backend.reports(); torch.compile finds it by entry point)
from ._version import __version__
from .api import optimize, report
from .capture import capture
from .errors import CaptureError, FxbtError, InputError, PatternError, RewriteError
from .export import export
from .pattern import Accept, Decline, Rule, chain
from .region import unroll
from .registry import register_pattern, unregister_pattern

__all__ = [
    "optimize", "report", "unroll", "capture", "export", "register_pattern", "unregister_pattern",
    "Rule", "Accept", "Decline", "chain",
    "FxbtError", "CaptureError", "PatternError", "InputError", "RewriteError",
    "__version__",
]
