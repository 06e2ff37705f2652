from hanlin.models.transformer import Transformer

__all__ = ["Transformer"]
