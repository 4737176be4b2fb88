"""The drop-in calling convention of a captured graph.

A captured graph's placeholders are the leaves of the example call ``(args, kwargs)``. `CallSpec` turns
any later call (positional or keyword, like the model) into those leaves, and refuses, with an
`InputError` that says what to do, a call the graph cannot compute: a missing or unknown input, a
tensor where the example had something else, another rank, dtype or device, or a non-tensor option
(``output_hidden_states=True``) with another value than the one the graph was captured with.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from .errors import InputError


@dataclass
class CallSpec:
    params: list[str]  # the model's forward parameters, in order
    defaults: dict[str, Any]
    positional: int  # how many inputs the example gave positionally
    keywords: list[str]  # the example's keyword inputs, in its order
    in_spec: Any  # pytree spec of the example's (args, kwargs)
    var_keyword: bool = False  # forward(**kwargs): names beyond the parameters are accepted
    examples: list[Any] = field(default_factory=list)  # per leaf: ("tensor", ndim, dtype, device) or ("value", v)
    leaf_names: list[str] = field(default_factory=list)
    tensor_inputs: dict[str, bool] = field(default_factory=dict)  # input name -> the example gave a tensor

    @classmethod
    def of(cls, model: torch.nn.Module, args: tuple, kwargs: dict) -> "CallSpec":
        sig = inspect.signature(model.forward)
        params = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        defaults = {p.name: p.default for p in sig.parameters.values() if p.default is not p.empty}
        leaves, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        names = _leaf_names(params, args, kwargs)
        examples = [("tensor", x.dim(), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("value", x)
                    for x in leaves]
        var_keyword = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        given = dict(zip(params, args), **kwargs)
        tensors = {n: isinstance(v, torch.Tensor) for n, v in given.items()}
        return cls(params, defaults, len(args), list(kwargs), in_spec, var_keyword, examples, names, tensors)

    def flatten(self, args: tuple, kwargs: dict) -> list:
        """The graph's inputs for a call ``(*args, **kwargs)``, or an InputError saying what is wrong."""
        bound = self._bind(args, kwargs)
        for name, value in bound.items():
            if self.tensor_inputs.get(name) and not isinstance(value, torch.Tensor):
                raise InputError(f"input {name!r} must be a tensor like the example's, got {type(value).__name__}")
        call_args = tuple(bound.pop(name) for name in self.params[:self.positional])
        call_kwargs = {name: bound.pop(name) for name in self.keywords}
        for name, value in bound.items():
            if not _same(value, self.defaults.get(name, inspect.Parameter.empty)):
                raise InputError(f"input {name!r} was not among the example inputs, so the optimized graph "
                                 f"ignores it; pass it in example_inputs to fxbt.optimize")
        leaves, spec = pytree.tree_flatten((call_args, call_kwargs))
        if spec != self.in_spec:
            raise InputError("the inputs are structured differently from the example inputs (a tuple or list "
                             "where the example had a tensor, or of another length); call with inputs of the "
                             "same kinds")
        for leaf, example, name in zip(leaves, self.examples, self.leaf_names):
            _check_leaf(leaf, example, name)
        return leaves

    def _bind(self, args, kwargs) -> dict:
        if len(args) > len(self.params):
            raise InputError(f"{len(args)} positional inputs given; the model takes at most {len(self.params)}")
        bound = dict(zip(self.params, args))
        for name, value in kwargs.items():
            if name not in self.params and not self.var_keyword:
                raise InputError(f"unknown input {name!r}; the model takes {', '.join(self.params)}")
            if name in bound:
                raise InputError(f"input {name!r} given both positionally and by keyword")
            bound[name] = value
        expected = self.params[:self.positional] + self.keywords
        missing = [n for n in expected if n not in bound]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}: the example inputs had them, and the "
                             "optimized graph needs them")
        return bound


def _leaf_names(params, args, kwargs) -> list[str]:
    names = []
    for name, value in list(zip(params, args)) + list(kwargs.items()):
        count = len(pytree.tree_leaves(value))
        names.extend([name] * count if count else [])
    return names


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_leaf(leaf, example, name) -> None:
    if example[0] == "value":
        if not _same(leaf, example[1]):
            raise InputError(f"input {name!r} is {leaf!r}, but the graph was captured with {example[1]!r}; "
                             f"call with the same value, or optimize again with {name}={leaf!r}")
        return
    _, ndim, dtype, device = example
    if not isinstance(leaf, torch.Tensor):
        raise InputError(f"input {name!r} must be a tensor like the example's, got {type(leaf).__name__}")
    if leaf.dim() != ndim:
        raise InputError(f"input {name!r} has {leaf.dim()} dimensions; the example's had {ndim}")
    if leaf.dtype != dtype:
        raise InputError(f"input {name!r} is {leaf.dtype}; the example's was {dtype}. Convert it "
                         f"(.to({dtype})) or optimize with an example of this dtype")
    # no device check: the module may have been moved with .to() since it was captured


class DropInCodeGen(_PyTreeCodeGen):
    """``forward(self, *args, **kwargs)``, flattened by the module's `CallSpec`; outputs rebuilt by pytree."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        fn = CodeGen.gen_fn_def(self, ["*args", "**kwargs"], maybe_return_annotation, expanded_def=expanded_def)
        names = [v.split(":")[0].split("#")[0].strip() for v in free_vars if v.strip() != "self"]
        if names:
            fn += f"\n    {', '.join(names)}, = self._fxbt_call.flatten(args, kwargs)"
        return fn


def install_drop_in(gm: torch.fx.GraphModule, call: CallSpec, out_spec) -> None:
    gm._fxbt_call = call
    gm.graph._codegen = DropInCodeGen(_PyTreeInfo(["args", "kwargs"], call.in_spec, out_spec))
    gm.recompile()
