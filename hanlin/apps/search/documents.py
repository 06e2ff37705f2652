"""Files and web pages → Documents: plain text split into located sections (page, heading path, lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hanlin.apps.search.errors import CorruptFileError, UnsupportedFileError
from hanlin.apps.search.text_encoding import decode_text

KIND_BY_SUFFIX = {
    ".txt": "txt", ".text": "txt",
    ".md": "md", ".markdown": "md",
    ".html": "html", ".htm": "html",
    ".pdf": "pdf",
}
SUPPORTED_SUFFIXES = tuple(KIND_BY_SUFFIX)
HEADING_SEPARATOR = " › "


@dataclass
class Section:
    """A run of text with one location: "page 3" (pdf), "Heading › Sub" (md/html), "" (txt)."""

    text: str
    location: str
    first_line: int = 1  # line in the source file where `text` starts (for txt line ranges)


@dataclass
class Document:
    source: str  # absolute path or URL
    title: str
    kind: str  # "txt" | "md" | "html" | "pdf" | "web"
    mtime: float
    sections: list[Section] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(section.text for section in self.sections)


def file_kind(path: Path) -> str:
    """The document kind of a file name; UnsupportedFileError for anything else."""
    kind = KIND_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        supported = ", ".join(sorted({suffix.lstrip(".") for suffix in KIND_BY_SUFFIX}))
        suffix = path.suffix or "(no extension)"
        raise UnsupportedFileError(f"unsupported file type {suffix!r} (supported: {supported})")
    return kind


def read_document(path: Path) -> Document:
    """Read a .txt, .md, .html or .pdf file; UnsupportedFileError / CorruptFileError otherwise."""
    path = Path(path)
    file_kind(path)
    try:
        data = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError as error:
        raise CorruptFileError(f"cannot read {path}: {error.strerror or error}") from error
    return parse_document(path, data, mtime=mtime)


def parse_document(path: Path, data: bytes, *, mtime: float) -> Document:
    """Parse file bytes already read (the index reads each file once, for hashing and parsing)."""
    kind = file_kind(path)
    source = str(path.absolute())
    if kind == "pdf":
        from hanlin.apps.search.pdf import read_pdf_sections, pdf_title

        sections, metadata_title = read_pdf_sections(data)
        return Document(source, pdf_title(metadata_title, path), "pdf", mtime, sections)
    text = decode_text(data)
    if kind == "html":
        return document_from_html(text, source, mtime=mtime, kind="html")
    if kind == "md":
        title, sections = markdown_sections(text)
        return Document(source, title or path.name, "md", mtime, sections)
    return Document(source, path.name, "txt", mtime, [Section(text, "", 1)] if text.strip() else [])


def document_from_html(html: str, source: str, *, mtime: float = 0.0, kind: str = "html") -> Document:
    """Main text of an HTML page (trafilatura), split into sections by its headings."""
    markdown, title = _extract_html(html)
    heading_title, sections = markdown_sections(markdown)
    title = title or heading_title or _html_title(html) or _name_from_source(source)
    return Document(source, title, kind, mtime, sections)


def _extract_html(html: str) -> tuple[str, str]:
    import trafilatura

    extracted = None
    if html.strip():
        try:
            extracted = trafilatura.bare_extraction(html, output_format="python", include_formatting=True,
                                                    include_tables=True, with_metadata=True, favor_recall=True)
        except Exception:  # trafilatura raises assorted lxml/parsing errors on broken markup
            extracted = None
    text = (getattr(extracted, "text", None) or "").strip()
    title = (getattr(extracted, "title", None) or "").strip()
    if not text:
        text = _plain_html_text(html)
    return text, title


def _plain_html_text(html: str) -> str:
    """Fallback for pages too small or odd for trafilatura: every visible text node."""
    import lxml.html

    try:
        root = lxml.html.fromstring(html)
    except Exception:
        return ""
    for element in root.xpath("//script|//style|//noscript|//template|//head"):
        element.drop_tree()
    lines = (" ".join(line.split()) for line in root.text_content().splitlines())
    return "\n".join(line for line in lines if line)


_TITLE_TAG = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _html_title(html: str) -> str:
    import html as html_lib

    match = _TITLE_TAG.search(html)
    return " ".join(html_lib.unescape(match.group(1)).split()) if match else ""


def _name_from_source(source: str) -> str:
    stripped = source.rstrip("/")
    return stripped.rsplit("/", 1)[-1] or source


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_FRONT_MATTER_TITLE = re.compile(r"^title:\s*[\"']?(.*?)[\"']?\s*$", re.IGNORECASE)


def markdown_sections(text: str) -> tuple[str, list[Section]]:
    """(title, sections): one section per heading, located by its heading path ("Title › Sub › Subsub")."""
    lines = text.splitlines()
    title, start = _front_matter_title(lines)
    path: list[tuple[int, str]] = []  # (level, heading) of the enclosing headings
    sections: list[Section] = []
    body: list[str] = []
    body_first_line = start + 1
    in_fence = False

    def flush() -> None:
        content = body[2:] if path and body[:2] == [path[-1][1], ""] else body  # a bare heading is no content
        if "\n".join(content).strip():
            location = HEADING_SEPARATOR.join(heading for _, heading in path)
            sections.append(Section("\n".join(body).strip("\n"), location, body_first_line))

    index = start
    while index < len(lines):
        line = lines[index]
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None
        if not in_fence:
            atx = _ATX_HEADING.match(line)
            if atx:
                heading = (len(atx.group(1)), atx.group(2).strip())
            elif (line.strip() and index + 1 < len(lines) and _SETEXT_UNDERLINE.match(lines[index + 1])
                  and not (body and body[-1].strip())):
                heading = (1 if lines[index + 1].strip().startswith("=") else 2, line.strip())
                index += 1
        if heading and heading[1]:
            flush()
            level, name = heading
            path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, _strip_inline_markdown(name))]
            if title is None and level == 1:
                title = path[-1][1]
            body = [path[-1][1], ""]  # the heading, as a paragraph of its own, belongs to the section's text
            body_first_line = index + 1
        else:
            if not body:
                body_first_line = index + 1
            body.append(line)
        index += 1
    flush()
    return title or "", sections


def _front_matter_title(lines: list[str]) -> tuple[str | None, int]:
    if not lines or lines[0].strip() != "---":
        return None, 0
    for index in range(1, min(len(lines), 200)):
        if lines[index].strip() in ("---", "..."):
            title = next((m.group(1) for line in lines[1:index] if (m := _FRONT_MATTER_TITLE.match(line))), None)
            return title or None, index + 1
    return None, 0


_INLINE_MARKUP = re.compile(r"\[([^\]]*)\]\([^)]*\)|[*_`]+")


def _strip_inline_markdown(text: str) -> str:
    return _INLINE_MARKUP.sub(lambda m: m.group(1) or "", text).strip()
