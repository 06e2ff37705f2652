"""Applications built on the engine: search (AI search with citations)."""
