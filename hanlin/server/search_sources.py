"""What a POST /v1/search searches: the server's index, its SearXNG backend, or both.

The choice is checked in the handler (400 search_not_configured when the server has no such source); the
retriever itself is opened in the search's worker thread. The index is opened once per app and shared by
every search (SearchIndex serialises its own access and sees writes made by `hanlin index add` meanwhile);
a web retriever is made per search, with a Fetcher that honours --allow-private-fetch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlin.apps.search.errors import EmptyIndexError
from hanlin.server.errors import APIError
from hanlin.server.search_run import RetrieverOpener

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hanlin.apps.search.index import SearchIndex
    from hanlin.apps.search.types import Retriever

_open_lock = threading.Lock()


def retriever_opener(app: FastAPI, source: str) -> RetrieverOpener:
    settings = app.state.search_settings
    embedding_model: str = app.state.embedding_model
    index: Path | None = settings.index if settings is not None else None
    web: str | None = settings.searxng_url if settings is not None else None
    if index is None and web is None:
        raise _not_configured("search is not configured on this server: start it with --index FILE "
                              "(made by `hanlin index add`) and/or --searxng URL", None)
    if source == "index" and index is None:
        raise _not_configured("this server has no search index: start it with --index FILE", "source")
    if source == "web" and web is None:
        raise _not_configured("this server has no web search backend: start it with --searxng URL", "source")
    use_index = index if source in ("index", "auto") else None
    use_web = web if source in ("web", "auto") else None
    allow_private = bool(settings.allow_private_fetch)

    def open_retriever() -> tuple[Retriever, Callable[[], None]]:
        retrievers: list[Retriever] = []
        closers: list[Callable[[], None]] = []

        def close_all() -> None:
            for close in closers:
                close()

        try:
            if use_index is not None:
                searcher = shared_index(app, use_index, embedding_model)
                if use_web is None:  # alone, an empty index is the request's error (merged, it is skipped)
                    _check_not_empty(searcher)
                retrievers.append(searcher)
            if use_web is not None:
                retrievers.append(_web_retriever(use_web, allow_private, embedding_model, closers))
        except BaseException:
            close_all()
            raise
        if len(retrievers) == 1:
            return retrievers[0], close_all
        from hanlin.apps.search.retrievers import MergedRetriever

        return MergedRetriever(retrievers), close_all

    return open_retriever


def shared_index(app: FastAPI, path: Path, embedding_model: str) -> SearchIndex:
    """The app's SearchIndex over `path`, opened on first use."""
    from hanlin.apps.search.index import SearchIndex

    with _open_lock:
        cached = getattr(app.state, "search_index", None)
        if cached is not None and Path(cached.path) == path and path.is_file():
            return cached
        if not path.is_file():  # removed while the server runs: SearchIndex would make a new, empty one
            raise EmptyIndexError(f"the search index {path} does not exist any more; create it with "
                                  f"`hanlin index add`")
        if cached is not None:
            cached.close()
        index = SearchIndex(path, embedding_model=embedding_model)
        app.state.search_index = index
        return index


def _check_not_empty(index: Any) -> None:
    if index.chunk_count() == 0:
        raise EmptyIndexError(f"the search index {index.path} holds no documents yet; add some with "
                              f"`hanlin index add`")


def _web_retriever(url: str, allow_private: bool, embedding_model: str,
                   closers: list[Callable[[], None]]) -> Retriever:
    from hanlin.apps.search.fetch import Fetcher
    from hanlin.apps.search.web import WebRetriever
    from hanlin.embeddings import load_embedder

    fetcher = Fetcher(allow_private=allow_private)
    closers.append(fetcher.close)
    return WebRetriever(url, fetcher=fetcher, embedder=load_embedder(embedding_model))


def _not_configured(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="search_not_configured")
