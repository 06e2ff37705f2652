"""Weight-only quantized linear and embedding layers (int8 per channel, 4-bit per group; qlinear.h formats), and
fp32 weights re-laid in the kernels' panel format for CPU inference (same values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.kernels import cpu_kernels
from hanlin.models.int8_linear import (
    Int8Terms,
    int8_gemm_is_exact,
    int8_linear_rows,
    int8_terms,
    quantize_rows,
    vnni_weight,
)
from hanlin.models.quant_packing import (
    F32_PANELS,
    PANEL,
    Q4,
    Q8,
    SCHEMES,
    PackedWeight,
    dequantize,
    pack_int8,
    pack_panels,
    pack_weight,
    panel_range,
    panel_rows,
)

__all__ = ["F32_PANELS", "Q4", "Q8", "SCHEMES", "QuantEmbedding", "QuantLinear", "pack_fp32_panels", "quantize_model"]

KIND_NAMES = {Q8: "int8", Q4: "4-bit", F32_PANELS: "fp32 panels"}
FALLBACK_CHUNK_BYTES = 8 << 20  # fp32 weight rows dequantized at once by the pure-PyTorch path


def _fp32_weight(layer: "QuantLinear | QuantEmbedding") -> torch.Tensor:
    """`weight` of a panel layer: the fp32 weight [M, K] as nn.Linear / nn.Embedding hold it (a copy: the layer
    keeps only its panels), for code that reads a plain model's weight, such as saving it. Quantized layers
    have none."""
    if layer.kind != F32_PANELS:
        raise AttributeError("a quantized layer has no fp32 weight (dequantized_weight() gives its values)")
    return layer.dequantized_weight()


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W held packed. The fused decode path reads kind, qdata, scales, mins, group and
    bias directly, so these names are part of the contract."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = int(packed.kind)
        self.group = int(packed.group)
        self.out_features = packed.out_features
        self.in_features = packed.in_features
        self.register_buffer("qdata", packed.qdata.contiguous())
        self.register_buffer("scales", packed.scales.to(torch.float16).contiguous())
        self.register_buffer("mins", packed.mins.to(torch.float16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self.int8_activations = False
        self.int8_vnni = None  # hanlin/kernels/vnni_gemm.h's VnniWeight, for decode-sized batches
        if self.kind == F32_PANELS:
            _state_dict_holds_the_weight(self)

    def use_int8_activations(self) -> None:
        """The w8a8 scheme: each input row is quantized to int8 (its own scale and zero point) and multiplied
        in int8 (one row's result never depends on the others), where _int_mm is exact (int8_gemm_is_exact) and
        the kernels are built; elsewhere the layer stays weight-only. Up to VNNI_MAX_ROWS rows on a CPU with
        AVX512-VNNI, the kernels' VNNI GEMM over a second, VNNI-laid copy of the weight (int8_vnni) multiplies
        them; longer inputs go through torch._int_mm (oneDNN). 1 thread, the embedded model's 30 MLPs: 1 row
        4.8 ms against _int_mm's 10.0, 16 rows 11.7 against 20.8."""
        if self.kind != Q8 or self.group != self.in_features:
            raise ValueError("int8 activations need an int8 weight with one scale per output channel")
        terms = int8_terms(self.qdata, self.scales, self.bias)
        for name, value in zip(Int8Terms._fields, terms):
            self.register_buffer(f"int8_{name}", value, persistent=False)
        self.int8_activations = True
        self.int8_vnni = vnni_weight(self.qdata)

    def int8_terms(self) -> Int8Terms:
        return Int8Terms(*(getattr(self, f"int8_{name}") for name in Int8Terms._fields))

    def computes_int8(self, x_NK: torch.Tensor) -> bool:
        """Whether forward(x_NK) multiplies in int8: a w8a8 layer, fp32 CPU rows, no gradient."""
        return (
            self.int8_activations and x_NK.dtype == torch.float32 and x_NK.device.type == "cpu"
            and not x_NK.requires_grad and cpu_kernels() is not None and int8_gemm_is_exact()
        )

    def _int8_linear(self, x_NK: torch.Tensor) -> torch.Tensor:
        return int8_linear_rows(quantize_rows(x_NK), self.qdata, self.int8_terms(), self.int8_vnni)

    @classmethod
    def int8(cls, linear: nn.Linear) -> "QuantLinear":
        return cls(pack_int8(linear.weight), linear.bias)

    @classmethod
    def int4(cls, linear: nn.Linear, group: int = 32) -> "QuantLinear":
        """4-bit per group where in_features allows it; int8 per channel otherwise."""
        return cls(pack_weight(linear.weight, "int4", group), linear.bias)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.kind, self.qdata, self.scales, self.mins, self.group)

    weight = property(_fp32_weight)

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight_rows(0, self.out_features)

    def _weight_rows(self, start: int, end: int) -> torch.Tensor:
        """fp32 [end - start, in_features]: output rows start .. end of W."""
        if self.kind == F32_PANELS:
            return panel_range(self.qdata, start, end)
        mins = self.mins[start:end] if self.kind == Q4 else self.mins
        return dequantize(self.kind, self.qdata[start:end], self.scales[start:end], mins, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_NK = x.reshape(-1, self.in_features)
        if self.computes_int8(x_NK):
            y = self._int8_linear(x_NK)
            return y.view(*x.shape[:-1], self.out_features)
        use_kernel = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
        kernels = cpu_kernels() if use_kernel and self.qdata.device.type == "cpu" else None
        if kernels is not None:
            y = kernels.qlinear(x_NK, self.kind, self.qdata, self.scales, self.mins, self.group, self.bias)
        else:
            y = self._dequantizing_linear(x_NK)
        return y.view(*x.shape[:-1], self.out_features)

    def _dequantizing_linear(self, x_NK: torch.Tensor) -> torch.Tensor:
        """The pure-PyTorch path, a slice of output rows at a time: a large weight (an lm_head) is never
        expanded to fp32 as a whole."""
        rows = max(1, FALLBACK_CHUNK_BYTES // (4 * self.in_features))
        if self.kind == F32_PANELS:
            rows = -(-rows // PANEL) * PANEL  # whole panels
        outputs = []
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            w = self._weight_rows(start, end).to(x_NK.dtype)
            outputs.append(F.linear(x_NK, w, None if self.bias is None else self.bias[start:end].to(x_NK.dtype)))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        if self.kind == F32_PANELS:
            return f"in_features={self.in_features}, out_features={self.out_features}, {KIND_NAMES[self.kind]}"
        grouping = "per channel" if self.group == self.in_features else f"group {self.group}"
        activations = ", int8 activations" if self.int8_activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {KIND_NAMES[self.kind]} {grouping}{activations}"


class QuantEmbedding(nn.Module):
    """An embedding table held packed; a lookup dequantizes only the rows it selects."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = int(packed.kind)
        self.group = int(packed.group)
        self.num_embeddings = packed.out_features
        self.embedding_dim = packed.in_features
        self.dtype = dtype  # of the looked-up rows (the model's compute dtype)
        self.register_buffer("qdata", packed.qdata.contiguous())
        self.register_buffer("scales", packed.scales.to(torch.float16).contiguous())
        self.register_buffer("mins", packed.mins.to(torch.float16).contiguous())
        if self.kind == F32_PANELS:
            _state_dict_holds_the_weight(self)

    @classmethod
    def sharing(cls, linear: QuantLinear, dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        """The embedding tied to `linear` (an lm_head): the same packed buffers, not a copy."""
        return cls(linear.packed, dtype)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.kind, self.qdata, self.scales, self.mins, self.group)

    weight = property(_fp32_weight)

    def dequantized_weight(self) -> torch.Tensor:
        if self.kind == F32_PANELS:
            return panel_range(self.qdata, 0, self.num_embeddings)
        return dequantize(self.kind, self.qdata, self.scales, self.mins, self.group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.kind == F32_PANELS:
            rows = panel_rows(self.qdata, flat)
        else:
            mins = self.mins[flat] if self.kind == Q4 else self.mins
            rows = dequantize(self.kind, self.qdata[flat], self.scales[flat], mins, self.group)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        grouping = "" if self.kind == F32_PANELS else f" group {self.group}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {KIND_NAMES[self.kind]}{grouping}"


def _state_dict_holds_the_weight(module: QuantLinear | QuantEmbedding) -> None:
    """Panels are a layout of an fp32 weight, not a format: a panel layer's state dict holds `weight` [M, K] as
    nn.Linear / nn.Embedding do (so a model the engine packed still saves as a plain checkpoint), and loading
    a `weight` packs it. (Module-level hooks, not closures: the layer stays picklable.)"""
    module.register_state_dict_post_hook(_save_panels_as_weight)
    module.register_load_state_dict_pre_hook(_load_weight_into_panels)


def _save_panels_as_weight(module, state_dict, prefix, local_metadata) -> None:
    for name in ("qdata", "scales", "mins"):
        state_dict.pop(prefix + name)
    state_dict[prefix + "weight"] = module.dequantized_weight()


def _load_weight_into_panels(module, state_dict, prefix, *args) -> None:
    if prefix + "weight" in state_dict:
        packed = pack_panels(state_dict.pop(prefix + "weight"))
        for name in ("qdata", "scales", "mins"):
            state_dict[prefix + name] = getattr(packed, name)


def tie_quantized_embedding(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Points model.embed_tokens at the packed buffers of model.lm_head (a QuantLinear)."""
    model.embed_tokens = QuantEmbedding.sharing(model.lm_head, dtype)


QUANTIZE_SCHEMES = SCHEMES + ("w8a8",)


def quantize_model(model: nn.Module, scheme: str, group: int = 32, *, min_out_features: int = 16) -> int:
    """Replaces in place every nn.Linear with at least `min_out_features` outputs, and the token embedding
    (tied to the lm_head or not), by packed layers; returns how many linears were replaced. MoE router
    weights are plain parameters, not nn.Linear, and stay fp32. Under int4 the vocabulary matrices (embedding
    and lm_head) get int8, as llama.cpp's 4-bit files keep them at 6-8 bits: on the embedded model, rounding
    them to 4 bits too costs ~+7% perplexity instead of ~+1% (bench/perplexity.py).

    "w8a8" (a hanlin Transformer with fp32 weights) first smooths the activations into the weights
    (hanlin.models.smoothing), then stores int8 per channel as "int8" does and computes in int8
    (QuantLinear.use_int8_activations). A tied lm_head's input is not smoothed (that would change the embedding
    it shares) and takes one int8 pass like every layer. On the embedded model that is +1.06% perplexity in all,
    where two passes (each row's rounding error quantized again) gave +0.54% at twice the GEMM: 16 rows 6.6 ->
    3.6 ms on 1 thread, a batched decode step ~10% faster. Untied and smoothed it measured +1.21%."""
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (use {' or '.join(QUANTIZE_SCHEMES)})")
    if scheme == "w8a8":
        return _quantize_w8a8(model, min_out_features)
    embedding = getattr(model, "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    tied = isinstance(embedding, nn.Embedding) and isinstance(lm_head, nn.Linear) and embedding.weight is lm_head.weight
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.out_features >= min_out_features:
                layer_scheme = "int8" if child is lm_head else scheme
                setattr(parent, name, QuantLinear(pack_weight(child.weight, layer_scheme, group), child.bias))
                replaced += 1
    if isinstance(embedding, nn.Embedding):
        dtype = embedding.weight.dtype
        if tied and isinstance(model.lm_head, QuantLinear):
            tie_quantized_embedding(model, dtype)
        else:
            model.embed_tokens = QuantEmbedding(pack_weight(embedding.weight, "int8"), dtype)
    return replaced


def _quantize_w8a8(model: nn.Module, min_out_features: int) -> int:
    from hanlin.models.smoothing import smooth_activations
    from hanlin.models.transformer import Transformer

    if not isinstance(model, Transformer) or not isinstance(model.lm_head, nn.Linear):
        raise ValueError("w8a8 quantizes a hanlin Transformer that still has its fp32 nn.Linear weights")
    smooth_activations(model)
    replaced = quantize_model(model, "int8", min_out_features=min_out_features)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.kind == Q8:
            module.use_int8_activations()
    return replaced


def pack_fp32_panels(model: nn.Module) -> int:
    """Replaces in place every fp32 nn.Linear on the CPU by a QuantLinear holding the same values in panels
    (qlinear.h kF32Panels), and a token embedding tied to the lm_head by a QuantEmbedding over the lm_head's
    panels; returns how many linears were replaced. For inference: the panels take no gradients. The replaced
    fp32 weights are dropped (no second copy stays). MoE experts are nn.Linear too (one SwiGLU per expert) and
    are packed like the rest; router weights are plain parameters and stay fp32."""
    embedding = getattr(model, "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    tied = isinstance(embedding, nn.Embedding) and isinstance(lm_head, nn.Linear) and embedding.weight is lm_head.weight
    del embedding, lm_head
    # (parent, name) pairs, not the linears themselves: each old weight is freed as soon as it is replaced.
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
    ]
    for parent, name in targets:
        linear = getattr(parent, name)
        setattr(parent, name, QuantLinear(pack_panels(linear.weight), linear.bias))
        del linear
    if tied and isinstance(model.lm_head, QuantLinear):
        tie_quantized_embedding(model, torch.float32)
    return len(targets)
