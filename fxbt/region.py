"""Regions: a rewritten subgraph that remembers the original, and `unroll`, which puts it back.

A region is an ``nn.Module`` called from one ``call_module`` node. It owns the original subgraph as
a GraphModule (``original``) and the replacement function with the parameters its rule chose. It
runs the replacement, or the original when the rule's fallback says so (training, for example).

Every captured node carries ``meta["fxbt_pos"]``, its position in the captured graph. `unroll` inlines
regions (recursively) and re-sorts by that position, so the result has the same operations in the
same order, with the same names, as the captured original.
"""
from __future__ import annotations

import heapq
import inspect
import itertools
import operator
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx

from .errors import RewriteError
from .serialize import make_picklable


def materialize(value):
    """The plain value behind a stand-in a region may pass on (packed tokens, a deferred mask)."""
    return value.fxbt_materialize() if hasattr(value, "fxbt_materialize") else value


class UseOriginal(Exception):
    """Raised by a replacement that finds, at run time, it cannot compute this call exactly."""


class RecomputeCall(Exception):
    """Raised by a replacement that finds, at run time, that values computed earlier in the call (zeros at
    padded positions) cannot serve it: the whole call must be computed by the original model."""


class Region(torch.nn.Module):
    """One rewritten subgraph."""

    def __init__(self, rule: str, kernel: str, original: torch.fx.GraphModule, replacement: Callable,
                 slots: dict[str, Any], params: dict[str, Any], fallback: Callable | None = None):
        super().__init__()
        self.rule, self.kernel = rule, kernel
        self.original = original
        self.replacement = replacement
        self.slots = slots  # replacement argument -> input index (int), a tuple of indices, or a constant
        self.params = params
        self.fallback = fallback
        self.wants_training = "training" in inspect.signature(replacement).parameters
        # the inputs the original reads (a region may take more: those added for run-time checks come last);
        # from its signature, which an exported original has too
        self.original_arity = len(inspect.signature(original.forward).parameters)
        self.last_path = None  # "replacement" or the fallback's reason, for the report and tests
        self.calls: Counter = Counter()  # "fast" or the reason the original ran -> calls (the report's row)

    def forward(self, *inputs):
        reason = self.fallback(self, inputs) if self.fallback is not None else None
        if reason:
            return self._original(inputs, reason)
        kwargs = {name: slot_value(slot, inputs) for name, slot in self.slots.items()}
        if self.wants_training:
            kwargs["training"] = self.training
        try:
            result = self.replacement(**kwargs, **self.params)
        except UseOriginal as why:
            return self._original(inputs, str(why))
        except RecomputeCall as why:
            self.last_path = str(why)
            self.calls[str(why)] += 1
            raise
        except Exception as e:  # noqa: BLE001 - a replacement that cannot compute a call leaves it to the original
            return self._original(inputs, f"the replacement raised {type(e).__name__}: {e}")
        self.last_path = "replacement"
        self.calls["fast"] += 1
        return result

    def _original(self, inputs, reason: str):
        self.last_path = reason
        self.calls[reason] += 1
        return self.run_original(inputs)

    def run_original(self, inputs):
        """The original subgraph on a call's inputs (past the inputs it reads: those for run-time checks)."""
        return self.original(*map(materialize, inputs[:self.original_arity]))

    def canonical_view(self, node: torch.fx.Node):
        """How the canonical graph sees this region: an SDPA region is an ``sdpa`` op on (q, k, v)."""
        from .canon import CanonOp, Const

        if self.kernel != "sdpa":
            return None
        operands = [node.args[self.slots[n].index] if self.slots[n].index is not None else Const(self.slots[n].value)
                    for n in ("q", "k", "v")]
        return CanonOp("sdpa", operands + [Const(None)], {"region": node.target})

    def extra_repr(self) -> str:
        return f"rule={self.rule}, kernel={self.kernel}"


class Slot:
    """Where a replacement argument comes from: input positions (``index``) or a constant ``value``."""

    def __init__(self, index=None, value=None, many=False):
        self.index, self.value, self.many = index, value, many

    def __repr__(self):
        return f"Slot({self.index if self.index is not None else self.value!r})"

    def args_of(self, call: torch.fx.Node) -> tuple:
        """The arguments of the region's call node this slot reads (constants as they are)."""
        if self.many:
            return tuple(call.args[i] if isinstance(i, int) else i for i in self.index)
        return (call.args[self.index],) if self.index is not None else ()


def slot_value(slot, inputs):
    """What a replacement argument is for one call: inputs at the slot's positions, or its constant."""
    if not isinstance(slot, Slot):
        return slot
    if slot.many:
        return tuple(inputs[i] if isinstance(i, int) else i.value for i in slot.index)
    return inputs[slot.index] if slot.index is not None else slot.value


# ---------------------------------------------------------------------------------------------


def boundary(interior: set[torch.fx.Node], graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The values an interior reads from outside, in graph order."""
    outside = {a for n in interior for a in n.all_input_nodes if a not in interior}
    return [n for n in graph.nodes if n in outside]


_METADATA = ("dtype", "device")


def reads_metadata_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """``getattr(node, "dtype" | "device")`` or one of its sizes (``node.size(1)``): a use any tensor of that
    dtype and device, or with that size, can serve."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _METADATA
    return _size_read(user, node) is not None


def _size_read(user: torch.fx.Node, node: torch.fx.Node):
    """The dim ``user`` reads the size of, where it reads one size of ``node`` and nothing else."""
    if user.kwargs or len(user.args) != 2 or user.args[0] is not node or not isinstance(user.args[1], int):
        return None
    is_size = (user.op == "call_method" and user.target == "size") or (
        user.op == "call_function" and user.target is torch.ops.aten.sym_size.int)
    return user.args[1] if is_size else None


def absorb_size_computations(interior: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Add the outside nodes that compute sizes or other Python values from interior nodes and feed
    only the interior (``t.size()[:-2] + (e,)`` building a view's shape): they go with the region."""
    candidates: set[torch.fx.Node] = set()
    frontier = [u for n in interior for u in n.users if u not in interior]
    while frontier:
        node = frontier.pop()
        if node in candidates or node in interior or not _python_valued(node):
            continue
        candidates.add(node)
        frontier.extend(node.users)
    changed = True
    while changed:  # keep only those whose every use ends up inside
        changed = False
        for node in list(candidates):
            if not node.users or any(u not in interior and u not in candidates for u in node.users):
                candidates.discard(node)
                changed = True
    return interior | candidates


def _python_valued(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and not hasattr(node.meta.get("fxbt_val"), "shape")


def escaping(interior: set[torch.fx.Node], root) -> list[torch.fx.Node]:
    """Interior nodes other than the root (or roots) whose values are used outside the interior."""
    roots = set(root) if isinstance(root, tuple) else {root}
    return [n for n in interior if n not in roots
            and any(u not in interior and not reads_metadata_only(u, n) for u in n.users)]


def metadata_stand_ins(interior: set[torch.fx.Node], root, inputs: list[torch.fx.Node]) -> dict | str:
    """For outside dtype/device or size reads of interior nodes, an input with the same dtype and device, or
    (input, dim) with the same size for every admitted size (symbolic shapes).

    The region's outputs are read after it, so theirs need no stand-in; they get one where an input has it, so
    that a value the region itself reads may be computed from such a size (CLIP's pooler picks rows
    ``arange(hidden.shape[0])`` of the stack's output, and the stack computes the rows it picks).

    Returns {(user, interior node): stand-in}, or the reason none exists."""
    found = {}
    roots = set(root) if isinstance(root, tuple) else {root}
    for node in interior:
        for user in [u for u in node.users if u not in interior and reads_metadata_only(u, node)]:
            dim = _size_read(user, node)
            stand_in = metadata_stand_in(user, node, inputs)
            if stand_in is None and node in roots:
                continue
            if stand_in is None:
                what = f"size {dim}" if dim is not None else user.args[1]
                return f"{user.name} reads the {what} of {node.name} and no region input has the same"
            found[(user, node)] = stand_in
    return found


def metadata_stand_in(user: torch.fx.Node, node: torch.fx.Node, inputs):
    """For ``user`` reading ``node``'s dtype/device or one size (`reads_metadata_only`): an input with the same
    dtype and device, or (input, dim) with the same size for every admitted size; None if none has."""
    dim = _size_read(user, node)
    inputs = [i for i in inputs if _precedes(i, user)]  # one computed after ``user`` may depend on it: a cycle
    if dim is not None:
        return _same_size(node, dim, inputs)
    return next((i for i in inputs if _same_dtype_device(i.meta.get("fxbt_val"), node.meta.get("fxbt_val"))), None)


def _precedes(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """``a`` comes before ``b`` in their graph (capture numbers its nodes; a node made since, found by walking)."""
    if "fxbt_pos" in a.meta and "fxbt_pos" in b.meta:
        return a.meta["fxbt_pos"] < b.meta["fxbt_pos"]
    node = a.next
    while node.op != "root":
        if node is b:
            return True
        node = node.next
    return False


def _same_size(node, dim, inputs):
    """(input, dim) whose size is ``node``'s size ``dim`` for every admitted size."""
    from .shapes import same, sym

    shape = sym(node)
    if not isinstance(shape, tuple) or not -len(shape) <= dim < len(shape):
        return None
    for i in inputs:
        other = sym(i)
        if isinstance(other, tuple) and hasattr(i.meta.get("fxbt_val"), "shape"):
            for d, size in enumerate(other):
                if same(size, shape[dim]):
                    return (i, d)
    return None


class NameRef:
    """A node, by name, in an argument list kept for `unroll` (``meta["fxbt_original_args"]``)."""

    def __init__(self, name: str):
        self.name = name


def rewire(stand_ins: dict) -> None:
    """Apply `metadata_stand_ins`, remembering the original producer (and arguments) for `unroll`."""
    for (user, node), stand_in in stand_ins.items():
        if isinstance(stand_in, tuple):  # a size read from another input, at its own dim
            user.meta.setdefault("fxbt_original_args", torch.fx.node.map_aggregate(
                (user.args, user.kwargs),
                lambda a: NameRef(a.meta.get("fxbt_name", a.name)) if isinstance(a, torch.fx.Node) else a))
            user.args = stand_in
            continue
        user.replace_input_with(node, stand_in)
        user.meta.setdefault("fxbt_rewired", {})[stand_in.name] = node.name


def _same_dtype_device(a, b) -> bool:
    return all(hasattr(x, "dtype") and hasattr(x, "device") for x in (a, b)) and (a.dtype, a.device) == (b.dtype, b.device)


def extract(gm: torch.fx.GraphModule, interior: set[torch.fx.Node], root,
            inputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """The interior as a standalone GraphModule taking ``inputs`` and returning ``root`` (or, for a tuple of
    roots, the tuple of their values)."""
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node in interior:
            env[node] = sub.node_copy(node, lambda x: env[x])
    sub.output(tuple(env[r] for r in root) if isinstance(root, tuple) else env[root])
    return make_picklable(torch.fx.GraphModule(gm, sub, class_name="OriginalSubgraph"))


def install(gm: torch.fx.GraphModule, region: Region, interior: set[torch.fx.Node], root,
            inputs: list[torch.fx.Node]) -> torch.fx.Node:
    """Replace ``interior`` (ending in ``root``) by one call of ``region``, named ``fxbt_region_<first free>``.

    With a tuple of roots the region returns a tuple; each root's uses read its element (a ``getitem`` node
    marked ``fxbt_output_index``), and the graph is put back in topological order around the call."""
    taken = {name for name, _ in gm.named_children()}
    name = next(f"fxbt_region_{i}" for i in itertools.count() if f"fxbt_region_{i}" not in taken)
    region.train(gm.training)  # a new module starts in training mode; follow the graph's mode
    gm.add_submodule(name, region)
    roots = root if isinstance(root, tuple) else (root,)
    first = min(roots, key=lambda n: _index(gm.graph, n))
    with gm.graph.inserting_before(first):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta = {k: v for k, v in first.meta.items() if k != "fxbt_pos"}
    call.meta["fxbt_region"] = name
    if isinstance(root, tuple):
        for i, r in enumerate(roots):
            with gm.graph.inserting_after(call):
                element = gm.graph.call_function(operator.getitem, (call, i))
            element.meta = {k: v for k, v in r.meta.items() if k != "fxbt_pos"}
            element.meta["fxbt_output_index"] = i
            r.replace_all_uses_with(element)
    else:
        root.replace_all_uses_with(call)
    for node in reversed([n for n in gm.graph.nodes if n in interior]):
        if node.users:
            raise RewriteError(f"node {node.name} still has users {list(node.users)} after region {name} replaced it")
        gm.graph.erase_node(node)
    if isinstance(root, tuple):
        topological_order(gm.graph)
    return call


def _index(graph: torch.fx.Graph, node: torch.fx.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def topological_order(graph: torch.fx.Graph) -> None:
    """Reorder the graph's nodes so that every node follows its inputs, moving as little as possible (the
    nodes themselves are kept: references to them stay valid)."""
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    waiting = {n: len(set(n.all_input_nodes)) for n in order}
    ready = [(position[n], n) for n in order if waiting[n] == 0]
    heapq.heapify(ready)
    result = []
    while ready:
        _, node = heapq.heappop(ready)
        result.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user))
    if len(result) != len(order):
        raise RewriteError("the rewritten graph has a cycle")
    if result == order:
        return
    anchor = graph._root
    for node in result:
        anchor.append(node)
        anchor = node


def inline_region(gm: torch.fx.GraphModule, name: str) -> None:
    """Put region ``name``'s original subgraph back in place of its call (its modules and attributes live
    at the same paths in ``gm``: regions share them)."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    region = gm.get_submodule(name)
    env = dict(zip([n for n in region.original.graph.nodes if n.op == "placeholder"], node.args))
    with gm.graph.inserting_before(node):
        for inner in region.original.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = inner.args[0]
                if isinstance(result, tuple):  # a region of several outputs: each element's reader gets it
                    for element in list(node.users):
                        element.replace_all_uses_with(env[result[element.meta["fxbt_output_index"]]])
                        gm.graph.erase_node(element)
                else:
                    node.replace_all_uses_with(env[result])
                break
            env[inner] = gm.graph.node_copy(inner, lambda x: env[x])
    gm.graph.erase_node(node)


def unroll_regions(gm: torch.fx.GraphModule, which) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the top-level regions for which ``which(region)`` is true inlined."""
    import copy

    result = copy.deepcopy(gm)
    for node in list(result.graph.nodes):
        if node.op == "call_module" and isinstance(region := result.get_submodule(node.target), Region) \
                and which(region):
            inline_region(result, node.target)
    result.graph.lint()
    result.recompile()
    return result


def regions(model: torch.nn.Module) -> list[tuple[str, Region]]:
    """The regions of a rewritten graph, or of an optimized model's most recently used graph."""
    if not isinstance(model, torch.fx.GraphModule):
        from .api import graph_module

        model = graph_module(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Region)]


# ---------------------------------------------------------------------------------------------


def unroll(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule equal to the captured original: every region replaced by its original subgraph."""
    records: list[tuple[torch.fx.Node, torch.nn.Module]] = []
    alias: dict[torch.fx.Node, Any] = {}
    _collect(gm, gm.graph, alias, records, top=True)
    if any("fxbt_pos" not in n.meta for n, _ in records):
        missing = next(n for n, _ in records if "fxbt_pos" not in n.meta)
        raise RewriteError(f"node {missing.name} has no captured position; it was not produced by fxbt.capture")
    records.sort(key=lambda r: r[0].meta["fxbt_pos"])
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, Any] = {}

    def resolve(x):
        while x in alias:
            x = alias[x]
        return env[x]

    by_name: dict[str, torch.fx.Node] = {}
    captured: dict[str, torch.fx.Node] = {}  # by the name the node had when captured (NameRef)
    for node, owner in records:
        rewired = node.meta.get("fxbt_rewired", {})
        arg = lambda x: by_name[rewired[x.name]] if x.name in rewired else resolve(x)  # noqa: E731
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), arg)
        if "fxbt_original_args" in node.meta:  # a size read rewired to another input: its own arguments back
            args, kwargs = torch.fx.node.map_aggregate(node.meta["fxbt_original_args"],
                                                       lambda a: captured[a.name] if isinstance(a, NameRef) else a)
        env[node] = graph.create_node(node.op, node.target, args, kwargs,
                                      name=node.meta.get("fxbt_name", node.name), type_expr=node.type)
        env[node].meta = {k: v for k, v in node.meta.items() if k not in ("fxbt_rewired", "fxbt_original_args")}
        by_name[node.name] = captured[env[node].meta.get("fxbt_name", node.name)] = env[node]
        if node.op in ("call_module", "get_attr"):
            root[node.target] = fetch(owner, node.target)
    out = torch.fx.GraphModule(root, graph, class_name=type(gm).__name__)
    out.meta = getattr(gm, "meta", {})
    if hasattr(gm, "_fxbt_call"):
        out._fxbt_call = gm._fxbt_call  # the calling convention the graph's code uses
    make_picklable(out)
    return out


def _collect(owner, graph, alias, records, top):
    for node in graph.nodes:
        target = fetch(owner, node.target) if node.op == "call_module" else None
        if isinstance(target, Region):
            inner = target.original
            placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
            for ph, arg in zip(placeholders, node.args):
                alias[ph] = arg
            _collect(inner, inner.graph, alias, records, top=False)
            out = next(n for n in inner.graph.nodes if n.op == "output")
            alias[node] = out.args[0]
        elif "fxbt_output_index" in node.meta and node.op != "placeholder":  # an element of a region's outputs
            # (the original's element); a placeholder standing for one (its meta copied) is aliased already
            alias[node] = alias[node.args[0]][node.meta["fxbt_output_index"]]
        elif top or node.op not in ("placeholder", "output"):
            records.append((node, owner))


def fetch(owner: torch.nn.Module, target: str):
    """The submodule or attribute at dotted path ``target`` of ``owner``."""
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
