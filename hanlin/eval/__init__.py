"""Evaluations: perplexity (more come with the evaluation issue)."""
