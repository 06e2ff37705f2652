"""Serving engine: sampling now; scheduler, runner and paged KV cache as they land."""
