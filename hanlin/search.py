"""`hanlin.search.ask(question, index=…, llm=…)`: AI search with checked citations, in-process."""

from hanlin.apps.search.agent import SearchResult, ask, run

__all__ = ["SearchResult", "ask", "run"]
