"""PDF bytes → one Section per page with text (pypdf)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from hanlin.apps.search.documents import Section
from hanlin.apps.search.errors import CorruptFileError

logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf logs a warning per oddity in real-world files


def read_pdf_sections(data: bytes) -> tuple[list[Section], str]:
    """(sections "page N", metadata title); CorruptFileError for broken, encrypted or text-less PDFs."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _open_with_empty_password(reader):
            raise CorruptFileError("encrypted PDF (a password is needed to read it)")
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            if text:
                sections.append(Section(text, f"page {number}"))
        title = _metadata_title(reader)
    except CorruptFileError:
        raise
    except Exception as error:  # pypdf raises many types on malformed files; any of them means "cannot read"
        raise CorruptFileError(f"unreadable PDF ({type(error).__name__}: {error})") from error
    if not sections:
        raise CorruptFileError("no extractable text in the PDF (scanned images?)")
    return sections, title


def pdf_title(metadata_title: str, path: Path) -> str:
    return metadata_title or path.name


def _open_with_empty_password(reader) -> bool:
    try:
        return bool(reader.decrypt(""))
    except Exception:  # pypdf raises DependencyError for AES without a crypto package, among others
        return False


def _metadata_title(reader) -> str:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:
        return ""
    return " ".join(str(title).split()) if title else ""
