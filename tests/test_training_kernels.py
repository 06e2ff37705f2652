"""Training's compiled kernels against PyTorch's own ops: the fused lm_head + cross-entropy and causal attention
(forward and gradients), alone and inside the Transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hanlin.config import ModelConfig, MoEConfig
from hanlin.kernels import cpu_kernels
from hanlin.models import attention as attention_module
from hanlin.models import linear_cross_entropy as lce_module
from hanlin.models.causal_attention import causal_attention, kernel_applies, key_starts
from hanlin.models.linear_cross_entropy import linear_cross_entropy
from hanlin.models.transformer import Transformer

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs the compiled CPU kernels (AVX2 and a C++ compiler)")


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_bytes", [4 * 1000 * 7, 16 << 20])  # 7-row chunks (and a ragged last one), one chunk
@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_linear_cross_entropy_matches_pytorch(monkeypatch, chunk_bytes: int, ignored: float) -> None:
    monkeypatch.setattr(lce_module, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    x = torch.randn(45, 24, requires_grad=True)
    weight = (0.3 * torch.randn(1000, 24)).requires_grad_()
    labels = torch.randint(0, 1000, (45,))
    labels[torch.rand(45) < ignored] = -100
    expected = F.cross_entropy(F.linear(x, weight), labels, reduction="sum")
    got = linear_cross_entropy(x, weight, labels)
    assert torch.allclose(got, expected, rtol=1e-5)
    upstream = torch.tensor(0.37)  # backward scales the gradients precomputed in forward by the loss's gradient
    for g, e in zip(grads_of(got * upstream, x, weight), grads_of(expected * upstream, x, weight)):
        assert torch.allclose(g, e, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, weight, labels), expected, rtol=1e-5)


def test_linear_cross_entropy_with_every_label_ignored_is_zero() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(x, weight, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_linear_cross_entropy_refuses_a_label_outside_the_vocabulary() -> None:
    with pytest.raises(RuntimeError, match="outside the vocabulary of 50"):
        linear_cross_entropy(torch.randn(3, 8, requires_grad=True), torch.randn(50, 8), torch.tensor([1, 50, 2]))


def reference_attention(q, k, v, key_start):
    B, H, T, D = q.shape
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i).expand(B, T, T)
    if key_start is not None:
        allowed = allowed & (j[None] >= key_start[:, :, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)


@pytest.mark.parametrize(
    "heads, kv_heads, T, documents, window",
    [(4, 4, 130, False, None), (6, 2, 97, False, None), (4, 2, 150, True, None), (4, 1, 70, True, 20),
     (2, 2, 1, False, None)],
)
def test_causal_attention_matches_sdpa(heads: int, kv_heads: int, T: int, documents: bool, window: int | None) -> None:
    torch.manual_seed(0)
    B, D = 2, 16
    # [B, T, H, D] in memory, as the model's q/k/v views of its projections are
    q = torch.randn(B, T, heads, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, kv_heads, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, kv_heads, D).transpose(1, 2).requires_grad_()
    doc_ids = torch.sort(torch.randint(0, 4, (B, T)), dim=1).values if documents else None
    key_start = key_starts(doc_ids, B, T, window, q.device)
    assert (key_start is None) == (not documents and window is None)
    upstream = torch.randn(B, heads, T, D)
    expected = reference_attention(q, k, v, key_start)
    got = causal_attention(q, k, v, key_start)
    assert torch.allclose(got, expected, atol=2e-6)
    for g, e in zip(grads_of((got * upstream).sum(), q, k, v), grads_of((expected * upstream).sum(), q, k, v)):
        assert torch.allclose(g, e, atol=1e-5)


def test_causal_attention_refuses_a_key_start_after_its_query() -> None:
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match=r"key_start\[b, i\] must be in 0..i"):
        causal_attention(q, q, q, torch.tensor([[0, 0, 3, 0, 0]]))


def tiny(moe: bool, window: int | None = None) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
        sliding_window=window, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32) if moe else None,
    )
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("packed, window", [(False, None), (True, None), (True, 5)])
def test_training_forward_with_kernels_equals_pytorch_ops(monkeypatch, moe: bool, packed: bool,
                                                          window: int | None) -> None:
    """The summed loss and every parameter's gradient with the kernels, against logits + F.cross_entropy and
    SDPA with a boolean mask (the kernels switched off)."""
    model = tiny(moe, window)
    assert kernel_applies(torch.zeros(1, requires_grad=True))
    ids = torch.randint(0, 300, (3, 40))
    labels = torch.randint(0, 300, (3, 40))
    labels[:, :4] = -100
    doc_ids = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5] * 3) if packed else None

    loss = model(ids, document_ids=doc_ids, labels=labels)
    got = grads_of(loss, *model.parameters())
    monkeypatch.setattr(attention_module, "kernel_applies", lambda q: False)
    logits = model(ids, document_ids=doc_ids)
    expected_loss = F.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), reduction="sum")
    expected = grads_of(expected_loss, *model.parameters())
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(4, 33, 64), (3, 5, 7, 13)])
def test_rms_norm_kernel_matches_pytorch_ops(shape: tuple[int, ...]) -> None:
    from hanlin.models.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(*shape).transpose(0, 1).requires_grad_()  # not contiguous, like q/k head norms
    upstream = torch.randn(x.shape)
    got = norm(x)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(got, expected, atol=1e-6)
    for g, e in zip(grads_of((got * upstream).sum(), x, norm.weight),
                    grads_of((expected * upstream).sum(), x, norm.weight)):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5)


def test_swiglu_kernel_matches_pytorch_ops() -> None:
    from hanlin.models.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(32, 20)  # 20: a row's last 4 values go past the 8-wide vector loop
    x = torch.randn(3, 5, 32).requires_grad_()
    with torch.no_grad():
        mlp.gate_up_proj.weight[0] = 60 * torch.ones(32)  # gates far out on both sides of the sigmoid
        mlp.gate_up_proj.weight[1] = -60 * torch.ones(32)
    upstream = torch.randn(3, 5, 32)

    def reference(x):
        gate, up = mlp.gate_up_proj(x).split(20, dim=-1)
        return mlp.down_proj(F.silu(gate) * up)

    got, expected = mlp(x), reference(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    params = [x, *mlp.parameters()]
    for g, e in zip(grads_of((got * upstream).sum(), *params), grads_of((expected * upstream).sum(), *params)):
        assert torch.allclose(g, e, atol=1e-4, rtol=1e-5)
