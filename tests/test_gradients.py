"""Gradients through quantized layers: the gradient of x @ Ŵᵀ + b with Ŵ the dequantized weight (exact for
W8A16, the straight-through estimator of the activation rounding for W8A8), the same in every mode, and
torch.compile of a quantized model while gradients are on (as a float norm or embedding in front of
every layer makes them) tracing that backward instead of failing."""
import copy

import pytest
import torch
from torch import nn

from ptqrt import PTQConfig, QuantLinear, quantize

CONFIGS = {
    "w8a16": PTQConfig(),
    "w8a16_group": PTQConfig(weight_granularity="per_group", group_size=16),
    "w8a8_dynamic": PTQConfig(act_dtype="int8"),
    "w8a8_static_smooth": PTQConfig(act_dtype="int8", act_granularity="per_tensor", outliers="smooth"),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8)).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 32, generator=g) for _ in range(3)]


@pytest.mark.parametrize("layer", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_gradient_is_that_of_the_dequantized_weight(name, layer):
    """(Smoothing: the first layer's is folded into the LayerNorm, the second's divides its input.)"""
    q = quantize(_model(), CONFIGS[name], _calib(), quiet=True)
    lin = q[layer]
    assert isinstance(lin, QuantLinear)
    assert (lin.smooth_scale is not None) == (name.endswith("smooth") and layer == 3)
    x = torch.randn(5, lin.in_features, requires_grad=True)
    bias = lin.bias.requires_grad_()  # a bias to train
    y = lin(x)
    with torch.no_grad():
        assert torch.equal(y, lin(x))  # the forward is the int8 one, gradient or not
    g = torch.randn_like(y)
    y.backward(g)
    w = lin.dequantized_weight()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mode_passes_a_gradient_to_what_is_in_front(name):
    """The norm in front of the first quantized layer gets a gradient in every mode (static W8A8 used
    to cut it silently; the others raised at backward)."""
    q = quantize(_model(), CONFIGS[name], _calib(), quiet=True)
    q(torch.randn(4, 32)).square().sum().backward()
    assert q[0].weight.grad is not None and q[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["w8a16", "w8a8_dynamic", "w8a8_static_smooth"])
def test_compiled_with_gradients_on_equals_eager(name):
    """torch.compile traces the backward when an input needs a gradient (the LayerNorm's parameters):
    the compiled model's outputs and gradients equal the eager ones."""
    q = quantize(_model(), CONFIGS[name], _calib(), quiet=True)
    c = copy.deepcopy(q)
    x = torch.randn(7, 32)
    eager = q(x)
    eager.sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(c, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    torch.testing.assert_close(c[0].weight.grad, q[0].weight.grad, rtol=1e-5, atol=1e-5)


def test_experts_pass_a_gradient():
    """A fused-experts MoE model: the input embeddings get the straight-through gradient through every
    quantized expert (W8A8, dynamic)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    q = quantize(model, PTQConfig(act_dtype="int8"), quiet=True)
    emb = q.model.embed_tokens(torch.randint(0, 50, (2, 6))).detach().requires_grad_()
    q(inputs_embeds=emb).logits.square().sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
