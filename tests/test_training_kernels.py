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
@pytest.mark.parametrize("keep_probs", [0, 1000], ids=["recomputed", "kept"])  # the backward's probabilities
def test_causal_attention_matches_sdpa(monkeypatch, heads: int, kv_heads: int, T: int, documents: bool,
                                       window: int | None, keep_probs: int) -> None:
    from hanlin.models import causal_attention as causal_attention_module

    monkeypatch.setattr(causal_attention_module, "KEEP_PROBS_UP_TO", keep_probs)
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
    """The summed loss and every parameter's gradient with the kernels (RoPE, attention, MoE experts, lm_head +
    loss), against PyTorch's ops: RoPE by apply_rope, SDPA with a boolean mask, experts one by one, logits +
    F.cross_entropy."""
    from hanlin.models import expert_group
    from hanlin.models.rope import rope_qkv

    model = tiny(moe, window)
    assert kernel_applies(torch.zeros(1, requires_grad=True))
    ids = torch.randint(0, 300, (3, 40))
    labels = torch.randint(0, 300, (3, 40))
    labels[:, :4] = -100
    doc_ids = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5] * 3) if packed else None

    kernel_calls = []
    monkeypatch.setattr(attention_module, "rope_qkv", lambda *args: kernel_calls.append("rope") or rope_qkv(*args))
    monkeypatch.setattr(expert_group, "expert_group",
                        lambda *args, group=expert_group.expert_group: kernel_calls.append("experts") or group(*args))
    loss = model(ids, document_ids=doc_ids, labels=labels)
    got = grads_of(loss, *model.parameters())
    assert kernel_calls.count("rope") == 2 and kernel_calls.count("experts") == (2 if moe else 0)
    monkeypatch.setattr(attention_module, "kernel_applies", lambda q: False)
    monkeypatch.setattr(attention_module, "training_on_cpu", lambda *tensors: False)
    monkeypatch.setattr(expert_group, "kernel_applies", lambda experts, x: False)
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


@pytest.mark.parametrize("routing", ["balanced", "hot expert", "idle expert", "dropped slots"])
@pytest.mark.parametrize("threads", [1, 2])
def test_moe_expert_kernel_matches_pytorch_ops(monkeypatch, routing: str, threads: int) -> None:
    """The grouped experts' kernel (experts side by side on threads; a hot expert on all threads) against the
    experts run one by one with PyTorch's ops: output and every gradient, including the router's."""
    from hanlin.models import expert_group
    from hanlin.models.moe import MoE

    torch.manual_seed(0)
    moe = MoE(36, MoEConfig(num_experts=6, top_k=2, expert_dim=20, norm_topk_prob=True,
                            capacity_factor=0.5 if routing == "dropped slots" else None)).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        if routing == "hot expert":  # most tokens' first choice: expert 3 (over half a thread's fair share)
            moe.router.weight[3] += 2.0
        if routing == "idle expert":  # expert 5 never chosen
            moe.router.weight[5] -= 50.0
    x = (torch.randn(2, 45, 36) + 0.5).requires_grad_()
    upstream = torch.randn(2, 45, 36)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert expert_group.kernel_applies(moe.experts, x)
        torch.manual_seed(1)  # recycle routing draws at random: both runs draw alike
        got = moe(x)
        counts = moe.last_tokens_per_expert
        with monkeypatch.context() as patch:
            patch.setattr(expert_group, "kernel_applies", lambda experts, x: False)
            torch.manual_seed(1)
            expected = moe(x)
    finally:
        torch.set_num_threads(previous_threads)
    if routing == "hot expert":
        assert counts.max() > 45  # 2 x 45 x 2 slots over 2 threads: a fair share is 90
    if routing == "idle expert":
        assert counts[5] == 0
    if routing == "dropped slots":
        assert moe.last_dropped > 0
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    params = [x, *moe.parameters()]
    got_grads = torch.autograd.grad((got * upstream).sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params, allow_unused=True)
    for g, e in zip(got_grads, expected_grads):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.allclose(g, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 12])  # 12: half a head is past the 8-wide vector loop
def test_rope_qkv_kernel_matches_pytorch_ops(head_dim: int) -> None:
    from hanlin.config import RopeConfig
    from hanlin.models.rope import RotaryEmbedding, apply_rope, rope_qkv

    torch.manual_seed(0)
    B, T, H, Hkv = 2, 9, 4, 2
    rotary = RotaryEmbedding(RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=4), head_dim, 64)
    positions = torch.tensor([list(range(T)), [0, 1, 2, 0, 1, 2, 3, 4, 5]])  # the second row packs two documents
    cos, sin = rotary(positions, torch.float32)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * head_dim, requires_grad=True)
    upstream = [torch.randn(B, heads, T, head_dim) for heads in (H, Hkv, Hkv)]

    def reference(qkv):
        q, k, v = qkv.split([H * head_dim, Hkv * head_dim, Hkv * head_dim], dim=-1)
        q, k, v = (t.view(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    got, expected = rope_qkv(qkv, cos, sin, H, Hkv), reference(qkv)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)
    loss = lambda outs: sum((o * u).sum() for o, u in zip(outs, upstream))  # noqa: E731
    assert torch.allclose(grads_of(loss(got), qkv)[0], grads_of(loss(expected), qkv)[0], atol=1e-5)
