"""The engine's CPU fast path: every decoder layer runs as one compiled call (hanlin/kernels/decode.cpp).

Same model, same weights, same math as hanlin.models: the fused layers read the modules' own tensors, and
an MoE layer's feed-forward still runs through its Python module. Used for fp32 (and quantized) models on
the CPU when the compiled kernels are available; anything else uses the plain module path. Before this path
is built, hanlin/engine/runner.py re-lays an fp32 model's nn.Linear weights as panel QuantLinears (the same
values, qlinear.h kF32Panels), unless HANLIN_NO_PANELS=1.
"""

from __future__ import annotations

import torch
from torch import nn

from hanlin.engine.kv_cache import PagedKVCache, StepKV
from hanlin.kernels import cpu_kernels
from hanlin.models import Transformer
from hanlin.models.int8_linear import int8_gemm_is_exact
from hanlin.models.layers import SwiGLU

F32 = 0


def unsupported_reason(model: Transformer, cache: PagedKVCache) -> str | None:
    """Why the fused path cannot run this model (None when it can)."""
    if cpu_kernels() is None:
        return "the compiled CPU kernels are unavailable"
    if cache.device.type != "cpu":
        return f"the model is on {cache.device}"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "the weights are not float32"
    if model.config.head_dim % 2:
        return "odd head_dim"
    return None


def _linear(kernels, module: nn.Module):
    if isinstance(module, nn.Linear):
        empty = torch.empty(0)
        return kernels.Linear(F32, module.weight.detach(), empty, empty, 0, None if module.bias is None else module.bias.detach())
    # hanlin.models.quantized.QuantLinear (int8, 4-bit or fp32 panels): its packed weight as qlinear.h defines it;
    # a w8a8 layer also passes what its int8 GEMM's output needs (int8_rows.h) and its VNNI-laid weight, if any.
    bias = None if module.bias is None else module.bias.detach()
    int8 = module.int8_activations and int8_gemm_is_exact()
    int8_terms = list(module.int8_terms()) if int8 else None
    vnni = module.int8_vnni if int8 else None
    return kernels.Linear(module.kind, module.qdata, module.scales, module.mins, module.group, bias, int8_terms, vnni)


class FusedModel:
    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        kernels = cpu_kernels()
        assert kernels is not None
        self.kernels = kernels
        self.model = model
        self.cache = cache
        config = model.config
        self.layers = []
        for block in model.layers:
            attn = block.attn
            dense = isinstance(block.mlp, SwiGLU)
            self.layers.append(kernels.FusedLayer(
                num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
                kv_layer=attn.kv_layer, owns_kv=attn.owns_kv, eps=block.input_norm.eps,
                input_norm=block.input_norm.weight.detach(), qkv=_linear(kernels, attn.qkv_proj),
                o=_linear(kernels, attn.o_proj),
                q_norm=attn.q_norm.weight.detach() if config.qk_norm != "none" else None,
                k_norm=attn.k_norm.weight.detach() if config.qk_norm != "none" and attn.owns_kv else None,
                qk_norm_over_projection=config.qk_norm == "proj", qk_norm_after_rope=attn.qk_norm_after_rope,
                clip_qkv=attn.clip_qkv or 0.0,
                post_attn_norm=block.post_attn_norm.weight.detach(),
                gate_up=_linear(kernels, block.mlp.gate_up_proj) if dense else None,
                down=_linear(kernels, block.mlp.down_proj) if dense else None,
            ))
        self.all_fused = all(layer.has_mlp for layer in self.layers)  # no Mixture-of-Experts layer in Python

    def __call__(
        self, input_ids_N: torch.Tensor, positions_N: torch.Tensor, step: StepKV, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits [R, V] of the packed step's rows `logit_rows` (called under the runner's inference_mode)."""
        model = self.model
        x_ND = model.embed_tokens(input_ids_N).float().contiguous()
        cos, sin = model.rotary(positions_N[None], torch.float32)
        plan = self._plan(step, cos[0].contiguous(), sin[0].contiguous())
        if self.all_fused:
            x_ND = self.kernels.forward_layers(self.layers, x_ND, plan)
        else:
            for fused, block in zip(self.layers, model.layers):
                if fused.has_mlp:
                    x_ND = fused.forward(x_ND, plan)
                else:
                    x_ND = fused.attention(x_ND, plan)
                    x_ND = x_ND + block.mlp(block.post_attn_norm(x_ND)[None])[0]
        return model.lm_head(model.norm(x_ND[logit_rows]))

    def _plan(self, step: StepKV, cos: torch.Tensor, sin: torch.Tensor):
        plan = self.kernels.StepPlan()
        plan.cos, plan.sin = cos, sin
        plan.write_slots = step.slot_mapping_N
        plan.block_size = self.cache.block_size
        plan.window = self.cache.sliding_window or 0
        plan.k_pools, plan.v_pools = self.cache.k, self.cache.v
        if step.decode is not None:
            plan.num_decode = step.decode.size
            plan.block_tables, plan.context_lens = step.decode.block_tables_GB, step.decode.context_G
        for chunk in step.chunks:
            mask = None if chunk.mask_QS is None else chunk.mask_QS[None]
            plan.add_chunk(chunk.rows.start, chunk.rows.stop - chunk.rows.start, chunk.slots_S, mask, chunk.causal)
        return plan
