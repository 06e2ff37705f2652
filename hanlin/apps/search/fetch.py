"""Fetching web pages safely: http(s) only, public addresses only, bounded in time and size, robots.txt.

Every redirect hop is checked again (scheme, address, robots.txt). The connection goes to the very
address that was checked — the URL's host is swapped for the IP, with the Host header and TLS SNI
(and so certificate checks) kept on the real name — so a DNS answer that changes between the check
and the connection (DNS rebinding) cannot point a fetch at a private address.
"""

from __future__ import annotations

import codecs
import re
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass

import httpx

from hanlin.apps.search.addresses import IPAddress, checked_addresses
from hanlin.apps.search.errors import FetchError
from hanlin.apps.search.robots import ROBOTS_MAX_BYTES, RobotsFile, RobotsRules

DEFAULT_USER_AGENT = "HanlinBot/0.1 (+https://github.com/hanlin)"
PAGE_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
JSON_TYPES = ("application/json",)
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HTML_START = re.compile(rb"^\s*<(!doctype\s+html|html|head|body|title|meta|p|div)[\s>]", re.IGNORECASE)


@dataclass
class FetchedPage:
    url: str  # the URL asked for
    final_url: str  # where the content came from, after redirects
    status: int
    content_type: str  # media type without parameters: "text/html", "text/plain", ...
    text: str


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def check(self, url: str) -> float:
        left = self.remaining()
        if left <= 0:
            raise FetchError(f"timed out after {self.seconds:g}s fetching {url}")
        return left


class Fetcher:
    """Fetches web pages for the search agent (thread-safe; one connection pool per Fetcher).

    `timeout` bounds a whole fetch: DNS, connecting, redirects, robots.txt and reading the body.
    A body over `max_bytes` (after decompression) is refused rather than truncated: half a page
    extracts badly and a page that big is rarely the answer. `verify`: TLS certificate checking
    (an ssl.SSLContext with other trusted CAs, or False to skip it).
    """

    def __init__(self, *, timeout: float = 10.0, max_bytes: int = 2_000_000, max_redirects: int = 5,
                 allow_private: bool = False, user_agent: str = DEFAULT_USER_AGENT,
                 respect_robots: bool = True, verify: ssl.SSLContext | bool = True) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allow_private = allow_private
        self.user_agent = user_agent
        self.respect_robots = respect_robots
        self._robots = RobotsRules(user_agent)
        # trust_env=False: an HTTP(S)_PROXY from the environment would resolve names itself, past our checks.
        # No keep-alive: the pool keys connections by the IP we connect to, so a TLS connection checked
        # for one name could otherwise be reused for another name on the same address.
        self._client = httpx.Client(follow_redirects=False, trust_env=False, verify=verify,
                                    limits=httpx.Limits(max_keepalive_connections=0),
                                    headers={"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"})

    def fetch(self, url: str, *, content_types: Collection[str] = PAGE_TYPES, trusted_host: bool = False,
              check_robots: bool | None = None) -> FetchedPage:
        """GET `url` (following up to max_redirects redirects, each checked) and decode its text.

        content_types: media types accepted (default: HTML and plain text).
        trusted_host: the host of `url` itself may have a private address (a service the user
        configured, e.g. their SearXNG); redirects to other hosts are still checked.
        check_robots: obey robots.txt (default: the Fetcher's respect_robots).
        """
        deadline = _Deadline(self.timeout)
        robots = self.respect_robots if check_robots is None else check_robots
        trusted_site = _site(_parse_url(url)) if trusted_host else None
        response, final_url = self._follow(url, deadline, robots=robots, trusted_site=trusted_site)
        try:
            if response.status_code >= 400:
                raise FetchError(f"{final_url} returned HTTP {response.status_code} {response.reason_phrase}".rstrip())
            media_type, charset = _content_type(response)
            if media_type and media_type not in content_types:
                raise FetchError(f"{final_url} is {media_type}, not one of {', '.join(content_types)}")
            body = self._read_body(response, final_url, deadline, self.max_bytes, truncate=False)
        finally:
            response.close()
        if not media_type:  # no Content-Type: accept only what plainly is HTML, when HTML is wanted
            if "text/html" not in content_types or not _HTML_START.match(body[:512]):
                raise FetchError(f"{final_url} sent no Content-Type and does not look like HTML")
            media_type = "text/html"
        return FetchedPage(url=url, final_url=final_url, status=response.status_code, content_type=media_type,
                           text=_decode(body, charset, html=media_type in ("text/html", "application/xhtml+xml")))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _follow(self, url: str, deadline: _Deadline, *, robots: bool,
                trusted_site: str | None) -> tuple[httpx.Response, str]:
        """Open the response at the end of the redirect chain that starts at `url` (body not read yet)."""
        current, previous = url, ""
        for _hop in range(self.max_redirects + 1):
            try:
                parsed = _parse_url(current)
                site = _site(parsed)
                allow_private = self.allow_private or site == trusted_site
                addresses = checked_addresses(parsed.host, parsed.port or _default_port(parsed.scheme),
                                              allow_private=allow_private, timeout=deadline.check(current),
                                              url=current)
            except FetchError as error:
                if previous:
                    raise FetchError(f"{previous} redirected to {current}: {error}") from error
                raise
            if robots and not self._robots_allow(site, parsed, deadline, allow_private=allow_private):
                raise FetchError(f"robots.txt of {site} disallows {current} for {self.user_agent}")
            response = self._open(parsed, addresses, deadline)
            if response.status_code not in REDIRECT_STATUSES:
                return response, str(parsed)
            response.close()
            location = response.headers.get("Location")
            if not location:
                raise FetchError(f"{current} redirects (HTTP {response.status_code}) without a Location")
            previous, current = current, str(parsed.join(location.strip()))
        raise FetchError(f"too many redirects (more than {self.max_redirects}) starting at {url}")

    def _open(self, url: httpx.URL, addresses: list[IPAddress], deadline: _Deadline) -> httpx.Response:
        """Send a GET for `url` to the first of its (checked) addresses that answers; the body is not read."""
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        last_error: Exception | None = None
        for ip in addresses:
            request = self._client.build_request(
                "GET", url.copy_with(host=str(ip), fragment=None), headers={"Host": url.netloc.decode("ascii")},
                timeout=httpx.Timeout(deadline.check(str(url))), extensions=extensions)
            try:
                return self._client.send(request, stream=True)
            except httpx.TimeoutException as error:
                raise FetchError(f"timed out after {deadline.seconds:g}s fetching {url}") from error
            except httpx.ConnectError as error:  # this address is down: try the host's next one
                last_error = error
            except httpx.HTTPError as error:
                raise FetchError(f"could not fetch {url}: {error}") from error
        raise FetchError(f"could not connect to {url.host} for {url}: {last_error}")

    def _read_body(self, response: httpx.Response, url: str, deadline: _Deadline, limit: int, *,
                   truncate: bool) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if not truncate and declared.isdigit() and int(declared) > limit:
            raise FetchError(f"{url} is larger than {limit} bytes (Content-Length {declared})")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                deadline.check(url)
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    if truncate:
                        break
                    raise FetchError(f"{url} is larger than {limit} bytes")
        except httpx.TimeoutException as error:
            raise FetchError(f"timed out after {deadline.seconds:g}s fetching {url}") from error
        except httpx.HTTPError as error:
            raise FetchError(f"could not read {url}: {error}") from error
        return b"".join(chunks)[:limit]

    def _robots_allow(self, site: str, url: httpx.URL, deadline: _Deadline, *, allow_private: bool) -> bool:
        try:
            return self._robots.allowed(site, str(url), lambda robots_url: self._get_robots(
                robots_url, deadline, allow_private=allow_private))
        except FetchError as error:
            raise FetchError(f"could not read robots.txt of {site} ({error}), so {url} was not fetched") from error

    def _get_robots(self, robots_url: str, deadline: _Deadline, *, allow_private: bool) -> RobotsFile:
        """A site's robots.txt, under the same rules as pages (except that a big file is cut, not refused)."""
        first_site = _site(_parse_url(robots_url))
        current = robots_url
        status = 0
        for _hop in range(self.max_redirects + 1):
            parsed = _parse_url(current)
            hop_private = self.allow_private or (allow_private and _site(parsed) == first_site)
            addresses = checked_addresses(parsed.host, parsed.port or _default_port(parsed.scheme),
                                          allow_private=hop_private, timeout=deadline.check(current))
            response = self._open(parsed, addresses, deadline)
            try:
                status = response.status_code
                location = response.headers.get("Location", "").strip()
                if status in REDIRECT_STATUSES and location:
                    current = str(parsed.join(location))
                    continue
                if status >= 300:
                    return RobotsFile(status=status, text="")
                body = self._read_body(response, current, deadline, ROBOTS_MAX_BYTES, truncate=True)
                return RobotsFile(status=status, text=_decode(body, None, html=False))
            finally:
                response.close()
        return RobotsFile(status=status, text="")  # a redirect loop: RFC 9309 says "unavailable", allow


def _parse_url(url: str) -> httpx.URL:
    """`url` as an httpx.URL, refused unless it is an absolute http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as error:
        raise FetchError(f"invalid URL {url!r}: {error}") from error
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme or "relative"
        raise FetchError(f"refused {url!r}: only http and https URLs are fetched, not {scheme} URLs")
    if not parsed.host:
        raise FetchError(f"refused {url!r}: no host")
    return parsed


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _site(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def _content_type(response: httpx.Response) -> tuple[str, str | None]:
    """(media type, charset) from the Content-Type header; ("", None) when there is none."""
    header = response.headers.get("Content-Type", "")
    media_type, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return media_type.strip().lower(), charset


def _known_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _decode(body: bytes, header_charset: str | None, *, html: bool) -> str:
    """Text of a body: BOM, then the header's charset, then <meta charset> (HTML), then UTF-8, then cp1252."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            return body.decode(codec, errors="replace")
    codec = _known_codec(header_charset)
    if codec is None and html:
        match = _META_CHARSET.search(body[:4096])
        codec = _known_codec(match.group(1).decode("ascii")) if match else None
    if codec is not None:
        return body.decode(codec, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace")
