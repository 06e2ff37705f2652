"""The web chat page at GET /, driven in a real browser (Debian's chromium through Playwright).

Starts `hanlin serve` on the embedded model in a subprocess (or uses HANLIN_WEB_TEST_URL, a server
already running) and checks what a person would see: the model name, an answer streaming in, Stop,
New chat, error messages, and that HTML in model output never runs. Playwright must never download a
browser here: it launches /usr/bin/chromium.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser import offline_browser, require_playwright

require_playwright()
START_TIMEOUT_S = 300
ANSWER_TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory):
    existing = os.environ.get("HANLIN_WEB_TEST_URL")
    if existing:
        yield existing.rstrip("/")
        return
    tmp = tmp_path_factory.mktemp("web")
    port = _free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "hanlin.cli", "serve", "--model", "smollm2", "--host", "127.0.0.1",
           "--port", str(port), "--db", str(tmp / "hanlin.db")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`hanlin serve` exited with {proc.returncode}:\n{log_tail()}")
            try:
                if _get(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`hanlin serve` not healthy after {START_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory, server_url: str):
    with offline_browser(tmp_path_factory.mktemp("chromium-profile"), server_url) as context:
        yield context


@pytest.fixture
def page(browser_context, server_url: str):
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server_url + "/")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== '…'")
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not browser_context.outside_requests, f"requests outside the server: {browser_context.outside_requests}"


def aborted_count(server_url: str) -> float:
    """Requests the server has counted as aborted (its Prometheus metrics)."""
    status, body = _get(f"{server_url}/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith('hanlin_finished_requests_total{status="aborted"}'):
            return float(line.split()[-1])
    return 0.0


def wait_aborted(server_url: str, more_than: float, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while aborted_count(server_url) <= more_than:
        assert time.monotonic() < deadline, "the server did not abort the request after the page stopped reading"
        time.sleep(0.2)


def set_settings(page, *, max_tokens: int, temperature: float | None = None) -> None:
    page.click("#settings summary")
    page.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    page.click("#settings summary")


def wait_finished(page, index: int = -1) -> str:
    """Waits until the assistant message at `index` is no longer streaming; returns its state."""
    page.wait_for_function(
        """(i) => { const m = [...document.querySelectorAll('.message.assistant')].at(i);
                    return m && m.dataset.state && m.dataset.state !== 'streaming'; }""",
        arg=index, timeout=ANSWER_TIMEOUT_MS,
    )
    return page.locator(".message.assistant").nth(index).get_attribute("data-state")


def test_page_shows_model_name(page, server_url: str) -> None:
    status, body = _get(f"{server_url}/v1/models")
    assert status == 200
    model_id = json.loads(body)["data"][0]["id"]
    assert page.locator("#model-name").text_content() == model_id
    assert page.title() == "Hanlin"
    assert page.evaluate("typeof marked.parse === 'function' && typeof DOMPurify.sanitize === 'function'")
    assert page.locator("#send").is_enabled()
    assert page.locator("#stop").is_hidden()
    assert page.locator("#error").is_hidden()


def test_answer_streams_in(page) -> None:
    set_settings(page, max_tokens=12, temperature=0)
    # The assistant message's text each time the page changed it: one snapshot per batch of DOM changes,
    # so an answer that arrived in one piece shows up as one snapshot, not as many.
    page.evaluate("""() => {
        window.__texts = [];
        new MutationObserver((records) => {
            const m = records.map((r) => r.target).find((t) => t.classList.contains('assistant'));
            if (m) window.__texts.push(m.dataset.text);
        }).observe(document.getElementById('messages'),
                   {subtree: true, attributes: true, attributeFilter: ['data-text']});
    }""")
    requests: list[dict] = []

    def on_request(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            requests.append(json.loads(request.post_data))

    page.on("request", on_request)

    page.click("#input")
    page.keyboard.type("Say hello")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("and count to ten.")
    assert page.input_value("#input") == "Say hello\nand count to ten."
    assert page.locator(".message").count() == 0
    page.keyboard.press("Enter")

    page.wait_for_selector(".message.user")
    assert page.locator(".message.user").text_content() == "Say hello\nand count to ten."
    assert page.locator("#stop").is_visible()
    assert page.locator("#send").is_hidden()
    assert wait_finished(page) == "done"

    final = page.locator(".message.assistant").get_attribute("data-text")
    assert final.strip()
    assert page.locator(".message.assistant .body").inner_text().strip()
    texts = [t for t in page.evaluate("window.__texts") if t]
    partial = set(texts) - {final}
    assert len(partial) >= 2, f"the answer did not stream in: {texts}"
    assert all(final.startswith(t) for t in texts), "partial texts must be prefixes of the answer"
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_hidden()
    assert page.locator("#error").is_hidden()

    assert requests and requests[0]["stream"] is True
    assert requests[0]["max_tokens"] == 12 and requests[0]["temperature"] == 0
    assert requests[0]["messages"] == [{"role": "user", "content": "Say hello\nand count to ten."}]


def test_stop_keeps_partial_answer(page, server_url: str) -> None:
    aborted = aborted_count(server_url)
    set_settings(page, max_tokens=400, temperature=0.8)
    page.fill("#input", "Write a very long story about a dragon who learns to bake bread. Use many details.")
    page.click("#send")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant')?.dataset.text || '').length > 0", timeout=ANSWER_TIMEOUT_MS
    )
    page.click("#stop")
    assert wait_finished(page) == "stopped"
    stopped = page.locator(".message.assistant")
    text = stopped.get_attribute("data-text")
    assert text
    assert "stopped" in stopped.locator(".note").text_content()
    assert page.locator("#stop").is_hidden()
    assert page.locator("#send").is_enabled()
    page.wait_for_timeout(800)
    assert stopped.get_attribute("data-text") == text, "the text kept growing after Stop"
    assert page.locator("#error").is_hidden()
    wait_aborted(server_url, aborted)

    # The page is usable again: the next turn goes out with the stopped answer in the conversation.
    set_settings(page, max_tokens=4)
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#input", "Thanks.")
        page.click("#send")
    sent = json.loads(req.value.post_data)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == text
    assert wait_finished(page) == "done"


def test_new_chat_clears_conversation(page, server_url: str) -> None:
    set_settings(page, max_tokens=4)
    page.fill("#input", "Hi!")
    page.press("#input", "Enter")
    assert wait_finished(page) == "done"
    assert page.locator(".message").count() == 2
    assert len(page.evaluate("hanlin.history()")) == 2
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.evaluate("hanlin.history()") == []
    assert page.locator("#empty-hint").is_visible()

    # New chat in the middle of an answer drops it too, and the page is ready at once.
    aborted = aborted_count(server_url)
    set_settings(page, max_tokens=400)
    page.fill("#input", "Write a long poem about the sea.")
    page.click("#send")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant')?.dataset.text || '').length > 0", timeout=ANSWER_TIMEOUT_MS
    )
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_hidden()
    page.wait_for_timeout(500)
    assert page.locator(".message").count() == 0
    assert page.evaluate("hanlin.history()") == []
    wait_aborted(server_url, aborted)


XSS = (
    "Hello **world**\n\n"
    '<img src=x onerror="window.__pwned = 1">\n\n'
    '<script>window.__pwned = 2</script>\n\n'
    '<a href="javascript:window.__pwned = 3">link</a> <svg onload="window.__pwned = 4"></svg>\n\n'
    '<iframe srcdoc="<script>parent.__pwned = 5</script>"></iframe>'
    '<div onmouseover="window.__pwned = 6">hover</div>\n\n'
    "`<b>code</b>`"
)


def test_html_in_model_output_does_not_run(page) -> None:
    html = page.evaluate("(s) => hanlin.renderMarkdown(s)", XSS)
    assert "<strong>world</strong>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    for bad in ("onerror", "<script", "javascript:", "onload", "<iframe", "onmouseover", "<img"):
        assert bad not in html.lower(), f"{bad!r} survived sanitizing: {html}"

    # The same text arriving as a streamed answer (the server's reply is replaced for this one request).
    chunks = [{"choices": [{"index": 0, "delta": {"content": XSS[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(XSS), 7)]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    page.evaluate("window.__pwned = 0")
    page.fill("#input", "Show me some HTML.")
    page.click("#send")
    assert wait_finished(page) == "done"
    message = page.locator(".message.assistant")
    assert message.get_attribute("data-text") == XSS
    assert message.locator("strong").text_content() == "world"
    message.locator("text=hover").hover()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") == 0
    assert message.locator("img, script, iframe, svg, [onerror], [onmouseover]").count() == 0


def test_errors_are_shown(page) -> None:
    def reply(status: int, body: dict):
        return lambda route: route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/chat/completions",
               reply(401, {"error": {"message": "invalid API key", "type": "authentication_error"}}))
    page.fill("#input", "Hello?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.locator("#error").text_content()
    # The failed turn is taken back: nothing half-sent stays, the words return to the box.
    assert page.locator(".message").count() == 0
    assert page.input_value("#input") == "Hello?"
    assert page.locator("#send").is_enabled()

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions",
               reply(400, {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}))
    page.click("#send")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('max_tokens is too large')")

    # An error event inside the stream, after some text: the text stays, the error shows.
    page.unroute("**/v1/chat/completions")
    sse = (
        'data: {"choices": [{"index": 0, "delta": {"content": "Partial"}, "finish_reason": null}]}\n\n'
        'data: {"error": {"message": "engine overloaded"}}\n\n'
    )
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    page.click("#send")
    assert wait_finished(page) == "error"
    assert "engine overloaded" in page.locator("#error").text_content()
    assert page.locator(".message.assistant").get_attribute("data-text") == "Partial"

    # A key entered under Settings goes out as a bearer token.
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", reply(400, {"error": {"message": "nope"}}))
    page.click("#settings summary")
    page.fill("#api-key", "sk-test-123")
    page.click("#settings summary")
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#input", "Again")
        page.click("#send")
    assert req.value.headers.get("authorization") == "Bearer sk-test-123"
    page.evaluate("localStorage.clear()")
