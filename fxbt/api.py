"""The public entry points: `optimize`, `restore`, `report`, `unroll`, and what they accept."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.fx

from .capture import split_example
from .errors import CaptureError, FxbtError, InputError
from .examples import example_for
from .optimized import Optimized, Options, Specialization, install, installed, uninstall
from .report import ModelReport

ENCODER_IMPLS = ("auto", "fused")


def optimize(model: torch.nn.Module, example_inputs=None, *, inplace: bool = True, patterns=None,
             frontend: str | None = None, encoder_impl: str = "auto", verify: bool = True,
             max_specializations: int = 8) -> torch.nn.Module:
    """Make ``model``'s calls run fxbt's rewritten graphs, and return the model.

    The model stays itself (same class, attributes, ``state_dict``, ``.generate()``...); only its calls
    change. ``inplace=False`` leaves ``model`` untouched and returns a shallow copy that shares its weights
    and submodules. A module that holds transformers models (a SentenceTransformer) is optimized whole, its own
    code (a pooling) included: what reads a stack's padded positions is then in the graph. ``example_inputs``
    (a tuple, a dict or a tokenizer's BatchEncoding) is captured now; without it fxbt builds one from the
    model's config, or captures the first call. Every call the existing graphs do not cover (other inputs,
    sizes outside their guards, another mode) gets a graph of its own, up to ``max_specializations`` per
    model. ``encoder_impl``: "auto" (the padding-free pass runs every stack on its real tokens) or "fused"
    (encoder blocks that fit PyTorch's fused encoder kernel run it, the rest of the stack padding-free).
    ``verify`` runs every region against its original subgraph on the example and reverts any that differs.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxbt.optimize takes a torch.nn.Module, got {type(model).__name__}")
    if encoder_impl == "dense":
        raise InputError("encoder_impl='dense' was removed: the padding-free pass, the default ('auto'), runs "
                         "encoder blocks on their real tokens as dense blocks did; drop the argument")
    if encoder_impl not in ENCODER_IMPLS:
        raise InputError(f"encoder_impl must be 'auto' or 'fused', got {encoder_impl!r}")
    if not isinstance(max_specializations, int) or max_specializations < 1:
        raise InputError(f"max_specializations must be a positive int, got {max_specializations!r}")
    options = Options(patterns, frontend, encoder_impl, verify, max_specializations)
    from . import registry

    registry.select(patterns)  # an unknown pattern name fails now, not on the first call
    if not inplace:
        model = _copy_sharing_weights(model)
    _optimize_one(model, example_inputs, options)
    return model


def _optimize_one(target: torch.nn.Module, example_inputs, options: Options) -> None:
    for module in target.modules():  # optimized before, or a part optimized on its own: the whole is captured now
        uninstall(module)
    dispatcher = Optimized(target, options)
    install(target, dispatcher)
    if example_inputs is not None:
        args, kwargs = split_example(target, example_inputs)
        try:
            dispatcher.add(args, kwargs, "the example given to fxbt.optimize")
        except FxbtError:
            uninstall(target)
            raise
        return
    built = example_for(target)
    if built is None:
        dispatcher.history.append("no example: the first call is captured")
        return
    try:
        dispatcher.add((), built, "an example built from the model's config")
    except CaptureError as e:
        why = f"could not be captured ({e.short()})"
    except InputError as e:  # the model refuses fxbt's guess (GPT-2 classification without a pad token, batch 2)
        why = f"is refused by the model ({e})"
    else:
        return
    dispatcher.history.append(f"the example built from the config {why}; the first call is captured")


def _copy_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Every module copied, every parameter and buffer shared: the copy's modes, hooks and attributes are its
    own (transformers installs output-capturing hooks per model), its weights are the original's."""
    copies: dict[int, torch.nn.Module] = {}

    def clone(module):
        if id(module) not in copies:
            twin = object.__new__(type(module))  # not copy.copy: parametrized modules refuse to be reduced
            twin.__dict__.update(module.__dict__)
            for name, value in module.__dict__.items():
                if isinstance(value, dict):  # _modules, _parameters, _buffers, the hook dicts
                    twin.__dict__[name] = type(value)(value) if isinstance(value, OrderedDict) else dict(value)
            if installed(module):  # the copy is not optimized until fxbt installs it
                twin.__dict__.pop("forward", None)
            copies[id(module)] = twin
            for name, child in module._modules.items():
                twin._modules[name] = clone(child) if child is not None else None
        return copies[id(module)]

    return clone(model)


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Put the model's own forward back (and return the model)."""
    for module in model.modules():
        if installed(module):
            uninstall(module)
    return model


def dispatchers(model: torch.nn.Module) -> list[Optimized]:
    found = [d for m in model.modules() if (d := installed(m)) is not None]
    if not found:
        raise FxbtError(f"this {type(model).__name__} was not optimized by fxbt.optimize, so it has no report; "
                        "call fxbt.optimize(model) first")
    return found


def specializations(model: torch.nn.Module) -> list[Specialization]:
    """The specializations an optimized model holds, most recently used first."""
    return [s for d in dispatchers(model) for s in d.specializations]


def report(model: torch.nn.Module):
    """What fxbt did: for an optimized model a `ModelReport` (every graph, why it was made, what ran)."""
    found = getattr(model, "fxbt_report", None)
    if found is not None:
        return found
    found = dispatchers(model)
    return ModelReport([s.report for d in found for s in d.specializations],
                       [h for d in found for h in d.history],
                       sum((d.original_calls for d in found), start=type(found[0].original_calls)()),
                       [r for d in found for r in d.compiled_reports])


def graph_module(model: torch.nn.Module, specialization: int = 0) -> torch.fx.GraphModule:
    """The rewritten graph of one specialization (0: the most recently used)."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    specs = specializations(model)
    uncaptured = [why for d in dispatchers(model) for why in d.uncaptured.values()]
    if not specs and uncaptured:
        raise FxbtError(f"this model has no single graph: its calls run through torch.compile ({uncaptured[0]}). "
                        "fxbt.report(model).history says what keeps each kind of call from one graph")
    if not specs:
        raise FxbtError("this model has no captured graph yet (it is captured on its first call): call it once, "
                        "or optimize it with example_inputs")
    if not 0 <= specialization < len(specs):
        raise InputError(f"specialization {specialization} does not exist; the model has {len(specs)}")
    return specs[specialization].gm


def unroll(model: torch.nn.Module, specialization: int = 0) -> torch.fx.GraphModule:
    """The captured graph of a specialization with every rewrite undone, called like the model."""
    from .region import unroll as unroll_graph

    return unroll_graph(graph_module(model, specialization))
