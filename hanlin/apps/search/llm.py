"""LocalChatModel: the agent's ChatModel over an in-process hanlin.LLM; is_small_model() for the agent's defaults."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hanlin.apps.search.types import ChatModel
    from hanlin.llm import LLM

SMALL_MODEL_PARAMETERS = 1_000_000_000  # below this a model can't cite inline or plan usefully


def is_small_model(llm: ChatModel) -> bool:
    """Whether llm is a small model (or one of unknown size): its optional `parameter_count` is < 1e9."""
    count = getattr(llm, "parameter_count", None)
    return not isinstance(count, int) or count < SMALL_MODEL_PARAMETERS


def parameter_count(config: object) -> int | None:
    """A model config's total parameter count, None when it can't tell."""
    counts = getattr(config, "parameter_counts", None)
    try:
        return int(counts()[0]) if callable(counts) else None
    except Exception:  # noqa: BLE001 - an unusual config only loses the size hint
        return None


class LocalChatModel:
    """Renders messages with the model's chat template and streams the reply's text from the engine."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.context_tokens = llm.engine.max_model_len
        self.parameter_count = parameter_count(llm.engine.config)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenizer.encode(text, add_special_tokens=False))

    def stream_chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0,
                    stop: list[str] | None = None) -> Iterator[str]:
        """Text deltas of one reply; closing the iterator early aborts the generation in the engine."""
        prompt_ids = self.llm.chat_prompt_ids(messages)
        room = self.context_tokens - len(prompt_ids)
        params = self.llm.sampling_params(temperature=temperature, max_tokens=max(1, min(max_tokens, room)),
                                          stop=list(stop or []))
        self.prompt_tokens += len(prompt_ids)
        stream = self.llm.stream(prompt_ids, params)
        text, counted = "", False
        try:
            for event in stream:
                if event.text:
                    text += event.text
                    yield event.text
                if event.completion is not None:
                    self.completion_tokens += len(event.completion.token_ids)
                    counted = True
        finally:
            stream.close()
            if not counted:  # closed early (the caller had what it needed): count what was generated
                self.completion_tokens += self.count_tokens(text)
