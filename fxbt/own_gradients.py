"""Models that define their own gradients: which ``torch.autograd.Function``s a model's forward calls.

Capture runs without gradients, where a frontend sees only an autograd.Function's forward and writes its
ops into the graph. Differentiating that graph gives the derivative of those ops, not the Function's own
backward: a straight-through estimator, YOSO's expected-hash backward or a custom kernel's gradient would
change silently. So capture records the Functions the model calls (during its reference run), and a call that
records for autograd runs the model's own forward wherever there are any. Calls without gradients, which see
forward values only, keep the graph.
"""
from __future__ import annotations

import contextlib

import torch

# Functions whose backward is the derivative of their forward's ops: torch's own machinery (checkpointing, the
# index Function vmap applies in transformers' mask functions, functorch's wrappers of it) and fxbt's recompute
# from another thread; differentiating the graph is the same
_EXACT_MODULES = ("torch._", "torch.utils.checkpoint", "fxbt.recompute")


@contextlib.contextmanager
def recorded(found: list[str]):
    """Appends to ``found`` the name of every autograd.Function whose ``apply`` runs meanwhile (any thread:
    capture holds its process-wide lock, and a Function another thread applies only makes fxbt careful)."""
    function = torch.autograd.function.Function
    apply = function.__dict__["apply"]

    def recording(cls, *args, **kwargs):
        if not cls.__module__.startswith(_EXACT_MODULES):
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name not in found:
                found.append(name)
        return apply.__func__(cls, *args, **kwargs)

    function.apply = classmethod(recording)
    try:
        yield found
    finally:
        function.apply = apply


def reason(functions: list[str]) -> str:
    short = ", ".join(name.rsplit(".", 1)[-1] for name in functions)
    return (f"the model defines its own gradients ({short}, autograd.Function): a call that records gradients "
            "runs the model's own forward")
