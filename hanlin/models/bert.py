"""BERT-style encoder (post-LN, absolute positions, token types): config, module and safetensors loader.

Covers the checkpoints sentence-transformers ships for BERT (all-MiniLM-L6-v2 and friends). The query, key and
value projections are fused into one [3D, D] linear so each layer runs one GEMM for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hanlin.errors import CheckpointError, UnsupportedModelError
from hanlin.kernels import cpu_kernels
from hanlin.models.int8_linear import Int8Linear

_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModelError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"BERT activation {self.hidden_act!r} is not supported "
                                        f"(supported: {', '.join(_ACTIVATIONS)})")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("model_type") != "bert":
            raise UnsupportedModelError(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"{path}: only absolute position embeddings are supported")
        fields = {name for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in fields and v is not None})


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids_BT: torch.Tensor, token_types_BT: torch.Tensor) -> torch.Tensor:
        positions_T = torch.arange(ids_BT.shape[1], device=ids_BT.device)
        x_BTD = self.word(ids_BT) + self.token_type(token_types_BT) + self.position(positions_T)
        return self.norm(x_BTD)


class BertLayer(nn.Module):
    """Self-attention then MLP, each followed by residual add and LayerNorm (post-LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.gelu_approximate = _ACTIVATIONS[config.hidden_act]
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.up = nn.Linear(d, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, d)
        self.mlp_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.up_applies_gelu = False  # set when `up` is swapped for a linear with GELU fused in (pack_bf16)
        self.out_adds_residual = False  # set when attn_out and down add the residual in their GEMM (pack_bf16)
        self.qkv_splits_heads = False  # set when `qkv` returns [3, B, heads, T, head_dim] itself (quantize_int8)

    def forward(self, x_BTD: torch.Tensor, keep_B11T: torch.Tensor | None,
                key_lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        """keep_B11T: which keys each row may attend to (None: all); key_lengths_B: the same as lengths when the
        keys kept are each row's first ones (right padding), else None."""
        B, T, D = x_BTD.shape
        if self.qkv_splits_heads:
            qkv_3BHTK = self.qkv(x_BTD)
        else:
            qkv_3BHTK = self.qkv(x_BTD).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_BHTK = attention(qkv_3BHTK[0], qkv_3BHTK[1], qkv_3BHTK[2], keep_B11T, key_lengths_B)
        attn_BTD = attn_BHTK.transpose(1, 2).reshape(B, T, D)
        x_BTD = self.attn_norm(self._plus_residual(self.attn_out, attn_BTD, x_BTD))
        hidden_BTF = self.up(x_BTD)
        if not self.up_applies_gelu:
            hidden_BTF = F.gelu(hidden_BTF, approximate=self.gelu_approximate)
        return self.mlp_norm(self._plus_residual(self.down, hidden_BTF, x_BTD))

    def _plus_residual(self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return linear(x, residual) if self.out_adds_residual else residual + linear(x)


class BertModel(nn.Module):
    """forward(ids [B, T], attention_mask [B, T] of 1/0) -> last hidden states [B, T, D]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None,
                token_types_BT: torch.Tensor | None = None) -> torch.Tensor:
        if token_types_BT is None:
            token_types_BT = torch.zeros_like(ids_BT)
        x_BTD = self.embeddings(ids_BT, token_types_BT)
        keep_B11T = key_lengths_B = None
        if attention_mask_BT is not None and not bool(attention_mask_BT.all()):
            keep_BT = attention_mask_BT.bool()
            keep_B11T = keep_BT[:, None, None, :]
            lengths_B = keep_BT.sum(dim=1)
            if torch.equal(keep_BT, torch.arange(keep_BT.shape[1], device=keep_BT.device) < lengths_B[:, None]):
                key_lengths_B = lengths_B
        for layer in self.layers:
            x_BTD = layer(x_BTD, keep_B11T, key_lengths_B)
        return x_BTD


_GEMM_ATTENTION_MAX_TOKENS = {torch.bfloat16: 256, torch.float32: 128}  # measured crossovers, bench in docs


def attention(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor, keep_B11T: torch.Tensor | None,
              key_lengths_B: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional softmax attention. On the CPU with the compiled kernels, when the mask is a right padding (or
    none) and the sequences are short: two batched GEMMs around the kernels' softmax (bf16 up to 256 tokens,
    fp32 up to 128: 1.5-2.5x ATen's flash attention there, slower beyond); else scaled_dot_product_attention."""
    kernels = cpu_kernels() if q_BHTK.device.type == "cpu" else None
    longest = _GEMM_ATTENTION_MAX_TOKENS.get(q_BHTK.dtype, 0)
    if (kernels is None or q_BHTK.shape[-2] > longest or k_BHTK.shape[-2] > longest
            or (keep_B11T is not None and key_lengths_B is None)):
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=keep_B11T)
    scores_BHTT = torch.matmul(q_BHTK, k_BHTK.transpose(-1, -2))
    kernels.attention_softmax_(scores_BHTT, q_BHTK.shape[-1] ** -0.5, key_lengths_B)
    return torch.matmul(scores_BHTT, v_BHTK)


def _hf_names(layer: int) -> dict[str, str]:
    """Hanlin parameter name (within layer i) -> Hugging Face name."""
    hf = f"encoder.layer.{layer}."
    return {
        "attn_out.weight": hf + "attention.output.dense.weight",
        "attn_out.bias": hf + "attention.output.dense.bias",
        "attn_norm.weight": hf + "attention.output.LayerNorm.weight",
        "attn_norm.bias": hf + "attention.output.LayerNorm.bias",
        "up.weight": hf + "intermediate.dense.weight",
        "up.bias": hf + "intermediate.dense.bias",
        "down.weight": hf + "output.dense.weight",
        "down.bias": hf + "output.dense.bias",
        "mlp_norm.weight": hf + "output.LayerNorm.weight",
        "mlp_norm.bias": hf + "output.LayerNorm.bias",
    }


_EMBEDDING_NAMES = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "embeddings.LayerNorm.bias",
}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError (a subclass)
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc
    prefix = "bert."
    if any(name.startswith(prefix + "embeddings.") for name in tensors):
        tensors = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return tensors


def hanlin_state_dict(tensors: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face BERT state dict (without the "bert." prefix) onto BertModel's names."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"BERT checkpoint lacks tensor {name!r}")
        return tensors[name]

    state = {ours: take(theirs) for ours, theirs in _EMBEDDING_NAMES.items()}
    for i in range(config.num_hidden_layers):
        for ours, theirs in _hf_names(i).items():
            state[f"layers.{i}.{ours}"] = take(theirs)
        self_attn = f"encoder.layer.{i}.attention.self."
        for kind in ("weight", "bias"):
            state[f"layers.{i}.qkv.{kind}"] = torch.cat(
                [take(self_attn + part + "." + kind) for part in ("query", "key", "value")])
    return state


def load_bert(directory: str | Path) -> BertModel:
    """A float32 BertModel in eval mode from a directory with config.json and model.safetensors."""
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise CheckpointError(f"{directory}: a BERT checkpoint needs config.json and model.safetensors")
    config = BertConfig.from_json(directory / "config.json")
    state = hanlin_state_dict(_read_tensors(weights), config)
    with torch.device("meta"):
        model = BertModel(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def quantize_int8(model: BertModel, *, float_dtype: torch.dtype = torch.float32) -> BertModel:
    """Every encoder linear as an Int8Linear (in place, CPU): `up` returns its GELU output already quantized for
    `down`, and `attn_out` and `down` add the residual. Embeddings, LayerNorms and attention run in float_dtype
    (bf16 where the CPU computes it natively)."""
    model.embeddings.to(float_dtype)
    for layer in model.layers:
        layer.qkv = Int8Linear(layer.qkv, qkv_heads=layer.heads)
        layer.attn_out = Int8Linear(layer.attn_out)
        layer.up = Int8Linear(layer.up, gelu=layer.gelu_approximate)
        layer.down = Int8Linear(layer.down)
        layer.qkv_splits_heads = layer.up_applies_gelu = layer.out_adds_residual = True
        layer.attn_norm.to(float_dtype)
        layer.mlp_norm.to(float_dtype)
    return model


class PackedLinear(nn.Module):
    """A CPU linear on oneDNN with its weight reordered once into the GEMM kernel's layout (what inductor's
    freezing does), optionally with GELU fused into the GEMM's epilogue. bf16 on AVX512-BF16 / AMX CPUs."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, *, gelu: str | None = None,
                 batch_hint: int = 4096) -> None:
        super().__init__()
        weight = linear.weight.detach().to(dtype)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        self.register_buffer("bias", linear.bias.detach().to(dtype) if linear.bias is not None else None)
        self.attr, self.algorithm = ("gelu", gelu) if gelu is not None else ("none", "")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` added in the GEMM's epilogue when given (no GELU then)."""
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.attr, [], self.algorithm)


def can_pack() -> bool:
    """Whether this PyTorch build has the oneDNN CPU linear kernels PackedLinear uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_bf16(model: BertModel) -> BertModel:
    """bf16 everywhere, encoder linears as PackedLinear with GELU fused into `up` and the residual adds into
    `attn_out` and `down` (in place, CPU only)."""
    model = model.to(torch.bfloat16)
    for layer in model.layers:
        for name in ("qkv", "attn_out", "down"):
            setattr(layer, name, PackedLinear(getattr(layer, name), torch.bfloat16))
        layer.up = PackedLinear(layer.up, torch.bfloat16, gelu=layer.gelu_approximate)
        layer.up_applies_gelu = layer.out_adds_residual = True
    return model
