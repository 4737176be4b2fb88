"""Symbolic sizes: every node's shape for every size the capture admits, and the guard that admits them.

A captured graph serves more than its example: batch and sequence vary from call to call. A fact a
rewrite relies on (Q and K have the same batch, a block's input is [batch, seq, hidden]) must hold for
every admitted size, not only on the example, where sizes may coincide (batch == sequence) or be 1.

- dynamo graphs carry fake tensors with symbolic sizes from their capture (``meta["example_value"]``)
  and the ShapeEnv whose guards say which input sizes the graph was captured for;
- fx and hf_fx graphs are propagated here with fake tensors whose every input dimension is a symbol of
  its own (no duck sizing, no 0/1 specialisation). What the tracer decided from the example's sizes
  (hf_fx evaluates ``if seq_len > 1`` on the example) is replayed on those symbols, so it becomes a
  guard too.

Every node gets ``meta["fxbt_sym"]``: its shape as a tuple of sympy expressions over input sizes (ints
where static), or its value for a scalar computed from sizes. `ShapeGuard` is the conjunction of the
ShapeEnv's guards, compiled once and evaluated on each call's inputs. Where symbolic propagation is
impossible (a data-dependent op, an operator without a symbolic rule), the guard pins every input size
to the example's: the example's shapes are then the only admitted ones, and facts proven on them hold.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import sympy
import torch
import torch.fx

log = logging.getLogger("fxbt")


def _is_tensor(node) -> bool:
    from .meta import TensorInfo

    return isinstance(node.meta.get("fxbt_val"), TensorInfo)


def _deterministic(node) -> bool:
    from .meta import deterministic

    return deterministic(node)

_NOT_SEMANTIC = re.compile(r"stride\(\)|storage_offset\(\)")
_SOURCE = re.compile(r"L\['t(\d+)'\]\.size\(\)\[(\d+)\]")


class ShapeGuard:
    """The input sizes a graph admits: conditions over ``L['t<i>']``, the i-th flat input.

    Conditions on strides and storage offsets are left out: a torch-level graph computes the same values
    whatever its inputs' layout (it calls the model's own operators); dynamo guards them for the compiled
    kernels it would generate, which fxbt does not use.
    """

    def __init__(self, conditions: list[str], names: list[str], static: bool = False):
        self.conditions = [c for c in conditions if not _NOT_SEMANTIC.search(c)]
        self.names = list(names)  # input names, for messages
        self.static = static  # every size pinned to the example's (symbolic propagation was impossible)
        self._code = None

    def __call__(self, flat_inputs) -> bool:
        if not self.conditions:
            return True
        if self._code is None:
            self._code = compile(" and ".join(f"({c})" for c in self.conditions), "<fxbt shape guard>", "eval")
        try:
            return bool(eval(self._code, _interp(), {"L": _locals(flat_inputs)}))
        except ArithmeticError:  # ``s % b`` with an empty batch: no size the graph was proven for is zero there
            return False

    def failing(self, flat_inputs) -> str:
        """The first condition the call's inputs fail, in the inputs' names."""
        scope = {"L": _locals(flat_inputs)}
        for condition in self.conditions:
            try:
                if not eval(condition, _interp(), scope):
                    return self.describe(condition)
            except Exception as e:  # noqa: BLE001 - a condition that cannot be evaluated fails
                return f"{self.describe(condition)} ({type(e).__name__})"
        return ""

    def describe(self, condition: str) -> str:
        return _SOURCE.sub(lambda m: f"{self._name(int(m[1]))}.size({m[2]})", condition)

    def _name(self, i: int) -> str:
        return self.names[i] if i < len(self.names) else f"input {i}"

    def __getstate__(self):
        return {**self.__dict__, "_code": None}


def _locals(flat_inputs) -> dict:
    return {f"t{i}": x for i, x in enumerate(flat_inputs)}


def _interp() -> dict:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return SYMPY_INTERP


def static_guard(flat_inputs, names) -> ShapeGuard:
    """Every input size equal to the example's."""
    conditions = [f"L['t{i}'].size()[{d}] == {size}" for i, x in enumerate(flat_inputs)
                  if isinstance(x, torch.Tensor) for d, size in enumerate(x.shape)]
    return ShapeGuard(conditions, names, static=True)


# --- symbolic metadata ----------------------------------------------------------------------------


def from_dynamo(gm: torch.fx.GraphModule, flat_inputs: list, names: list[str]) -> ShapeGuard:
    """Symbolic shapes and guards of a graph captured by dynamo, read from its fake values. A guard on a size
    that no input of the graph carries (an input the graph does not use) pins the sizes instead."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    env = next((x.fake_mode.shape_env for x in fakes if hasattr(x, "fake_mode")), None)
    if env is None:
        raise RuntimeError("the dynamo graph carries no symbolic sizes")
    record(gm, "example_value", env)
    conditions = _dynamo_conditions(env, [n.name for n in placeholders], names)
    return static_guard(flat_inputs, names) if conditions is None else ShapeGuard(conditions, names)


def _dynamo_conditions(env, placeholder_names: list[str], input_names: list[str]) -> list[str] | None:
    """The ShapeEnv's guards (and the equalities it substituted) as Python over ``L['t<i>'].size()[d]``.

    Dynamo names a size by its source (``L['x'].size()[2]``) and a graph input after its source, mangled
    (``l_x_``), or after the forward parameter it is: either says which flat input a source is. None where a
    guard reads a size of something else."""
    from torch.utils._sympy.printers import PythonPrinter

    index = {name: i for i, name in enumerate(placeholder_names)}
    unique = [n for n in input_names if input_names.count(n) == 1]
    index.update({f"l_{name.lower()}_": input_names.index(name) for name in unique if f"l_{name.lower()}_" not in index})
    index.update({f"l_flat_args_{i}_": i for i in range(len(input_names))})  # dynamo_frontend's flat inputs
    stand_in, values = {}, _hints(env)
    for symbol, sources in env.var_to_sources.items():
        for source in sources:
            if _parameter_size(source.name) and symbol in values:
                # a size of the model's own parameter or buffer: fixed, as the StateGuard checks on every call
                stand_in[symbol] = sympy.Integer(int(values[symbol]))
                break
            m = _DIM_SOURCE.fullmatch(source.name)
            i = index.get(re.sub(r"[^a-zA-Z0-9]+", "_", m[1]).lower()) if m else None
            if i is not None:
                stand_in[symbol] = sympy.Symbol(f"fxbt_t{i}_{m[2]}", integer=True)
                break
    exprs = [g.expr for g in env.guards] + [sympy.Eq(k, v) for k, v in env.replacements.items()]
    conditions = []
    for expr in exprs:
        if expr is sympy.true:
            continue
        if not expr.free_symbols <= stand_in.keys():
            unknown = expr.free_symbols - stand_in.keys()
            sources = {str(x): [s.name for s in env.var_to_sources.get(x, [])] for x in unknown}
            log.info("fxbt: dynamo guard %s reads sizes no graph input carries (%s); sizes pinned", expr, sources)
            return None
        text = PythonPrinter().doprint(expr.xreplace(stand_in))
        conditions.append(_STAND_IN.sub(lambda m: f"L['t{m[1]}'].size()[{m[2]}]", text))
    return conditions


def _parameter_size(source_name: str) -> bool:
    """A size of one of the model's own tensors (not a value of one of its attributes: those can change)."""
    return source_name.startswith("L['self']") and _DIM_SOURCE.fullmatch(source_name) is not None


def _hints(env) -> dict:
    """The example's value of each backed size symbol (renamed across torch versions)."""
    return env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val


_DIM_SOURCE = re.compile(r"(.*)\.size\(\)\[(\d+)\]")
_STAND_IN = re.compile(r"fxbt_t(\d+)_(\d+)")


def propagate_symbolic(gm: torch.fx.GraphModule, flat_inputs: list, names: list[str],
                       decisions=()) -> ShapeGuard:
    """Symbolic shapes and guards of an fx or hf_fx graph, by symbolic propagation (fxbt/symbolic.py).

    ``decisions``: what the tracer decided on the example's sizes, as (node, replay) pairs; each becomes a
    condition of the guard. Where one cannot be expressed over the inputs' sizes, the guard pins the
    example's sizes, and the example's shapes become the symbolic ones."""
    from . import symbolic

    try:
        found = symbolic.propagate(gm, flat_inputs, decisions)
        conditions = symbolic.conditions_as_python(found)
    except Exception as e:  # noqa: BLE001 - any failure leaves the sound fallback
        log.info("fxbt: symbolic sizes unavailable (%s: %s); sizes pinned to the example's", type(e).__name__, e)
        conditions = None
    if conditions is None:
        for node in gm.graph.nodes:
            node.meta["fxbt_sym"] = _concrete(node.meta.get("fxbt_val"))
        return static_guard(flat_inputs, names)
    return ShapeGuard(conditions, names)




def record(gm: torch.fx.GraphModule, key: str, env) -> None:
    known = _rewrites(env)
    memo: dict = {}  # expression -> its canonical form: N copies of a block carry the same few expressions
    for node in gm.graph.nodes:
        found = symbolic(node.meta.get(key), env, known, memo)
        if found is None and node.op == "get_attr":  # a parameter or buffer: its shape is fixed
            found = _concrete(node.meta.get("fxbt_val"))
        node.meta["fxbt_sym"] = found


def _rewrites(env) -> dict:
    """What every admitted size satisfies, as a rewrite of symbolic expressions into a canonical form:
    sizes of the model's own parameters and buffers are their values (fixed, as the StateGuard checks), and
    every expression of an equality class of the guards (``Eq(Min(64, s0), s0)``, ``Eq(Min(64, s0), s1)``)
    becomes the class's simplest one, so that shapes compare structurally (s0 and s1 become one symbol)."""
    if env is None:
        return {}
    values = _hints(env)
    constants = {symbol: sympy.Integer(int(values[symbol])) for symbol, sources in env.var_to_sources.items()
                 if sources and all(_parameter_size(s.name) for s in sources) and symbol in values}
    return {**{k.xreplace(constants): v for k, v in _equalities(env, constants).items()}, **constants}


def _equalities(env, constants) -> dict:
    parent: dict = {}

    def find(x):
        while x in parent:
            x = parent[x]
        return x

    for guard in getattr(env, "guards", ()):
        expr = getattr(guard, "expr", None)
        if isinstance(expr, sympy.Basic):
            # in the symbols the shapes are written in (``Eq(s11, Min(512, s11))`` with s11 replaced by s0)
            expr = env.replace(expr).xreplace(constants)
        if isinstance(expr, sympy.Eq) and not (expr.lhs.is_number and expr.rhs.is_number):
            a, b = find(expr.lhs), find(expr.rhs)
            if a != b:
                parent[a] = b
    classes: dict = {}
    for x in list(parent):
        classes.setdefault(find(x), set()).update((x, find(x)))
    rewrite = {}
    for members in classes.values():
        simplest = min(members, key=lambda e: (not e.is_number, sympy.count_ops(e), str(e)))
        rewrite.update({m: simplest for m in members if m != simplest and m.free_symbols})
    return rewrite


def symbolic(value: Any, env=None, known=None, memo: dict | None = None) -> Any:
    """A fake value as plain symbolic data: a tensor's shape as a tuple, a SymInt's expression. ``memo``
    keeps the canonical form of each expression seen (valid for one ``env`` and ``known``)."""
    if isinstance(value, torch.Tensor):
        return tuple(_expr(d, env, known, memo) for d in value.shape)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _expr(value, env, known, memo)
    if isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(symbolic(v, env, known, memo) for v in value)
    return None


def _expr(d, env, known=None, memo=None):
    if isinstance(d, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        if memo is None:
            return _canonical(d.node.expr, env, known)
        key = d.node.expr
        if key not in memo:
            memo[key] = _canonical(key, env, known)
        return memo[key]
    return d


def _canonical(expr, env, known):
    if env is not None:
        expr = env.simplify(expr)
    if known:
        expr = expr.xreplace(known).xreplace(known)  # constants first, then the equality classes
    expr = _exact_divisions(expr)
    return int(expr) if isinstance(expr, sympy.Integer) else expr


def _exact_divisions(expr):
    """``(s0**2) // s0`` is s0 for every s0: floor divisions whose quotient is a polynomial are that polynomial."""
    from torch.utils._sympy.functions import FloorDiv

    if not isinstance(expr, sympy.Basic) or not expr.has(FloorDiv):
        return expr

    def exact(e):
        quotient = sympy.cancel(e.args[0] / e.args[1])
        return quotient if sympy.fraction(quotient)[1] == 1 else e

    return expr.replace(lambda e: isinstance(e, FloorDiv), exact)


def _concrete(info) -> Any:
    if hasattr(info, "shape"):
        return tuple(info.shape)
    return info if isinstance(info, (int, float, bool)) else None


# --- queries ---------------------------------------------------------------------------------------


def sym(node) -> Any:
    """The symbolic shape (tensor) or value (scalar) of a node; None where unknown."""
    return node.meta.get("fxbt_sym") if isinstance(node, torch.fx.Node) else None


def is_static(value) -> bool:
    """A size (or a tuple of sizes) that is one number for every admitted input."""
    if isinstance(value, tuple):
        return all(is_static(v) for v in value)
    return isinstance(value, (int, float)) or (isinstance(value, sympy.Expr) and value.is_number)


def number(value) -> int | float | None:
    """The number a static symbolic value is, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, sympy.Expr) and value.is_number:
        return int(value) if value.is_integer else float(value)
    return None


def fixed(value) -> int | float | None:
    """The one number a scalar (a constant, or a node computed from sizes) is for every admitted call, or
    None where it could be another (``q.size(-1) ** -0.5`` is one number: the weights fix the head size;
    anything read off the sequence length is not)."""
    if isinstance(value, torch.fx.Node):
        return number(sym(value)) if isinstance(value.meta.get("fxbt_val"), (int, float)) else None
    value = getattr(value, "value", value)  # a Const of the canonical view
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def same(a, b) -> bool:
    """Proven equal for every admitted size (structurally equal symbolic sizes)."""
    if a is None or b is None:
        return False
    if isinstance(a, tuple) or isinstance(b, tuple):
        return isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    try:
        return bool(sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)
    except (TypeError, sympy.SympifyError):
        return False


def same_computation(a, b, depth: int = 12) -> bool:
    """Two values computed alike: the same node or constant, or the same deterministic op on arguments
    computed alike (each layer of PyTorch's encoder views the one padding mask in its own nodes)."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_computation(x, y, depth) for x, y in zip(a, b))
    if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
        return not isinstance(a, (torch.fx.Node, torch.Tensor)) and not isinstance(b, (torch.fx.Node, torch.Tensor)) \
            and type(a) is type(b) and a == b
    if not _is_tensor(a) and not _is_tensor(b) and sym(a) is not None and same(sym(a), sym(b)):
        return True  # sizes: equal for every admitted size
    if depth == 0 or a.op != b.op or a.target != b.target or a.op in ("placeholder", "output"):
        return False
    if a.op == "get_attr":
        return True
    if a.op == "call_module" or not _deterministic(a) or a.kwargs.keys() != b.kwargs.keys():
        return False
    return same_computation(a.args, b.args, depth - 1) and all(
        same_computation(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)
