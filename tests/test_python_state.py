"""A graph holds the Python values its trace read: it serves a call only while they are what they were.

Each test changes, after ``fxbt.optimize``, something a forward reads besides its inputs and weights, and checks
that the optimized model follows the change exactly as the model does (it would not, were the guard gone).
"""
from __future__ import annotations

import collections
import copy
import functools
import types

import pytest
import torch
import torch.nn as nn

import fxbt
import zoo
from test_encoder import real_token_error

DIM, HEADS = 16, 2
GLOBAL_TEMPERATURE = 1.0  # read by Block.forward as a global
MASKED_SCORE = -10000.0  # read by a helper Model.forward calls
TOL = 1e-5


class Settings:
    """A config-like object the blocks share and read fields of."""

    def __init__(self):
        self.residual = True


class Block(nn.Module):
    def __init__(self, settings):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.act = nn.GELU()
        self.scale = (DIM // HEADS) ** -0.5
        self.settings = settings

    def forward(self, x, bias):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * self.scale / GLOBAL_TEMPERATURE + bias
        h = self.out(self.act((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, DIM)))
        return x + h if self.settings.residual else h


class Model(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.settings = Settings()
        self.layers = nn.ModuleList(Block(self.settings) for _ in range(layers))

    def forward(self, x, mask):
        bias = _padding_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _padding_bias(mask, dtype):
    """A helper the forward calls, reading a global of its own."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASKED_SCORE


def _error(a, b, mask) -> float:
    """On real tokens: a padding-free stack leaves zeros at padded positions."""
    return ((a - b).abs() * mask[..., None]).max().item()


def _inputs(batch=3, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    return torch.randn(batch, seq, DIM, generator=g), mask


def _pair():
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    fxbt.optimize(model, _inputs(2, 5))
    return model, reference


def _set_scale(m):
    m.layers[0].scale = 1.0


def _set_eps(m):
    m.layers[1].norm.eps = 0.5


def _set_field(m):
    m.settings.residual = False


def _append_layer(m):
    torch.manual_seed(1)
    m.layers.append(Block(m.settings))


def _set_submodule_forward(m):
    m.layers[1].out.forward = lambda x: torch.zeros_like(x)


def _add_output_hook(m):
    m.layers[0].out.register_forward_hook(lambda module, args, out: out * 2)


def _add_input_hook(m):
    m.layers[1].register_forward_pre_hook(lambda module, args: (args[0] + 1.0, args[1]))


@pytest.mark.parametrize("change", [_set_scale, _set_eps, _set_field, _append_layer,
                                    _set_submodule_forward, _add_output_hook, _add_input_hook],
                         ids=lambda f: f.__name__[1:])
def test_a_value_the_forward_reads_changed_after_optimize_is_followed(change):
    model, reference = _pair()
    x, mask = _inputs()
    with torch.no_grad():
        before = model(x, mask)
        assert _error(before, reference(x, mask), mask) < TOL and fxbt.report(model).rewritten("padding_free")
        change(model)
        change(reference)
        want = reference(x, mask)
        assert _error(before, want, mask) > 1e-3  # the change matters
        assert _error(model(x, mask), want, mask) < TOL
    history = model.forward.dispatcher.history
    assert any(h.startswith("specialization dropped") for h in history), history


def test_a_global_the_forward_reads_changed_after_optimize_is_followed():
    global GLOBAL_TEMPERATURE
    model, reference = _pair()
    x, mask = _inputs()
    try:
        GLOBAL_TEMPERATURE = 0.25
        with torch.no_grad():
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    finally:
        GLOBAL_TEMPERATURE = 1.0
    assert any("global" in h for h in model.forward.dispatcher.history), model.forward.dispatcher.history


def test_a_global_a_helper_reads_changed_after_optimize_is_followed():
    global MASKED_SCORE
    model, reference = _pair()
    x, mask = _inputs()
    try:
        MASKED_SCORE = -1.0  # padded keys now get weight: every output changes
        with torch.no_grad():
            want = reference(x, mask)
            assert (model(x, mask) - want).abs().max() < TOL
    finally:
        MASKED_SCORE = -10000.0
    assert any("MASKED_SCORE" in h for h in model.forward.dispatcher.history), model.forward.dispatcher.history


def test_unchanged_values_keep_the_graph():
    """The near-miss twin: in-place weight updates and repeated calls change no value the trace read."""
    model, reference = _pair()
    x, mask = _inputs()
    with torch.no_grad():
        for m in (model, reference):
            m.layers[0].qkv.weight.mul_(1.5)
        for _ in range(3):
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert len(model.forward.dispatcher.specializations) == 1
    assert not any(h.startswith("specialization dropped") for h in model.forward.dispatcher.history)


def _scaling_hook():
    """A hook computing from its closure, and a way to change what it closes over."""
    factor = 2.0

    def hook(module, args, out):
        return out * factor

    def set_factor(value):
        nonlocal factor
        factor = value

    return hook, set_factor


def test_a_hook_is_traced_into_the_graph_and_its_closure_is_guarded():
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    hook, set_factor = _scaling_hook()
    for m in (model, reference):
        m.layers[0].out.register_forward_hook(hook)
    fxbt.optimize(model, _inputs(2, 5))
    x, mask = _inputs()
    with torch.no_grad():
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
        report = fxbt.report(model)
        assert report.reports and not report.compiled and report.rewritten("padding_free")
        set_factor(0.5)
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert any("a hook of layers.0.out" in h for h in model.forward.dispatcher.history)


def _recorder(store):
    def hook(module, args, out):
        store.append(out.detach().clone())
    return hook


def _keeper(module, args, out):
    module.kept = out.detach().clone()


def test_a_hook_that_records_keeps_recording():
    """A graph cannot append to a list or store an activation: such calls run through torch.compile, which does."""
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    recorded, wanted = [], []
    model.layers[1].register_forward_hook(_recorder(recorded))
    reference.layers[1].register_forward_hook(_recorder(wanted))
    for m in (model, reference):
        m.layers[0].register_forward_hook(_keeper)
    fxbt.optimize(model, _inputs(2, 5))
    recorded.clear()
    x, mask = _inputs()
    with torch.no_grad():
        for _ in range(2):
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert len(recorded) == len(wanted) == 2
    assert all(_error(a, b, mask) < TOL for a, b in zip(recorded, wanted))
    assert _error(model.layers[0].kept, reference.layers[0].kept, mask) < TOL
    assert any("a graph cannot repeat them" in h for h in model.forward.dispatcher.history)


def _opaque_hooks():
    """Hooks reading what the values guard cannot see: each returns (hook for the model, hook for the reference,
    a change made to both after optimize)."""
    objects = [types.SimpleNamespace(scale=2.0) for _ in range(2)]
    partials = [functools.partial(lambda mod, a, o, cfg: o * cfg.scale, cfg=ob) for ob in objects]
    defaults = [(lambda ob: (lambda mod, a, o, cfg=ob: o * cfg.scale))(ob) for ob in objects]
    tensors = [{"t": torch.tensor(2.0)} for _ in range(2)]
    by_dict = [(lambda d: (lambda mod, a, o: o * d["t"]))(d) for d in tensors]
    return {
        "partial": (*partials, lambda: [setattr(ob, "scale", 3.0) for ob in objects]),
        "default argument": (*defaults, lambda: [setattr(ob, "scale", 3.0) for ob in objects]),
        "tensor in a dict": (*by_dict, lambda: [d.__setitem__("t", torch.tensor(3.0)) for d in tensors]),
    }


@pytest.mark.parametrize("kind", ["partial", "default argument", "tensor in a dict"])
def test_a_hook_reading_what_the_guard_cannot_see_runs_through_torch_compile(kind):
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    mine, theirs, change = _opaque_hooks()[kind]
    model.layers[0].out.register_forward_hook(mine)
    reference.layers[0].out.register_forward_hook(theirs)
    fxbt.optimize(model, _inputs(2, 5))
    x, mask = _inputs()
    with torch.no_grad():
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
        change()
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert not fxbt.report(model).reports


class HookSettings:
    scale = 2.0


def _by_class_attribute(mod, a, o):
    return o * HookSettings.scale


def _replaced_under_its_id(model, reference):
    for m in (model, reference):
        hooks = m.layers[0].out._forward_hooks
        key = next(iter(hooks))
        hooks[key] = lambda mod, a, o: o * 3.0


def _code_swapped(model, reference):
    hook = next(iter(model.layers[0].out._forward_hooks.values()))
    hook.__code__ = (lambda mod, a, o: o * 3.0).__code__


@pytest.mark.parametrize("change", ["class attribute", "hook replaced under its id", "hook code swapped"])
def test_a_hook_changed_in_place_after_optimize_is_followed(change):
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    hook = _by_class_attribute if change == "class attribute" else (lambda mod, a, o: o * 2.0)
    for m in (model, reference):
        m.layers[0].out.register_forward_hook(hook)
    fxbt.optimize(model, _inputs(2, 5))
    x, mask = _inputs()
    try:
        with torch.no_grad():
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
            if change == "class attribute":
                HookSettings.scale = 3.0
            elif change == "hook replaced under its id":
                _replaced_under_its_id(model, reference)
            else:
                _code_swapped(model, reference)  # one function, shared by both
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    finally:
        HookSettings.scale = 2.0


def test_a_recorder_records_what_the_models_calls_record_and_nothing_at_optimize():
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    recorded, wanted = collections.defaultdict(list), collections.defaultdict(list)
    for m, store in ((model, recorded), (reference, wanted)):
        for i, layer in enumerate(m.layers):
            layer.register_forward_hook(lambda mod, a, o, i=i, store=store: store[i].append(o))
    fxbt.optimize(model, _inputs(2, 5))
    assert not recorded
    with torch.no_grad():
        for seed in range(2):
            x, mask = _inputs(seed=seed)
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert [len(v) for v in recorded.values()] == [len(v) for v in wanted.values()] == [2, 2]


def test_the_models_own_hooks_run_once():
    """Hooks of the optimized module itself run around its forward, as ever, and are not in the graph too."""
    torch.manual_seed(0)
    model = Model().eval()
    reference = copy.deepcopy(model)
    for m in (model, reference):
        m.register_forward_hook(lambda mod, a, o: o * 2)
        m.register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] + 1.0, *args[1:]), kwargs), with_kwargs=True)
    fxbt.optimize(model, _inputs(2, 5))
    x, mask = _inputs()
    with torch.no_grad():
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert fxbt.report(model).reports


def test_hooks_added_later_are_run_by_every_route():
    """A global module hook registered after optimize drops the graph; a hook added to a model whose calls run
    through torch.compile drops torch.compile's code, which does not guard on hooks."""
    model, reference = _pair()
    x, mask = _inputs()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, a, o: o * 1.5 if isinstance(mod, nn.LayerNorm) else None)
    try:
        with torch.no_grad():
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    finally:
        handle.remove()
    assert any("global module hooks" in h for h in model.forward.dispatcher.history)
    torch.manual_seed(0)
    counting, twin = Counting().eval(), None
    twin = copy.deepcopy(counting)
    fxbt.optimize(counting, _inputs(2, 5))  # its calls run through torch.compile
    with torch.no_grad():
        counting(x, mask), twin(x, mask)
        for m in (counting, twin):
            m.block.out.register_forward_hook(lambda mod, a, o: o * 3)
        assert _error(counting(x, mask), twin(x, mask), mask) < TOL
    assert any("torch.compile's graphs dropped" in h for h in counting.forward.dispatcher.history)


class Counting(nn.Module):
    """A forward that changes a value of its own on every call: a graph cannot repeat that."""

    def __init__(self):
        super().__init__()
        self.block = Block(Settings())
        self.calls = 0

    def forward(self, x, mask):
        self.calls += 1
        return self.block(x, (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0) * self.calls


def test_a_forward_that_counts_its_calls_is_not_frozen_into_a_graph():
    torch.manual_seed(0)
    model = Counting().eval()
    reference = copy.deepcopy(model)
    fxbt.optimize(model, _inputs(2, 5))
    assert model.calls == 0  # optimize changed nothing
    x, mask = _inputs()
    with torch.no_grad():
        for _ in range(2):
            assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert model.calls == reference.calls == 2
    assert any("changes values of its own" in h for h in model.forward.dispatcher.history)


class KeepsItsAttention(Block):
    """Stores its attention probabilities on ``self`` on every call, for a look at them later."""

    def forward(self, x, bias):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        self.probs = ((q @ k.transpose(-1, -2)) * self.scale + bias).softmax(-1)
        return x + self.out((self.probs @ v).transpose(1, 2).reshape(b, s, DIM))


def test_a_tensor_the_forward_stores_on_itself_is_stored_on_every_call():
    torch.manual_seed(0)
    model = Model()
    model.layers[1] = KeepsItsAttention(model.settings)
    model.eval()
    reference = copy.deepcopy(model)
    fxbt.optimize(model, _inputs(2, 5))
    x, mask = _inputs()
    with torch.no_grad():
        assert _error(model(x, mask), reference(x, mask), mask) < TOL
    assert model.layers[1].probs.shape == reference.layers[1].probs.shape == (3, HEADS, 7, 7)
    assert (model.layers[1].probs - reference.layers[1].probs).abs().max() < TOL
    assert any("layers.1.probs was replaced" in h for h in model.forward.dispatcher.history)


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(Settings())

    def forward(self, x, mask):
        x.mul_(2)
        return self.block(x, (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0)


def test_capture_leaves_the_callers_tensors_as_they_were():
    """Capture and verification run the model on the example (and on a call that makes a graph) several times;
    the caller's tensors end as one call of the model leaves them."""
    torch.manual_seed(0)
    model = WritesItsInput().eval()
    reference = copy.deepcopy(model)
    x, mask = _inputs(2, 5)
    kept = x.clone()
    fxbt.optimize(model, (x, mask))
    assert torch.equal(x, kept)
    x, mask = _inputs(4, 6, seed=1)
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        assert _error(model(mine, mask), reference(theirs, mask), mask) < TOL  # a call that makes a new graph
    assert torch.equal(mine, theirs)


class TakesStarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(Settings())

    def forward(self, x, *rest):
        mask = rest[0] if rest else torch.ones(x.shape[:2])
        return self.block(x, (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0)


def test_inputs_passed_through_star_args_are_never_dropped():
    torch.manual_seed(0)
    model = TakesStarArgs().eval()
    with pytest.raises(fxbt.InputError, match=r"\*args"):
        fxbt.optimize(copy.deepcopy(model), _inputs(2, 5))
    reference = copy.deepcopy(model)
    fxbt.optimize(model, (_inputs(2, 5)[0],))
    x, mask = _inputs()
    with torch.no_grad():
        assert _error(model(x, mask), reference(x, mask), mask) < TOL  # the mask reaches the model's own forward
    assert any("*args" in why for why in model.forward.dispatcher.original_calls)


@pytest.mark.parametrize("field,value", [("output_hidden_states", True), ("return_dict", False)])
def test_a_transformers_config_flag_set_after_optimize_is_followed(field, value):
    spec = zoo.SPECS["bert"]
    model = spec.build("sdpa")
    reference = copy.deepcopy(model)
    fxbt.optimize(model, zoo.make_inputs(spec, 2, 7, True))
    call = zoo.make_inputs(spec, 3, 9, True, seed=1)
    for m in (model, reference):
        setattr(m.config, field, value)
    with torch.no_grad():
        want, got = reference(**call), model(**call)
    assert type(got) is type(want) and len(got) == len(want)
    values = [x.to_tuple() if hasattr(x, "to_tuple") else x for x in (want, got)]
    assert real_token_error(spec, *values, call) < TOL
