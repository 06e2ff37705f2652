"""Bearer-key authentication: required as soon as the store holds an active key."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from hanlin.server.errors import APIError
from hanlin.server.state import ServerState


async def authenticate(request: Request) -> Any:
    """The caller's KeyInfo, or None when the server runs without keys. 401 / 429 otherwise."""
    state: ServerState = request.app.state.hanlin
    if not await state.keys_required():
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>' (create one with "
                       "`hanlin keys create`).", type="invalid_request_error", code="invalid_api_key")
    key = await asyncio.to_thread(state.store.verify_key, token)
    if key is None:
        raise APIError(401, f"Incorrect API key provided: {_redact(token)}.", type="invalid_request_error",
                       code="invalid_api_key")
    if key.exhausted:
        raise APIError(429, f"API key {key.name!r} has used its quota of {key.quota_tokens} tokens "
                       f"({key.used_tokens} used); ask the operator to raise it.",
                       type="insufficient_quota", code="insufficient_quota")
    return key


def _redact(token: str) -> str:
    return token[:6] + "…" if len(token) > 8 else "…"
