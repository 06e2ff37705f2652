"""Engine settings: built once at the edge (CLI flags, HANLIN_* variables, LLM(**options)) and passed inward."""

from __future__ import annotations

from dataclasses import dataclass, fields

from hanlin.errors import HanlinError

# Weight-only quantization at load (hanlin.load): None keeps fp32 (or the device's dtype).
QUANTIZE_SCHEMES = (None, "int8", "int4", "w8a8")
QUANTIZE_HELP = "int8 (per channel), int4 (4-bit, group 32) or w8a8 (int8 weights and int8 activations)"


KV_CACHE_DTYPES = ("auto", "float32", "float16")


def check_quantize(quantize: str | None) -> None:
    """Raises HanlinError naming the valid choices for anything but None or one of the schemes."""
    if quantize not in QUANTIZE_SCHEMES:
        raise HanlinError(f"unknown quantization {quantize!r}: use {QUANTIZE_HELP}, or leave it unset for fp32 weights")


@dataclass
class EngineOptions:
    model: str = "smollm2"  # a model name, .gguf file or Hugging Face directory
    device: str | None = None
    quantize: str | None = None  # None (fp32), "int8" (per channel), "int4" (4-bit, group 32) or "w8a8"
    block_size: int = 16  # tokens per KV block
    kv_cache_mb: int = 1024  # memory for the paged KV cache (allocated lazily by the OS as blocks are touched)
    kv_cache_blocks: int | None = None  # an exact block count instead of kv_cache_mb
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "float32" or "float16" (half the bytes, as llama.cpp's f16)
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_batched_tokens: int = 256  # tokens computed per step: prefill chunks share it with decodes
    max_queued: int = 256  # waiting requests before add_request refuses with QueueFullError
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    # Intra-op CPU threads for the model (process-wide; None keeps torch's default). A server leaves a core
    # to its HTTP thread: OpenMP workers that must wait for a descheduled peer make every op many times slower.
    threads: int | None = None

    def validate(self) -> None:
        check_quantize(self.quantize)
        for name in ("block_size", "kv_cache_mb", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise HanlinError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise HanlinError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: use {', '.join(KV_CACHE_DTYPES)}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 1:
            raise HanlinError(f"kv_cache_blocks must be >= 1, got {self.kv_cache_blocks}")
        if self.threads is not None and self.threads < 1:
            raise HanlinError(f"threads must be >= 1, got {self.threads}")
        if self.max_queued < 0:
            raise HanlinError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise HanlinError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise HanlinError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = cls(**kwargs)  # type: ignore[arg-type]
        options.validate()
        return options
