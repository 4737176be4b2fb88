"""fxbt: a torch.fx rewriting pass that makes transformer inference fast without touching model code.

    model = fxbt.optimize(model)      # the same model; its calls run rewritten graphs
    print(fxbt.report(model))         # every graph, what was rewritten and why not, what ran
    original = fxbt.unroll(model)     # a captured graph, exactly
    fxbt.restore(model)               # the model's own forward again
"""
from . import backend  # noqa: F401  (fxbt.backend.reports(); torch.compile finds it by entry point)
from ._version import __version__
from .api import optimize, report, restore, unroll
from .capture import capture
from .export import export
from .errors import CaptureError, ExportError, FxbtError, InputError, PatternError, RewriteError
from .pattern import Accept, Decline, Rule, chain
from .registry import register_pattern, unregister_pattern

__all__ = [
    "optimize", "restore", "report", "unroll", "capture", "export", "register_pattern", "unregister_pattern",
    "Rule", "Accept", "Decline", "chain",
    "FxbtError", "CaptureError", "PatternError", "InputError", "RewriteError", "ExportError",
    "__version__",
]
