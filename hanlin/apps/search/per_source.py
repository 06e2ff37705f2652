"""The per-source writer ("attribute first, then generate"): one short answer sentence per passage, cited [i].

A small model (SmolLM2-135M) reads passages well enough to answer from them, but it cannot bind source
numbers to passages: asked for inline [n] citations it writes none, or wrong ones, and the citation check
then leaves nothing. So the writer asks the model about one passage at a time, in rank order: with only
passage i in its context (between delimiters, as data whose commands are never followed) and the question,
"answer in one short sentence using the source's words, or reply NONE". A sentence it writes is cited [i]
because passage i is where it came from: the only text the model could take it from besides the question.
That citation records provenance; it is not the checker inventing one. The checker is unchanged and as
strict as for the inline writer: a sentence that passage i does not support lexically (a hallucination, a
restated question, "not found") loses its [i] and stays out of the checked answer.

The replies stream as the model writes them: the first characters of each reply are held back until it is
clear the reply is not NONE (or markup-only junk), then the text flows, and " [i]" follows when the
sentence ends. Only a reply's first sentence is kept; duplicates of an earlier sentence are not cited
again. The writer stops once enough sentences are supported.

SmolLM2-135M hardly ever replies NONE: from a passage that doesn't answer it makes an answer up, which the
check then drops (its new words are not in the passage). A passage sharing no content word with the
question is therefore not asked at all: that saves a model call and keeps a copied but off-topic sentence
("The notice says: <an unrelated passage's sentence>") out of the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from hanlin.apps.search.citations import check_answer, content_tokens, strip_citations
from hanlin.apps.search.prompts import per_source_messages
from hanlin.apps.search.types import ChatModel, Passage

SENTENCE_MAX_TOKENS = 48
ENOUGH_SENTENCES = 2  # supported sentences after which the remaining passages are not asked
NONE_REPLY = "none"
# A reply ends at its line; markup or a new turn means the model stopped answering.
PER_SOURCE_STOP = ["\n", '"""', "<source", "</source", "Question:", "<|im_end|>", "<|im_start|>"]
_WORDISH = re.compile(r"[A-Za-z0-9\u3400-\u4dbf\u4e00-\u9fff]")
# The end of the first sentence: . ! ? followed by a space (the next sentence has begun), or Chinese 。！？
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)]*(?=\s)|[。！？]+[”’」』)]*")


class ReplyFilter:
    """What of one per-source reply to stream: nothing until it is clearly not NONE, then its first sentence.

    feed(delta) returns the text to stream now; `complete` turns True once the first sentence has ended
    (the caller can stop the generation); finish() returns the text that closes the reply: the citation
    " [n]" for an answer, "" for NONE or junk. `sentence` is the kept sentence ("" when there is none).
    """

    def __init__(self, citation: int, *, separator: str = " ") -> None:
        self.citation = citation
        self.separator = separator  # streamed before the reply's first text (between two replies)
        self.text = ""  # everything received
        self.sentence = ""  # the kept (streamed) part
        self.decided = False  # the reply is an answer: its text streams
        self.complete = False

    def feed(self, delta: str) -> str:
        if self.complete:
            return ""
        self.text += delta
        if not self.decided:
            start = self.text.lstrip()
            if not _WORDISH.search(start) or NONE_REPLY.startswith(start.lower()) or _is_none(start):
                return ""  # NONE, a prefix of it, or no words yet
            self.decided = True
        body = self.text.lstrip()
        end = _SENTENCE_END.search(body)
        if end is not None:
            body = body[: end.end()]
            self.complete = True
        new = body[len(self.sentence):]
        prefix = self.separator if not self.sentence and new else ""
        self.sentence = body
        return prefix + new

    def finish(self) -> str:
        if not self.decided:
            self.sentence = ""
            return ""
        self.sentence = self.sentence.rstrip()
        return f" [{self.citation}]" if self.sentence else ""


def _is_none(start: str) -> bool:
    """NONE followed by something that is not a letter ("NONE.", "None of the source..."): a NONE reply."""
    return re.match(r"none(?![a-z])(?=.)", start, re.IGNORECASE | re.DOTALL) is not None


def write_per_source(question: str, passages: Sequence[Passage], llm: ChatModel, *,
                     max_tokens: int = SENTENCE_MAX_TOKENS, temperature: float = 0.0,
                     enough: int = ENOUGH_SENTENCES) -> Iterator[str]:
    """Text deltas of the answer: one cited sentence per passage that answers, passage i cited as [i]."""
    kept: list[str] = []  # normalised sentences already cited
    supported = 0
    topic = set(content_tokens(question))
    for n, passage in enumerate(passages, 1):
        if topic and not topic & set(content_tokens(passage.text)):
            continue  # a passage without a word of the question: the model would only make an answer up
        # one reply per line: a reply without a full stop must not run into the next one's sentence
        reply = ReplyFilter(n, separator="\n" if kept else "")
        stream = llm.stream_chat(per_source_messages(question, passage), max_tokens=max_tokens,
                                 temperature=temperature, stop=PER_SOURCE_STOP)
        try:
            for delta in stream:
                text = reply.feed(delta)
                if text:
                    yield text
                if reply.complete or (reply.text and not reply.decided and _is_none(reply.text.lstrip())):
                    break
        finally:
            stream.close()  # stops the generation when the sentence (or a NONE) is complete
        closing = reply.finish()
        key = " ".join(strip_citations(reply.sentence).lower().split()).rstrip(".!?。！？")
        if not closing:
            continue
        duplicate = key in kept  # streamed already, but not cited twice: the check leaves it out
        kept.append(key)
        if duplicate:
            continue
        yield closing
        if not check_answer(f"{reply.sentence}{closing}", passages, question=question).not_found:
            supported += 1
            if supported >= enough:
                return
