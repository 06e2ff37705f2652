"""robots.txt rules per site, fetched once and cached (RFC 9309 semantics for failures)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.robotparser import RobotFileParser

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
ROBOTS_CACHE_SECONDS = 24 * 3600  # RFC 9309: a cached robots.txt should not be used for longer than a day


@dataclass
class RobotsFile:
    """What a site's /robots.txt request came back with."""

    status: int
    text: str


class RobotsRules:
    """Answers "may our user agent fetch this URL?", fetching each site's robots.txt once a day.

    Outcomes follow RFC 9309: 2xx → the file's rules; 4xx (404, 403…) or a redirect that leads
    nowhere → no rules, all allowed; 5xx → everything disallowed. When robots.txt cannot be reached
    at all, `get_robots` raises and the error propagates (nothing is cached; the next fetch retries).
    """

    def __init__(self, user_agent: str) -> None:
        self.user_agent = user_agent
        self._parsers: dict[str, tuple[RobotFileParser, float]] = {}
        self._site_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def allowed(self, site: str, url: str, get_robots: Callable[[str], RobotsFile]) -> bool:
        """May `url` (on `site`, "scheme://host[:port]") be fetched? get_robots(robots_url) fetches the file."""
        return self._parser_for(site, get_robots).can_fetch(self.user_agent, url)

    def _parser_for(self, site: str, get_robots: Callable[[str], RobotsFile]) -> RobotFileParser:
        with self._lock:
            site_lock = self._site_locks.setdefault(site, threading.Lock())
        with site_lock:  # concurrent fetches from one site wait for a single robots.txt download
            cached = self._parsers.get(site)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            parser = _parse(site + "/robots.txt", get_robots(site + "/robots.txt"))
            self._parsers[site] = (parser, time.monotonic() + ROBOTS_CACHE_SECONDS)
            return parser


def _parse(robots_url: str, robots: RobotsFile) -> RobotFileParser:
    parser = RobotFileParser(robots_url)
    if 200 <= robots.status < 300:
        parser.parse(robots.text.splitlines())
    elif 300 <= robots.status < 500:
        parser.allow_all = True
    else:
        parser.disallow_all = True
    return parser
