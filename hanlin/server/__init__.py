"""The OpenAI-compatible HTTP server (`hanlin serve`); see app.py."""

from hanlin.server.app import create_app

__all__ = ["create_app"]
