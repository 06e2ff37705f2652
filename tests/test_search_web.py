"""Web backend: the safe Fetcher, robots.txt, the SearXNG client and WebRetriever, against a real HTTP
server on 127.0.0.1 (real HTML pages, a SearXNG-format JSON endpoint and a gallery of bad pages)."""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hanlin.apps.search.errors import FetchError
from hanlin.apps.search.fetch import Fetcher
from hanlin.apps.search.web import SNIPPET_LOCATION, SearxngClient, WebRetriever
from hanlin.embeddings import Embedder, load_embedder

FACT = "The Qingshan tea festival is held every year on the ninth day of the fourth lunar month"
SECRET = "The Qingshan tea festival was secretly moved to the first day of winter"
SLOW_SECONDS = 3.0
FETCH_TIMEOUT = 2.0
MAX_BYTES = 100_000


def html_page(title: str, paragraphs: list[str], *, meta_charset: str = "utf-8") -> str:
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (f'<!DOCTYPE html><html><head><meta charset="{meta_charset}"><title>{title}</title></head>'
            f"<body><nav><a href='/'>Home</a></nav><article><h1>{title}</h1>\n{body}\n</article>"
            "<footer>Copyright the Qingshan village office</footer></body></html>")


TEA_PAGE = html_page("Qingshan village tea", [
    "Qingshan is a small village in the hills west of the lake, known for its green tea gardens.",
    "Most families in the village pick tea leaves by hand from early spring until the summer rains.",
    f"{FACT}, when the first picking of the spring is dried over charcoal and shared with visitors.",
    "The village school teaches children how to roll and dry the leaves in the traditional way.",
])
RIVER_PAGE = html_page("The Qingshan river", [
    "The Qingshan river runs for forty kilometres from the mountain springs to the lake.",
    "Fishermen use small bamboo rafts on the river, and the water is clear enough to see the stones.",
    "A stone bridge built in the Ming dynasty crosses the river at the centre of the village.",
])
SECRET_PAGE = html_page("Village notices", [f"{SECRET}.", "This page is for the village office only."])
LATIN1_PAGE = html_page("Café menu", ["Our café serves crème brûlée and tea from Qingshan."],
                        meta_charset="iso-8859-1").encode("iso-8859-1")


class Site(BaseHTTPRequestHandler):
    """Routes of the test site; `hits` counts requests per path, `hosts` records Host headers."""

    hits: Counter[str] = Counter()
    hosts: list[str] = []

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
             headers: dict[str, str] | None = None, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send(302, b"", headers={"Location": location})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        Site.hits[url.path] += 1
        Site.hosts.append(self.headers.get("Host", ""))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if url.path == "/robots.txt":
            self.send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
        elif url.path == "/pages/tea.html":
            self.send(200, TEA_PAGE.encode())
        elif url.path == "/pages/river.html":
            self.send(200, RIVER_PAGE.encode())
        elif url.path == "/pages/latin1.html":
            self.send(200, LATIN1_PAGE, "text/html")  # charset only in <meta>
        elif url.path == "/pages/notes.txt":
            self.send(200, f"Notes about Qingshan.\n{FACT}.\n".encode(), "text/plain; charset=utf-8")
        elif url.path == "/private/secret.html":
            self.send(200, SECRET_PAGE.encode())
        elif url.path == "/redirect-to-tea":
            self.redirect("/pages/tea.html")
        elif url.path == "/redirect-to-file":
            self.redirect("file:///etc/passwd")
        elif url.path == "/redirect-to-private":
            self.redirect("http://10.0.0.1/admin")
        elif url.path.startswith("/loop/"):
            self.redirect(f"/loop/{int(url.path.rsplit('/', 1)[1]) + 1}")
        elif url.path == "/huge.html":
            self.send(200, html_page("Huge", ["tea " * 1000] * 100).encode())
        elif url.path == "/huge-unannounced.html":  # no Content-Length: the cap must hold while streaming
            self.send(200, html_page("Huge", ["tea " * 1000] * 100).encode(), length=False)
            self.close_connection = True
        elif url.path == "/slow.html":
            time.sleep(SLOW_SECONDS)
            self.send(200, html_page("Slow", ["Slow Qingshan tea facts."]).encode())
        elif url.path == "/report.pdf":
            self.send(200, b"%PDF-1.4 not really", "application/pdf")
        elif url.path == "/searx/search" and parse_qs(url.query).get("format") == ["json"]:
            self.send(200, json.dumps(searx_results(base, parse_qs(url.query)["q"][0])).encode(), "application/json")
        elif url.path == "/bad-json/search":
            self.send(200, b"{not json", "application/json")
        elif url.path == "/no-results/search":
            self.send(200, b'{"query": "x", "answers": []}', "application/json")
        else:
            self.send(404, b"<h1>Not found</h1>")


def searx_results(base: str, query: str) -> dict[str, object]:
    def result(path: str, title: str, content: str = "") -> dict[str, str]:
        return {"url": base + path, "title": title, "content": content or f"A page about {title}."}

    results = [
        result("/private/secret.html", "Village notices", "Notices from the village office."),
        result("/redirect-to-file", "Passwords"),
        result("/loop/0", "Loop"),
        result("/huge.html", "Huge"),
        result("/slow.html", "Slow"),
        result("/report.pdf", "Report"),
        result("/missing.html", "Missing"),
        result("/pages/river.html", "River", "The Qingshan river runs from the mountains to the lake."),
        result("/pages/tea.html", "Qingshan tea", f"{FACT}."),
    ]
    return {"query": query, "number_of_results": len(results), "results": results}


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up (timeouts, size caps) leave broken pipes behind: expected here


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("minilm")


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    with Fetcher(allow_private=True, timeout=FETCH_TIMEOUT, max_bytes=MAX_BYTES, max_redirects=3) as f:
        yield f


# -- Fetcher -------------------------------------------------------------------------------------------


def test_fetches_html_and_follows_redirects(site: str, fetcher: Fetcher) -> None:
    page = fetcher.fetch(site + "/redirect-to-tea")
    assert page.status == 200 and page.content_type == "text/html"
    assert page.url == site + "/redirect-to-tea" and page.final_url == site + "/pages/tea.html"
    assert FACT in page.text


def test_decodes_charset_from_meta_and_accepts_plain_text(site: str, fetcher: Fetcher) -> None:
    assert "crème brûlée" in fetcher.fetch(site + "/pages/latin1.html").text
    text = fetcher.fetch(site + "/pages/notes.txt")
    assert text.content_type == "text/plain" and FACT in text.text


def test_connects_to_the_checked_address_but_keeps_the_host_name(site: str, fetcher: Fetcher) -> None:
    port = site.rsplit(":", 1)[1]
    Site.hosts.clear()
    fetcher.fetch(f"http://localhost:{port}/pages/river.html")
    assert f"localhost:{port}" in Site.hosts


@pytest.mark.parametrize("path, message", [
    ("/redirect-to-file", "only http and https"),
    ("/loop/0", "too many redirects (more than 3)"),
    ("/huge.html", f"larger than {MAX_BYTES} bytes"),
    ("/huge-unannounced.html", f"larger than {MAX_BYTES} bytes"),
    ("/report.pdf", "is application/pdf, not one of text/html"),
    ("/missing.html", "returned HTTP 404"),
    ("/private/secret.html", "robots.txt of http://127.0.0.1:"),
])
def test_bad_pages_raise_clear_errors(site: str, fetcher: Fetcher, path: str, message: str) -> None:
    with pytest.raises(FetchError) as raised:
        fetcher.fetch(site + path)
    assert message in str(raised.value)


def test_slow_page_times_out(site: str, fetcher: Fetcher) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match=f"timed out after {FETCH_TIMEOUT:g}s"):
        fetcher.fetch(site + "/slow.html")
    assert time.monotonic() - started < SLOW_SECONDS


def test_robots_txt_is_fetched_once_per_site(site: str) -> None:
    with Fetcher(allow_private=True, timeout=FETCH_TIMEOUT) as fresh:
        before = Site.hits["/robots.txt"]
        fresh.fetch(site + "/pages/tea.html")
        fresh.fetch(site + "/pages/river.html")
        with pytest.raises(FetchError, match="disallows"):
            fresh.fetch(site + "/private/secret.html")
        assert Site.hits["/robots.txt"] - before == 1
    with Fetcher(allow_private=True, timeout=FETCH_TIMEOUT, respect_robots=False) as rude:
        assert SECRET in rude.fetch(site + "/private/secret.html").text


def test_missing_robots_txt_allows_everything() -> None:
    server = QuietServer(("127.0.0.1", 0), _NoRobots)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Fetcher(allow_private=True, timeout=FETCH_TIMEOUT) as fresh:
            assert fresh.fetch(f"http://127.0.0.1:{server.server_address[1]}/anything").text == "hello"
    finally:
        server.shutdown()
        server.server_close()


class _NoRobots(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        status, body = (404, b"no") if self.path == "/robots.txt" else (200, b"hello")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("url, reason", [
    ("http://[::1]:9/", "refused loopback address: ::1"),
    ("http://10.255.255.1/", "refused private address: 10.255.255.1"),
    ("http://169.254.169.254/latest/meta-data/", "refused link-local address: 169.254.169.254"),
    ("http://192.168.1.1/", "refused private address: 192.168.1.1"),
    ("http://[::ffff:127.0.0.1]:9/", "refused loopback (IPv4 127.0.0.1 inside IPv6) address"),
    ("http://[::ffff:10.0.0.1]/", "refused private (IPv4 10.0.0.1 inside IPv6) address"),
    ("http://0.0.0.0:9/", "refused unspecified address"),
    ("http://localhost:9/", "refused loopback address: localhost resolves to"),
    ("http://2130706433:9/", "refused loopback address: 2130706433 resolves to 127.0.0.1"),  # 127.0.0.1 as a number
    ("http://0x7f000001:9/", "refused loopback address: 0x7f000001 resolves to 127.0.0.1"),
    ("http://127.1:9/", "refused loopback address: 127.1 resolves to 127.0.0.1"),
    ("file:///etc/passwd", "only http and https"),
    ("ftp://example.com/file.txt", "only http and https"),
])
def test_private_addresses_and_other_schemes_refused_without_connecting(url: str, reason: str) -> None:
    # 10.255.255.1 would hang for the whole timeout if a connection were tried
    with Fetcher(timeout=10.0) as strict:
        started = time.monotonic()
        with pytest.raises(FetchError) as raised:
            strict.fetch(url)
        assert time.monotonic() - started < 3.0
    assert reason in str(raised.value)


def test_loopback_page_refused_when_private_not_allowed(site: str) -> None:
    with Fetcher(timeout=FETCH_TIMEOUT) as strict, pytest.raises(FetchError, match="refused loopback address"):
        strict.fetch(site + "/pages/tea.html")


def test_trusted_host_may_be_private_but_not_its_redirects(site: str) -> None:
    with Fetcher(timeout=FETCH_TIMEOUT) as strict:
        assert strict.fetch(site + "/pages/tea.html", trusted_host=True).status == 200
        with pytest.raises(FetchError, match="refused private address: 10.0.0.1"):
            strict.fetch(site + "/redirect-to-private", trusted_host=True)


def _self_signed_localhost(directory: Path) -> tuple[Path, Path]:
    """A certificate for the name "localhost" only (not 127.0.0.1) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class _KeepAliveSite(Site):
    protocol_version = "HTTP/1.1"  # keeps connections open, so a client could reuse them


def test_https_connects_to_the_checked_address_with_the_real_name_for_tls(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed_localhost(tmp_path)
    server = QuietServer(("127.0.0.1", 0), _KeepAliveSite)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    trusting = ssl.create_default_context(cafile=str(cert_file))
    try:
        with Fetcher(allow_private=True, timeout=5.0, verify=trusting) as fetcher:
            # the connection goes to 127.0.0.1, yet SNI and the certificate check use "localhost"
            assert FACT in fetcher.fetch(f"https://localhost:{port}/pages/tea.html").text
            # ... and that checked connection is not reused for another name on the same address
            with pytest.raises(FetchError, match="certificate is not valid for .127.0.0.1"):
                fetcher.fetch(f"https://127.0.0.1:{port}/pages/tea.html")  # the cert does not name the IP
    finally:
        server.shutdown()
        server.server_close()


# -- SearXNG ---------------------------------------------------------------------------------------------


def test_searxng_client_reads_results(site: str) -> None:
    results = SearxngClient(site + "/searx", fetcher=Fetcher(timeout=FETCH_TIMEOUT)).search("qingshan tea", limit=3)
    assert [r.title for r in results] == ["Village notices", "Passwords", "Loop"]
    assert results[0].url == site + "/private/secret.html" and results[0].snippet


@pytest.mark.parametrize("path, message", [("/bad-json", "invalid JSON"), ("/no-results", 'without a "results" list'),
                                           ("/nowhere", "returned HTTP 404")])
def test_searxng_client_bad_answers(site: str, path: str, message: str) -> None:
    with pytest.raises(FetchError) as raised:
        SearxngClient(site + path, fetcher=Fetcher(timeout=FETCH_TIMEOUT)).search("tea")
    assert message in str(raised.value) and site + path in str(raised.value)


# -- WebRetriever ----------------------------------------------------------------------------------------


def test_web_retriever_finds_the_fact_and_skips_bad_pages(site: str, fetcher: Fetcher, embedder: Embedder) -> None:
    retriever = WebRetriever(site + "/searx", fetcher=fetcher, embedder=embedder, max_pages=9)
    started = time.monotonic()
    passages = retriever.search("When is the Qingshan tea festival held?", k=3)
    assert time.monotonic() - started < SLOW_SECONDS + 10
    assert passages, retriever.last_skipped
    top = passages[0]
    assert FACT in top.text and top.source == site + "/pages/tea.html" and top.title == "Qingshan village tea"
    assert top.chunk_id is None and top.location != SNIPPET_LOCATION
    assert all(SECRET not in p.text for p in passages)
    reasons = dict(retriever.last_skipped)
    assert "disallows" in reasons[site + "/private/secret.html"]
    assert "only http and https" in reasons[site + "/redirect-to-file"]
    assert "too many redirects" in reasons[site + "/loop/0"]
    assert "larger than" in reasons[site + "/huge.html"]
    assert "timed out" in reasons[site + "/slow.html"]
    assert "application/pdf" in reasons[site + "/report.pdf"]
    assert "404" in reasons[site + "/missing.html"]
    assert len(reasons) == 7


def test_web_retriever_caps_pages(site: str, fetcher: Fetcher, embedder: Embedder) -> None:
    retriever = WebRetriever(site + "/searx", fetcher=fetcher, embedder=embedder, max_pages=2)
    passages = retriever.search("qingshan tea festival", k=3)
    # only the first two results were tried (robots-disallowed and a file: redirect), so only snippets remain
    assert len(retriever.last_skipped) == 2
    assert passages and all(p.location == SNIPPET_LOCATION for p in passages)


def test_web_retriever_without_private_fetches_uses_snippets(site: str, embedder: Embedder) -> None:
    with Fetcher(timeout=FETCH_TIMEOUT) as strict:
        retriever = WebRetriever(site + "/searx", fetcher=strict, embedder=embedder, max_pages=9)
        passages = retriever.search("When is the Qingshan tea festival held?", k=3)
    assert all("refused loopback address" in reason for _, reason in retriever.last_skipped)
    assert len(retriever.last_skipped) == 9
    assert passages[0].location == SNIPPET_LOCATION
    assert FACT in passages[0].text and passages[0].source == site + "/pages/tea.html"
    assert passages[0].title == "Qingshan tea"


def test_web_retriever_bounds_the_time_spent_on_pages(site: str, embedder: Embedder) -> None:
    with Fetcher(allow_private=True, timeout=SLOW_SECONDS + 5, max_bytes=MAX_BYTES) as patient:
        retriever = WebRetriever(site + "/searx", fetcher=patient, embedder=embedder, max_pages=9,
                                 time_budget=FETCH_TIMEOUT)
        passages = retriever.search("When is the Qingshan tea festival held?", k=2)
    # the slow page would have arrived within the fetcher's timeout, but not within the query's budget
    assert dict(retriever.last_skipped)[site + "/slow.html"] == "not read within the query's time budget"
    assert FACT in passages[0].text


def test_long_pages_are_cut_before_indexing(site: str, fetcher: Fetcher, embedder: Embedder) -> None:
    retriever = WebRetriever(site + "/searx", fetcher=fetcher, embedder=embedder, max_pages=9, max_page_chars=120)
    passages = retriever.search("When is the Qingshan tea festival held?", k=5)
    assert passages and all(FACT not in p.text for p in passages)  # the fact sits past the first 120 characters
