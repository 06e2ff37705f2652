from hanlin.models.kv_cache import KVCache
from hanlin.models.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
