"""The planner: a question → a few search queries. The question itself is always the first query."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hanlin.apps.search.citations import content_tokens
from hanlin.apps.search.prompts import planner_messages
from hanlin.apps.search.types import ChatModel

MAX_QUERY_CHARS = 200  # a longer query is cut (at a word) before it is searched
MAX_QUERY_WORDS = 12  # a "query" longer than this is prose, not a query
PLAN_MAX_TOKENS = 40
_BULLET = re.compile(  # "- ", "1. ", "2) ", "Query 3: ", "Q: "
    r"^\s*(?:[-*•·]+|\d{1,2}\s*[.)、:：]|(?:search\s+)?(?:query|q)\s*\d*\s*[:：])\s*", re.IGNORECASE
)
_WORDISH = re.compile(r"[A-Za-z0-9\u3400-\u4dbf\u4e00-\u9fff]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


@dataclass
class Plan:
    queries: list[str]  # queries[0] is the question itself
    fallback: bool  # True when the model's plan gave no usable query (only the question is searched)


def make_plan(question: str, llm: ChatModel, *, max_queries: int = 3, temperature: float = 0.0) -> Plan:
    """Ask the model for sub-queries (one level, no recursion); max_queries 1 skips the model entirely."""
    question_query = clip_query(question)
    if max_queries <= 1:
        return Plan([question_query], fallback=False)
    reply = "".join(llm.stream_chat(planner_messages(question, max_queries - 1), max_tokens=PLAN_MAX_TOKENS,
                                    temperature=temperature, stop=["\n\n"]))
    extra = parse_plan(reply, question, max_queries - 1)
    return Plan([question_query, *extra], fallback=not extra)


def parse_plan(text: str, question: str, limit: int) -> list[str]:
    """Usable queries in the model's reply (a JSON list or one per line), without the question's duplicates.

    Strict, for small models: a reply with a line of prose (an answer, a refusal, a long sentence) is
    rejected as a whole, and a query sharing no content word with the question is dropped as off-topic.
    """
    lines = _json_list(text)
    if lines is None:
        lines = [line for line in text.splitlines() if line.strip()]
    topic = set(content_tokens(question))
    seen = {_key(question)}
    queries: list[str] = []
    for line in lines:
        if line.strip().endswith(":"):  # a preamble ("Here are the queries:")
            continue
        query = _clean(line)
        if query is None:
            return []
        if _key(query) in seen or not topic & set(content_tokens(query)):
            continue
        seen.add(_key(query))
        queries.append(query)
        if len(queries) >= limit:
            break
    return queries


def clip_query(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_QUERY_CHARS:
        return text
    cut = text[:MAX_QUERY_CHARS]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def _json_list(text: str) -> list[str] | None:
    match = re.search(r"\[.*\]", text, re.DOTALL)
    if match is None:
        return None
    try:
        value = json.loads(match.group(0))
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _clean(line: str) -> str | None:
    query = _BULLET.sub("", line).strip().strip("\"'“”‘’`").strip()
    if not _WORDISH.search(query):
        return None
    if "http://" in query or "https://" in query or "<" in query:
        return None
    words = query.split()
    if _CJK.search(query):
        if len(query) > 40:
            return None
    elif len(words) > MAX_QUERY_WORDS or len(words) < 1:
        return None
    if query.endswith(".") and len(words) > 6:  # a sentence, most likely an answer rather than a query
        return None
    return clip_query(query.rstrip(".?!"))


def _key(query: str) -> str:
    return " ".join(re.findall(r"\w+", query.lower()))
