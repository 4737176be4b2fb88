"""Training mode: attention regions stay differentiable and exact with dropout 0, and pass dropout on."""
from __future__ import annotations

import torch

import fxbt
import zoo
from fxbt.region import regions


def _grads(model, loss):
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dropout_zero_training_outputs_and_gradients_equal():
    spec = zoo.SPECS["bert"]
    model = spec.build(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0).train()
    gm = fxbt.optimize(model, spec.example(), inplace=False)
    assert len(fxbt.report(gm).rewritten("sdpa")) == spec.attention_sites
    if fxbt.report(gm).frontend == "dynamo":  # in training, the stack is packed (symbolic sizes needed)
        assert fxbt.report(gm).rewritten("padding_free"), str(fxbt.report(gm))
    probe = spec.probe()
    real = probe["attention_mask"][..., None]  # padded positions are zeros by design: a loss over real tokens
    want = model(**probe).last_hidden_state
    want_grads = _grads(model, (want.square() * real).mean())
    model.zero_grad()
    got = gm(**probe).last_hidden_state
    got_grads = _grads(model, (got.square() * real).mean())
    assert all(r.last_path == "replacement" for _, r in regions(gm) if r.kernel in ("sdpa", "padding_free"))
    assert ((want - got).abs() * real).max().item() < 1e-5
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 10
    for name in want_grads:  # relative to the gradient's scale where sums over many tokens reach it
        scale = want_grads[name].abs().max().clamp(min=1)
        assert ((want_grads[name] - got_grads[name]).abs().max() / scale).item() < 1e-5, name


def test_attention_dropout_goes_to_sdpa_in_training_only():
    from fxbt.patterns.attention import _dropout_p
    import handwritten as hw

    class WithDropout(hw.BmmMaskedFill):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.25)

        def forward(self, x, mask):
            scores = x @ x.transpose(-2, -1)
            return self.drop(torch.softmax(scores, dim=-1)) @ x

    model = WithDropout().eval()
    gm = fxbt.optimize(model, hw.inputs(), frontend="fx", inplace=False)
    region = next(m for _, m in regions(gm))
    assert region.params["dropout"] == (0.25, "module")
    assert _dropout_p(region.params["dropout"], training=region.training) == 0.0
    gm.train()
    x, mask = hw.inputs(2, 64)
    torch.manual_seed(0)
    out = gm(x, mask)  # a new graph, captured in training mode
    assert "training mode switched" in fxbt.report(gm).history[-1]
    region = next(m for _, m in regions(gm))
    assert region.training and _dropout_p(region.params["dropout"], training=region.training) == 0.25
    gm.eval()
    assert not torch.allclose(out, gm(x, mask))  # dropout was applied in training mode only
