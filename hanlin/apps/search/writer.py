"""The writer: the answer to a question from numbered passages, streamed as the model generates it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hanlin.apps.search.prompts import writer_messages, writer_overhead
from hanlin.apps.search.types import ChatModel, Passage

ANSWER_MAX_TOKENS = 256
PASSAGE_BUDGET_CAP = 2000  # more passage text only slows the first token and confuses a small model
# A model that starts echoing the prompt's markup (or a new turn) has stopped answering.
WRITER_STOP = ["<source", "</source", "Question:", "<|im_end|>", "<|im_start|>"]


def passage_budget(llm: ChatModel, question: str, *, answer_tokens: int = ANSWER_MAX_TOKENS,
                   context_tokens: int | None = None) -> int:
    """Tokens left for passages once the writer's instructions, the question and the answer have their room."""
    context = min(context_tokens or llm.context_tokens or 8192, llm.context_tokens or 8192)
    room = context - answer_tokens - llm.count_tokens(writer_overhead(question)) - 64  # 64: chat-template markup
    return max(0, min(PASSAGE_BUDGET_CAP, room))


def write_answer(question: str, passages: Sequence[Passage], llm: ChatModel, *, max_tokens: int = ANSWER_MAX_TOKENS,
                 temperature: float = 0.0) -> Iterator[str]:
    """Text deltas of the answer; passages are cited as [1]..[n] in the order given."""
    yield from llm.stream_chat(writer_messages(question, passages), max_tokens=max_tokens,
                               temperature=temperature, stop=WRITER_STOP)
