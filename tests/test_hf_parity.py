"""Hugging Face checkpoints: Hanlin's loader/saver against transformers 5 as the reference (tiny, fp32, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hanlin.checkpoints.hf import load_hf_directory, save_hf_directory
from hanlin.checkpoints.hf_config import HANLIN_CONFIG_KEY, config_from_hf, config_to_hf
from hanlin.config import ModelConfig, MoEConfig, RopeConfig
from hanlin.errors import CheckpointError, UnsupportedModelError
from engine_helpers import engine_greedy
from hanlin.engine.kv_cache import PagedKVCache
from hanlin.models import Transformer

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
# One tiny config per family; between them every optional feature is switched on somewhere.
FAMILIES: dict[str, dict] = {
    "llama": dict(
        num_hidden_layers=2,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral": dict(
        num_hidden_layers=2,
        head_dim=24,
        sliding_window=8,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    "qwen2": dict(
        num_hidden_layers=2,
        tie_word_embeddings=True,
        max_position_embeddings=16,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    ),
    "qwen3": dict(
        num_hidden_layers=2,
        head_dim=16,
        attention_bias=True,
        max_position_embeddings=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    ),
    "hunyuan_v1_dense": dict(
        num_hidden_layers=2,
        head_dim=16,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=16,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
    ),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        num_hidden_layers=4,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=16,
            beta_fast=16.0,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
    ),
    "olmoe": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=1.5),
    "hunyuan_v1_moe": dict(
        num_hidden_layers=2,
        head_dim=16,
        num_experts=4,
        moe_topk=2,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=1.0, alpha=1000.0),
    ),
}


def hf_config(model_type: str):
    return AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type])


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger-than-default weights so that norms, biases and routing all matter."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm = param.ndim == 1 and "norm" in name
        param.copy_(1.0 + 0.2 * noise if is_norm else 0.15 * noise)


def build_hf(model_type: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(model_type), attn_implementation="eager")
    randomize(model)
    return model.eval()


def left_padded(length: int = 24, pads: tuple[int, ...] = (0, 5, 10), seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(pads), length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def max_diff_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


def hanlin_greedy(model: Transformer, config: ModelConfig, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """Greedy tokens [B, n] from the engine (paged KV cache, chunked prefill), rows run together unpadded."""
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    return torch.tensor(engine_greedy(model, config, prompts, n))


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


# ---- transformers checkpoint → Hanlin ----------------------------------------------------------


def test_family_table_exercises_every_feature():
    configs = [config_from_hf(hf_config(t).to_dict()) for t in FAMILIES]
    moes = [c.moe for c in configs if c.moe is not None]
    assert {c.rope.type for c in configs} >= {"linear", "dynamic", "yarn", "llama3", "ntk_alpha"}
    assert {c.tie_embeddings for c in configs} == {True, False}
    assert {c.qk_norm for c in configs} == {"none", "head", "proj"}
    assert any(c.attention_bias and c.attention_out_bias for c in configs)
    assert any(c.attention_bias and not c.attention_out_bias for c in configs)
    assert any(c.qk_norm_after_rope for c in configs) and any(c.clip_qkv for c in configs)
    assert any(c.sliding_window for c in configs) and any(c.head_dim * c.num_heads != c.hidden_size for c in configs)
    assert {m.norm_topk_prob for m in moes} == {True, False}
    assert any(m.shared_expert_gate for m in moes)
    assert any(m.shared_expert_dim and not m.shared_expert_gate for m in moes)
    assert any(c.moe and not all(c.is_moe_layer(i) for i in range(c.num_layers)) for c in configs)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_transformers_checkpoint_gives_same_logits_and_greedy_tokens(model_type: str, tmp_path: Path):
    reference = build_hf(model_type)
    reference.save_pretrained(tmp_path)
    config, model = load_hf_directory(tmp_path)
    assert config.model_type == model_type

    ids, mask = left_padded()
    with torch.no_grad():
        diff = max_diff_on_real_tokens(model(ids, mask), hf_logits(reference, ids, mask), mask)
    assert diff <= 1e-4, f"{model_type}: max |Δlogit| = {diff:.3g}"

    ids, mask = left_padded(length=10, pads=(0, 3, 6), seed=2)
    if config.rope.type == "dynamic":
        # Dynamic NTK rescales by the longest sequence in a forward pass, so a padded batch and the engine's
        # unpadded sequences differ once past the context: compare each sequence run alone instead.
        for row, row_mask in zip(ids, mask):
            prompt = row[row_mask.bool()][None]
            expected = hf_greedy(reference, prompt, torch.ones_like(prompt), 20)
            assert torch.equal(hanlin_greedy(model, config, prompt, torch.ones_like(prompt), 20), expected)
    else:
        expected = hf_greedy(reference, ids, mask, 20)
        assert torch.equal(hanlin_greedy(model, config, ids, mask, 20), expected)

    save_hf_directory(config, model, tmp_path / "resaved")
    assert_same_state(load_hf_directory(tmp_path / "resaved")[1], model)


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's stacked expert tensors → the per-expert names older checkpoints use."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, half = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :half].clone()
                out[f"{prefix}{e}.up_proj.weight"] = tensor[e, half:].clone()
        elif name.endswith(".experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor
    return out


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        save_file({n: tensors[n] for n in chunk}, str(directory / file))
        weight_map.update({n: file for n in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_moe_loads_from_fused_per_expert_and_sharded_files(tmp_path: Path):
    reference = build_hf("qwen2_moe")
    reference.save_pretrained(tmp_path / "saved")
    fused = {name: t.detach().contiguous() for name, t in reference.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in fused)
    per_expert = unfuse_experts(fused)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in per_expert
    ids, mask = left_padded()
    expected = hf_logits(reference, ids, mask)
    for layout, tensors in [("fused", fused), ("per_expert", per_expert), ("sharded", per_expert)]:
        directory = tmp_path / layout
        directory.mkdir()
        shutil.copy(tmp_path / "saved" / "config.json", directory)
        if layout == "sharded":
            write_sharded(tensors, directory)
        else:
            save_file(tensors, str(directory / "model.safetensors"))
        _, model = load_hf_directory(directory)
        with torch.no_grad():
            assert max_diff_on_real_tokens(model(ids, mask), expected, mask) <= 1e-4, layout


# ---- cross-layer attention (no transformers reference runs it) --------------------------------------------


def cla_config(share: int) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=96, norm_topk_prob=True, shared_expert_dim=96)
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=96,
        head_dim=16, rms_norm_eps=1e-5, attention_bias=True, attention_out_bias=True, qk_norm="head",
        qk_norm_after_rope=True, rope=RopeConfig(type="ntk_alpha", alpha=100.0), cla_share_factor=share,
        moe=moe, model_type="hunyuan_v1_moe",
    )  # fmt: skip


def random_model(config: ModelConfig, seed: int = 3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    randomize(model, seed)
    return model.eval()


@torch.no_grad()
def reference_logits(model: Transformer, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch recomputation, written from the Hunyuan-with-CLA recipe rather than Hanlin's modules."""
    w = model.state_dict()
    B, T = ids.shape
    H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def swiglu(x, p):
        gate, up = (x @ w[p + "gate_up_proj.weight"].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w[p + "down_proj.weight"].T

    def moe(x, p):
        top_w, top_i = (x @ w[p + "router.weight"].T).softmax(-1).topk(config.moe.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = swiglu(x, p + "shared_expert.")
        for e in range(config.moe.num_experts):
            out = out + (top_w * (top_i == e)).sum(-1, keepdim=True) * swiglu(x, f"{p}experts.{e}.")
        return out

    base = config.rope.theta * config.rope.alpha ** (hd / (hd - 2))
    angles = torch.arange(T).float()[:, None] / base ** (torch.arange(0, hd, 2).float() / hd)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    def heads(x, n):
        return x.reshape(B, T, n, hd).transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["embed_tokens.weight"][ids]
    for i in range(config.num_layers):
        p = f"layers.{i}."
        qkv = rms(x, w[p + "input_norm.weight"]) @ w[p + "attn.qkv_proj.weight"].T + w[p + "attn.qkv_proj.bias"]
        q = rms(rope(heads(qkv[..., : H * hd], H)), w[p + "attn.q_norm.weight"])
        if i % config.cla_share_factor == 0:  # this layer computes K/V; the next ones reuse them
            k = rms(rope(heads(qkv[..., H * hd : (H + KV) * hd], KV)), w[p + "attn.k_norm.weight"])
            v = heads(qkv[..., (H + KV) * hd :], KV)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~causal, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + attn @ w[p + "attn.o_proj.weight"].T + w[p + "attn.o_proj.bias"]
        h = rms(x, w[p + "post_attn_norm.weight"])
        x = x + (moe(h, p + "mlp.") if config.is_moe_layer(i) else swiglu(h, p + "mlp."))
    return rms(x, w["norm.weight"]) @ w["lm_head.weight"].T


def test_cross_layer_attention_matches_reference_and_halves_the_cache(tmp_path: Path):
    config = cla_config(share=2)
    model = random_model(config)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (model(ids) - reference_logits(model, config, ids)).abs().max().item()
    assert diff <= 1e-5, f"max |Δlogit| = {diff:.3g}"

    uncached = ids
    with torch.no_grad():
        for _ in range(12):
            uncached = torch.cat([uncached, model(uncached)[:, -1].argmax(-1, keepdim=True)], dim=1)
    cached = hanlin_greedy(model, config, ids, torch.ones_like(ids), 12)
    assert torch.equal(cached, uncached[:, ids.shape[1] :])

    def pool_bytes(config: ModelConfig) -> int:
        pool = PagedKVCache(config, 4, 16, dtype=torch.float32, device=torch.device("cpu"))
        return sum(t.numel() * t.element_size() for t in pool.k + pool.v)

    assert pool_bytes(config) * 2 == pool_bytes(cla_config(share=1))

    save_hf_directory(config, model, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.0.self_attn.k_proj.weight" in names
    assert "model.layers.1.self_attn.k_proj.weight" not in names
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_cla"] is True and saved["cla_share_factor"] == 2
    loaded_config, loaded = load_hf_directory(tmp_path)
    assert loaded_config == config
    assert_same_state(loaded, model)


# ---- Hanlin → transformers checkpoint → both ---------------------------------------------------------------


def assert_same_state(a: Transformer, b: Transformer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_saved_directory_loads_in_transformers_and_back(model_type: str, tmp_path: Path):
    config = config_from_hf(hf_config(model_type).to_dict())
    model = random_model(config)
    save_hf_directory(config, model, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = left_padded()
    with torch.no_grad():
        diff = max_diff_on_real_tokens(model(ids, mask), hf_logits(reference, ids, mask), mask)
    assert diff <= 1e-5, f"{model_type}: max |Δlogit| = {diff:.3g}"
    loaded_config, loaded = load_hf_directory(tmp_path)
    assert loaded_config == config
    assert_same_state(loaded, model)
    if config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_hanlin_only_features_round_trip_and_still_load_in_transformers(tmp_path: Path):
    moe = MoEConfig(
        num_experts=8, top_k=2, expert_dim=32, score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        router_bias=True, n_group=4, topk_group=2, first_k_dense=1,
    )  # fmt: skip
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96,
        qk_norm="head", moe=moe, model_type="llama",
    )  # fmt: skip
    assert config_from_hf(config_to_hf(config)) == config
    model = random_model(config)
    with torch.no_grad():
        for block in model.moe_layers():
            block.router.selection_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    save_hf_directory(config, model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen3_moe" and saved["mlp_only_layers"] == [0]
    AutoModelForCausalLM.from_pretrained(tmp_path)  # a family transformers knows, even if it cannot route alike
    loaded_config, loaded = load_hf_directory(tmp_path)
    assert loaded_config == config
    assert_same_state(loaded, model)


# ---- config.json parsing --------------------------------------------------------------------------------


def test_old_rope_scaling_and_hunyuan_ntk_alpha():
    llama = hf_config("llama").to_dict()
    del llama["rope_parameters"]
    llama.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert config_from_hf(llama).rope == RopeConfig(type="linear", theta=500000.0, factor=2.0)
    hunyuan = hf_config("hunyuan_v1_moe").to_dict()
    del hunyuan["rope_parameters"]
    hunyuan.update(rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0})
    rope = config_from_hf(hunyuan).rope
    assert (rope.type, rope.alpha, rope.theta) == ("ntk_alpha", 1000.0, 10000.0)
    hunyuan.update(moe_topk=[2, 2], num_experts=[4, 4], use_cla=True, cla_share_factor=2)
    config = config_from_hf(hunyuan)
    assert (config.moe.top_k, config.moe.num_experts, config.cla_share_factor) == (2, 4, 2)
    assert config_to_hf(config)["cla_share_factor"] == 2
    hunyuan["moe_topk"] = [2, 1]
    with pytest.raises(UnsupportedModelError, match="moe_topk"):
        config_from_hf(hunyuan)


def test_qwen_sliding_window_only_when_enabled_on_every_layer():
    qwen2 = {k: v for k, v in hf_config("qwen2").to_dict().items() if k != "layer_types"}
    assert config_from_hf({**qwen2, "use_sliding_window": False, "sliding_window": 8}).sliding_window is None
    everywhere = {**qwen2, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}
    assert config_from_hf(everywhere).sliding_window == 8
    with pytest.raises(UnsupportedModelError, match="some layers"):
        config_from_hf({**everywhere, "max_window_layers": 1})


def test_config_errors_name_the_problem():
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama.*hunyuan_v1_moe"):
        config_from_hf({"model_type": "gpt2"})
    incomplete = hf_config("llama").to_dict()
    del incomplete["hidden_size"]
    with pytest.raises(CheckpointError, match=r"somewhere/config.json.*'hidden_size'"):
        config_from_hf(incomplete, source="somewhere/config.json")


# ---- loader errors ----------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "llama"
    build_hf("llama").save_pretrained(directory)
    return directory


def test_missing_path_or_config(tmp_path: Path, llama_dir: Path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_hf_directory(tmp_path / "nowhere")
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_directory(llama_dir)


def test_pickled_weights_are_refused(llama_dir: Path):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only.*save_pretrained"):
        load_hf_directory(llama_dir)


def test_truncated_safetensors(llama_dir: Path):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_hf_directory(llama_dir)


def test_missing_tensor(llama_dir: Path):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(llama_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        load_hf_directory(llama_dir)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_shape_mismatch_names_tensor_and_shapes(llama_dir: Path):
    edit_config(llama_dir, intermediate_size=80)
    expected = r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\].*\[80, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        load_hf_directory(llama_dir)


def test_tensors_the_config_has_no_place_for(llama_dir: Path):
    edit_config(llama_dir, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="no place for: 'model.layers.1"):
        load_hf_directory(llama_dir)


def test_index_naming_a_missing_shard(llama_dir: Path):
    weights = llama_dir / "model.safetensors"
    write_sharded(load_file(str(weights)), llama_dir)
    weights.unlink()
    (llama_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="index.json.*'model-00002-of-00002.safetensors'.*missing"):
        load_hf_directory(llama_dir)


def test_embedded_hanlin_config_is_ignored_when_family_keys_were_edited():
    config = config_from_hf(hf_config("qwen2").to_dict())
    hf = config_to_hf(config)
    assert HANLIN_CONFIG_KEY in hf
    assert config_from_hf({**hf, "num_hidden_layers": 1}).num_layers == 1
