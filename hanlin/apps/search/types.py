"""What the index, the web backend, the agent and the interfaces pass to each other."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

EventType = Literal["plan", "search", "read", "answer_delta", "answer", "sources", "error", "done"]


@dataclass
class Passage:
    """A retrieved piece of a source: what the agent reads and cites."""

    text: str
    source: str  # absolute file path or URL
    title: str
    location: str  # human-readable place in the source: "page 3", "lines 120–148", "Installation › Linux"
    score: float = 0.0
    chunk_id: int | None = None  # the index's chunk row id (None for web passages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever(Protocol):
    """Anything that returns the k passages that best match a query (best first)."""

    def search(self, query: str, k: int = 5) -> list[Passage]: ...


class ChatModel(Protocol):
    """The generator the agent writes with: an in-process hanlin.LLM or the server's engine."""

    context_tokens: int  # the model's context window
    prompt_tokens: int  # running totals, for usage reports
    completion_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def stream_chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0,
                    stop: list[str] | None = None) -> Iterator[str]:
        """Text deltas of one reply; closing the iterator early aborts the generation."""
        ...


@dataclass
class Event:
    """One step of a search run, streamed to the CLI, the server (SSE) and Python callers."""

    type: EventType
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.data}
