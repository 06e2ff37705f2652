"""Search errors a user can fix (they print as one line in the CLI and as a 4xx on the server)."""

from hanlin.errors import HanlinError


class SearchError(HanlinError):
    """Base class for search mistakes."""


class EmptyIndexError(SearchError):
    """The index holds no documents yet."""


class UnsupportedFileError(SearchError):
    """A file whose type the index does not read."""


class CorruptFileError(SearchError):
    """A file that could not be read or parsed."""


class FetchError(SearchError):
    """A web page that could not be fetched (refused address, timeout, too large, bad status...)."""
