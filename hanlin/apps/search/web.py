"""Web search: a SearXNG instance's JSON API for result links, then the pages themselves, read and ranked."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from hanlin.apps.search.documents import Document, Section, document_from_html
from hanlin.apps.search.errors import FetchError, SearchError
from hanlin.apps.search.fetch import JSON_TYPES, FetchedPage, Fetcher
from hanlin.apps.search.types import Passage

if TYPE_CHECKING:
    from hanlin.embeddings import Embedder

log = logging.getLogger(__name__)

SNIPPET_LOCATION = "search snippet"


@dataclass
class WebResult:
    url: str
    title: str
    snippet: str


class SearxngClient:
    """Result links from a SearXNG instance (its JSON API must be enabled: `search.formats: [html, json]`).

    The instance is configured by the user and is often self-hosted on a private or loopback address,
    so its own host is allowed to be private; robots.txt does not apply to an API we were pointed at.
    """

    def __init__(self, base_url: str, *, fetcher: Fetcher | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.fetcher = fetcher or Fetcher()

    def search(self, query: str, *, limit: int = 10) -> list[WebResult]:
        url = str(httpx.URL(self.base_url + "/search", params={"q": query, "format": "json"}))
        page = self.fetcher.fetch(url, content_types=JSON_TYPES, trusted_host=True, check_robots=False)
        try:
            payload = json.loads(page.text)
        except json.JSONDecodeError as error:
            raise FetchError(f"SearXNG at {self.base_url} sent invalid JSON for {url}: {error}") from error
        if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
            raise FetchError(f"SearXNG at {self.base_url} sent JSON without a \"results\" list for {url}")
        results: list[WebResult] = []
        seen: set[str] = set()
        for item in payload["results"]:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str) or item["url"] in seen:
                continue
            seen.add(item["url"])
            results.append(WebResult(url=item["url"], title=str(item.get("title") or "").strip(),
                                     snippet=str(item.get("content") or "").strip()))
            if len(results) >= limit:
                break
        return results


class WebRetriever:
    """A Retriever over the web: SearXNG results → the top pages fetched in parallel → ranked passages.

    Each query reads at most `max_pages` pages, spends at most `time_budget` seconds on SearXNG and the
    pages (pages not read by then are skipped) and indexes at most `max_page_chars` characters of each
    page's text, which bounds the embedding work that follows. Pages that fail (refused, too big,
    robots.txt, timeouts…) are skipped and logged; `last_skipped` keeps (url, reason) of the latest
    query. When no page could be read, the SearXNG snippets themselves are ranked and returned
    (location "search snippet").
    """

    def __init__(self, searxng_url: str, *, fetcher: Fetcher | None = None, embedder: Embedder | None = None,
                 max_pages: int = 5, time_budget: float | None = None, max_page_chars: int = 60_000) -> None:
        self._owns_fetcher = fetcher is None
        self.fetcher = fetcher or Fetcher()
        self.searxng = SearxngClient(searxng_url, fetcher=self.fetcher)
        self.embedder = embedder
        self.max_pages = max_pages
        self.time_budget = time_budget if time_budget is not None else 2 * self.fetcher.timeout + 5.0
        self.max_page_chars = max_page_chars
        self.last_skipped: list[tuple[str, str]] = []

    def search(self, query: str, k: int = 5) -> list[Passage]:
        if not query.strip():
            raise SearchError("the search query is empty")
        started = time.monotonic()
        results = self.searxng.search(query, limit=max(self.max_pages, k, 10))
        if not results:
            self.last_skipped = []
            return []
        pages, skipped = self._fetch_pages(results[: self.max_pages], started + self.time_budget)
        self.last_skipped = skipped
        for url, reason in skipped:
            log.warning("skipped %s: %s", url, reason)
        documents = [_page_document(page, result, self.max_page_chars) for result, page in pages]
        passages = self._rank(query, k, [doc for doc in documents if doc.sections])
        if passages:
            return passages
        snippets = [_snippet_document(result) for result in results if result.snippet]
        return self._rank(query, k, snippets)

    def close(self) -> None:
        """Close the connection pool of the Fetcher this retriever made (a Fetcher passed in stays open)."""
        if self._owns_fetcher:
            self.fetcher.close()

    def _fetch_pages(self, results: list[WebResult],
                     deadline: float) -> tuple[list[tuple[WebResult, FetchedPage]], list[tuple[str, str]]]:
        """Fetch the result pages in parallel; (pages read in result order, (url, reason) skipped)."""
        pages: dict[int, FetchedPage] = {}
        skipped: list[tuple[str, str]] = []
        if not results:
            return [], skipped
        executor = ThreadPoolExecutor(max_workers=len(results), thread_name_prefix="web-fetch")
        futures: dict[Future[FetchedPage], int] = {
            executor.submit(self.fetcher.fetch, result.url): rank for rank, result in enumerate(results)}
        pending = set(futures)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
                for future in done:
                    rank = futures[future]
                    try:
                        pages[rank] = future.result()
                    except FetchError as error:
                        skipped.append((results[rank].url, str(error)))
                    except Exception as error:  # a bug or an odd server must not sink the whole query
                        skipped.append((results[rank].url, f"{type(error).__name__}: {error}"))
        finally:
            # Fetches still running end on their own deadline; nobody waits for them.
            executor.shutdown(wait=False, cancel_futures=True)
        for future in pending:
            skipped.append((results[futures[future]].url, "not read within the query's time budget"))
        return [(results[rank], pages[rank]) for rank in sorted(pages)], skipped

    def _rank(self, query: str, k: int, documents: list[Document]) -> list[Passage]:
        if not documents:
            return []
        from hanlin.apps.search.index import SearchIndex

        with SearchIndex(":memory:", embedder=self.embedder) as index:
            if index.add_documents(documents) == 0:
                return []
            passages = index.search(query, k, mode="hybrid")
        for passage in passages:
            passage.chunk_id = None  # ids of a throw-away index mean nothing to callers
        return passages


def _page_document(page: FetchedPage, result: WebResult, max_chars: int) -> Document:
    """A fetched page as a "web" Document (source = the page's final URL), its text cut at max_chars."""
    if page.content_type == "text/plain":
        sections = [Section(page.text.strip(), "")] if page.text.strip() else []
        document = Document(page.final_url, result.title or _last_segment(page.final_url), "web", 0.0, sections)
    else:
        document = document_from_html(page.text, page.final_url, kind="web")
        if result.title and (not document.title or document.title == _last_segment(page.final_url)):
            document.title = result.title  # the page has no title of its own: SearXNG's beats a URL part
    document.sections = _first_chars(document.sections, max_chars)
    return document


def _first_chars(sections: list[Section], max_chars: int) -> list[Section]:
    kept: list[Section] = []
    left = max_chars
    for section in sections:
        if left <= 0:
            break
        if len(section.text) > left:
            section = Section(section.text[:left].rsplit(" ", 1)[0] or section.text[:left], section.location)
        kept.append(section)
        left -= len(section.text)
    return kept


def _snippet_document(result: WebResult) -> Document:
    return Document(result.url, result.title or result.url, "web", 0.0, [Section(result.snippet, SNIPPET_LOCATION)])


def _last_segment(url: str) -> str:
    stripped = url.rstrip("/")
    return stripped.rsplit("/", 1)[-1] or url
