"""Dynamo capture whose cost barely grows with depth.

A transformer repeats one block N times; tracing every copy is what made capture grow with depth. Here
the class of sibling submodules that are structurally one block (same submodule types, same parameter and
buffer shapes) is marked as ``torch.compiler.nested_compile_region`` while dynamo traces, so dynamo traces
the block once and stamps it onto its siblings. Dynamo decides a reuse by the block's guards re-evaluated
against each sibling (the attributes and tensors the trace read, its inputs' sizes and dtypes), never by
names; a sibling that differs gets a trace of its own. Dynamo does not check which module class sits at a
path, so a class is marked only if all its instances have the same submodule types at each path, and
capture (fxbt/capture.py) traces every block again where a graph with reused blocks fails a check. The
stamped copies are then written out again, one per call, so the graph has exactly the nodes a trace of
every copy would have, and `unroll` and the report stay per block.

The trace runs through dynamo's ``fullgraph_capture`` (not ``torch._dynamo.export``, which switches
reuse off and builds a guard function fxbt never calls), and its graph is brought to fxbt's calling
convention: one placeholder per leaf of the example's ``(args, kwargs)``, the model's parameters and
buffers read by ``get_attr``, sizes read off the inputs, the flat output leaves as the output.
"""
from __future__ import annotations

import contextlib
import operator
import re

import torch
import torch.fx
import torch.utils._pytree as pytree

_FLAT_INPUT = re.compile(r"L\['flat_args'\]\[(\d+)\]")
_INPUT_SIZE = re.compile(r"L\['flat_args'\]\[(\d+)\]\.size\(\)\[(\d+)\]")
_STATE = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")
_ROOT = "_export_root"  # where dynamo's wrapper (ModuleToTrace) keeps the model


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, names: list[str], reuse: bool = True
            ) -> torch.fx.GraphModule:
    """The model's graph on the example, repeated blocks traced once where dynamo can reuse them (``reuse``).

    ``names`` name the placeholders, one per leaf of ``(args, kwargs)``."""
    with _repeated_blocks_marked(model, reuse) as marked:
        if marked:
            with _storage_of_their_own(model):
                for grad in (False, True):
                    try:
                        return _capture(model, args, kwargs, names, grad)
                    except Exception:  # noqa: BLE001 - a block dynamo cannot trace as a region: next way
                        pass
    return _capture(model, args, kwargs, names, False)


@contextlib.contextmanager
def _repeated_blocks_marked(model: torch.nn.Module, reuse: bool = True):
    """Mark the forward of every class with two or more sibling instances, all instances of one structure."""
    marked: dict[type, object] = {}  # class -> its own forward (None: inherited)
    try:
        for cls in _repeated_block_classes(model) if reuse else ():
            own = cls.__dict__.get("forward")
            cls.forward = torch.compiler.nested_compile_region(cls.forward, max_reuse_entries=4096)
            marked[cls] = own
        yield bool(marked)
    finally:
        for cls, own in marked.items():
            if own is None:
                del cls.forward
            else:
                cls.forward = own


@contextlib.contextmanager
def _storage_of_their_own(model: torch.nn.Module):
    """Parameters that are views into one storage (an encoder's Q, K and V weights after fxbt packed them)
    get copies of their own while dynamo traces: it declines to reuse a block whose inputs alias."""
    seen, shared = set(), []
    for p in model.parameters():
        key = (p.device, p.untyped_storage().data_ptr())
        if key in seen and p.numel():
            shared.append((p, p.data))
        seen.add(key)
    with torch.no_grad():
        for p, data in shared:
            p.data = data.clone()
    try:
        yield
    finally:
        for p, data in shared:
            p.data = data


def _repeated_block_classes(model: torch.nn.Module) -> set[type]:
    """Classes of sibling blocks (modules with submodules of their own) of one structure (submodule types at
    each path, parameter and buffer shapes) whose instances all have the same submodule types at each path.
    Dynamo's reuse re-checks the attributes and tensors a block's trace read, but not which module class sits
    at a path: it took ModernBERT's first layer, whose pre-attention norm is an Identity, for its LayerNorm
    siblings."""
    kinds: dict[type, set] = {}
    repeated = set()
    for parent in model.modules():
        seen = set()
        for child in parent.children():
            if next(child.children(), None) is None or "forward" in child.__dict__:
                continue  # a leaf op (a linear, a norm), or an instance whose forward was replaced
            key = _structure(child)
            if key in seen:
                repeated.add(type(child))
            seen.add(key)
    for module in model.modules():
        if type(module) in repeated:
            kinds.setdefault(type(module), set()).add(_submodule_types(module))
    return {cls for cls in repeated if len(kinds[cls]) == 1}


def _submodule_types(module: torch.nn.Module) -> tuple:
    return tuple((name, type(m)) for name, m in module.named_modules())


def _structure(module: torch.nn.Module) -> tuple:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return _submodule_types(module), tuple((name, tuple(t.shape), t.dtype) for name, t in tensors)


def _capture(model, args, kwargs, names, grad: bool) -> torch.fx.GraphModule:
    """One trace. ``grad``: with gradients on, which keeps dynamo from stamping the first block's trace onto
    its siblings when the first block reads a graph input (the first block's input then requires no grad and
    theirs do): under no_grad torch 2.13 tries that and fails (KeyError in stamp_out_subgraph). A model that
    switches gradients itself (a rotary embedding under ``@torch.no_grad()``) would have those switches
    recorded in the graph that way, so such a trace is refused."""
    with torch.enable_grad() if grad else contextlib.nullcontext():
        gm = _trace(model, args, kwargs, names)
    if grad and any(n.target is torch._C._set_grad_enabled for n in gm.graph.nodes):
        raise RuntimeError("the model switches gradients on or off inside its forward")
    return gm


def _trace(model, args, kwargs, names) -> torch.fx.GraphModule:
    import torch._dynamo
    from torch._dynamo.convert_frame import fullgraph_capture
    from torch._dynamo.functional_export import ModuleToTrace
    from torch._dynamo.utils import get_metrics_context
    from torch.fx.experimental import _config as fx_config

    flat, in_spec = pytree.tree_flatten((args, kwargs))
    # the same settings as torch._dynamo.export, with every input size dynamic, no duck sizing (batch ==
    # sequence on the example stays two sizes) and no 0/1 specialisation where dynamo can avoid it
    with get_metrics_context(), fx_config.patch(use_duck_shape=False, backed_size_oblivious=True), \
            torch._dynamo.config.patch(specialize_int=True, specialize_float=True, assume_static_by_default=False,
                                       automatic_dynamic_shapes=False, capture_dynamic_output_shape_ops=True,
                                       capture_scalar_outputs=True, log_graph_in_out_metadata=True,
                                       install_free_tensors=False):
        out = fullgraph_capture(ModuleToTrace(model, in_spec), tuple(flat))
    if out.backend_input is None:
        raise RuntimeError("the model runs no tensor operation")
    gm = out.backend_input.graph_module
    gm.meta["fxbt_block_reuse"] = _inline_regions(gm)
    meta = out.graph_capture_output.output_graph.export_metadata
    _to_convention(gm, names, out.backend_input.example_inputs, meta)
    return gm


def _inline_regions(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Every ``invoke_subgraph`` call replaced by a copy of its body, so each block has its own nodes.
    Returns how many calls there were and how many bodies dynamo traced for them."""
    graph = gm.graph
    bodies, count = set(), 0
    while calls := [n for n in graph.nodes if n.op == "call_function"
                    and n.target is torch.ops.higher_order.invoke_subgraph]:
        count += len(calls)
        for call in calls:
            body_attr, _, *operands = call.args
            bodies.add(body_attr.target)
            body = getattr(gm, body_attr.target).graph
            env = dict(zip([n for n in body.nodes if n.op == "placeholder"], operands))
            results = None
            with graph.inserting_before(call):
                for node in body.nodes:
                    if node.op == "placeholder":
                        continue
                    if node.op == "output":
                        results = node.args[0]
                        break
                    if node.op == "get_attr":  # a nested region's body, or a constant of the block
                        _adopt(gm, getattr(getattr(gm, body_attr.target), node.target), node.target)
                    env[node] = graph.node_copy(node, lambda n: env[n])
            results = torch.fx.map_arg(results, lambda n: env[n])
            for user in list(call.users):
                if user.target is not operator.getitem:
                    raise RuntimeError("a region's result is used whole")
                user.replace_all_uses_with(results[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(call)
            if not body_attr.users:
                graph.erase_node(body_attr)
    for name in bodies:
        if hasattr(gm, name):
            delattr(gm, name)
    # a body computes sizes only its own trace used (its sizes came in as inputs): drop those, as dynamo
    # drops them from a graph it traced in one piece; anything that might write stays
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" and n.op != "call_method"
                              or isinstance(n.meta.get("example_value"), torch.Tensor)
                              or n.meta.get("example_value") is None)
    return count, len(bodies)


def _adopt(gm: torch.fx.GraphModule, value, name: str) -> None:
    """Give ``gm`` a body's attribute under the body's name (dynamo names them in one namespace); a clash
    would make the copied ``get_attr`` read something else, so it fails the capture instead."""
    if not hasattr(gm, name):
        setattr(gm, name, value)
    elif getattr(gm, name) is not value:
        raise RuntimeError(f"a region's attribute {name!r} clashes with the graph's own")


def _to_convention(gm: torch.fx.GraphModule, names: list[str], lifted: list, meta) -> None:
    """Placeholders become the example's leaves; lifted parameters and buffers ``get_attr`` nodes; lifted
    sizes ``sym_size`` queries of the inputs (as export writes them); the output the flat output leaves."""
    graph = gm.graph
    old = [n for n in graph.nodes if n.op == "placeholder"]
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        inputs = [graph.placeholder(re.sub(r"\W", "_", name)) for name in names]
    with graph.inserting_after(inputs[-1]):
        for i, node in enumerate(old):
            source = meta.graph_input_idx_to_local_source.get(i)
            text = source.name if source is not None else ""
            if m := _FLAT_INPUT.fullmatch(text):
                new = inputs[int(m[1])]
                new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
            elif (m := _INPUT_SIZE.fullmatch(text)) and not node.users:
                graph.erase_node(node)
                continue
            elif m:
                new = graph.call_function(torch.ops.aten.sym_size.int, (inputs[int(m[1])], int(m[2])))
                new.meta = dict(node.meta)
            elif text.startswith("L['self']") and isinstance(lifted[i], torch.Tensor):
                new = graph.get_attr(_attribute(gm, text, lifted[i]))
                new.meta = dict(node.meta)
            else:
                raise RuntimeError(f"dynamo lifted an input fxbt cannot place: {text or node.name}")
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    flat = []
    for i in sorted(meta.output_return_type):
        kind, value = meta.output_return_type[i]
        flat.append(results[value] if kind == "graph_out" else inputs[value.index] if kind == "input" else value)
    output.args = (tuple(flat),)
    gm.recompile()


def _attribute(gm: torch.fx.GraphModule, source: str, tensor: torch.Tensor) -> str:
    """Register a model parameter or buffer on the graph module, named after its path in the model."""
    base = "_".join(p for p in _STATE.findall(source) if p != _ROOT) or "state"
    name = base = base if base.isidentifier() else f"t_{base}"
    k = 0
    while hasattr(gm, name):
        if getattr(gm, name) is tensor:
            return name
        k += 1
        name = f"{base}_{k}"
    if isinstance(tensor, torch.nn.Parameter):
        gm.register_parameter(name, tensor)
    else:
        gm.register_buffer(name, tensor)
    return name
