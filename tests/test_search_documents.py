"""Reading txt/md/html/pdf files into located sections, and cutting them into chunks that fit the encoder."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hanlin.apps.search.chunking import chunk_document, estimate_tokens
from hanlin.apps.search.documents import Document, Section, document_from_html, markdown_sections, read_document
from hanlin.apps.search.errors import CorruptFileError, UnsupportedFileError
from hanlin.apps.search.text_encoding import decode_text


def make_pdf(pages: list[str], *, title: str | None = None) -> bytes:
    """A minimal PDF with one Helvetica text stream per page (one line per "\\n")."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {len(pages)} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for page_id, text in zip(page_ids, pages):
        stream = ("BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({escape(line)}) Tj T*" for line in text.split("\n"))
                  + " ET").encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {page_id + 1} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info = b""
    if title:
        objects.append(f"<< /Title ({escape(title)}) >>".encode())
        info = b" /Info %d 0 R" % len(objects)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, info, xref)
    return bytes(out)


# --- encodings -------------------------------------------------------------------------------------

CHINESE = "大熊猫是中国特有的哺乳动物，主要生活在四川的山区。"


@pytest.mark.parametrize("encoded", [
    CHINESE.encode("utf-8"), b"\xef\xbb\xbf" + CHINESE.encode("utf-8"), CHINESE.encode("gb18030"),
    CHINESE.encode("utf-16"),
], ids=["utf-8", "utf-8-bom", "gb18030", "utf-16-bom"])
def test_chinese_text_survives_its_encoding(encoded: bytes) -> None:
    assert decode_text(encoded) == CHINESE


def test_latin1_text_is_not_mistaken_for_chinese() -> None:
    text = "Café crème, naïve façade — déjà vu."
    assert decode_text(text.encode("cp1252")) == text


def test_txt_file_keeps_its_name_as_title(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst line.\nSecond line.\n")
    doc = read_document(path)
    assert (doc.kind, doc.title, doc.source) == ("txt", "notes.txt", str(path))
    assert doc.sections == [Section("First line.\nSecond line.\n", "", 1)]
    assert doc.mtime == path.stat().st_mtime


# --- markdown and html -----------------------------------------------------------------------------

MARKDOWN = """---
title: "Field Guide"
---
Intro before any heading.

# Birds

Birds have feathers.

## Owls
Owls hunt at night.

```python
# not a heading inside a code fence
```

Setext heading
--------------
Under a setext heading.

# Insects
Insects have six legs.
"""


def test_markdown_sections_follow_the_heading_path(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    doc = read_document(path)
    assert doc.title == "Field Guide"  # front matter beats the first heading
    locations = [section.location for section in doc.sections]
    assert locations == ["", "Birds", "Birds › Owls", "Birds › Setext heading", "Insects"]
    owls = doc.sections[2]
    assert owls.text.startswith("Owls\n\nOwls hunt at night.") and "# not a heading" in owls.text
    assert MARKDOWN.splitlines()[owls.first_line - 1] == "## Owls"


def test_markdown_title_falls_back_to_first_h1_then_file_name(tmp_path: Path) -> None:
    (tmp_path / "a.markdown").write_text("intro\n\n# The *Real* Title\ntext\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("no headings here\n", encoding="utf-8")
    assert read_document(tmp_path / "a.markdown").title == "The Real Title"
    assert read_document(tmp_path / "b.md").title == "b.md"


def test_a_heading_without_text_makes_no_section() -> None:
    title, sections = markdown_sections("# Volcanoes\n\n## Eruptions\nMagma rises.\n\n## Empty\n\n")
    assert title == "Volcanoes"
    assert sections == [Section("Eruptions\n\nMagma rises.", "Volcanoes › Eruptions", 3)]


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>Volcano Facts – Example Site</title></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article><h1>Volcanoes</h1>
<p>A volcano is an opening in the crust of a planet through which molten rock, ash and gases escape.</p>
<h2>Eruptions</h2><p>Eruptions happen when pressure from dissolved gases in the magma becomes too great for the rock above.</p>
<h2>火山分布</h2><p>世界上大部分活火山分布在环太平洋火山带上，日本和印度尼西亚都有很多火山。</p>
</article><script>var tracking = "do not index this";</script><footer>© 2026 Example</footer></body></html>"""


def test_html_main_text_is_split_by_headings(tmp_path: Path) -> None:
    path = tmp_path / "volcano.html"
    path.write_text(HTML, encoding="utf-8")
    doc = read_document(path)
    assert doc.kind == "html" and doc.title in ("Volcanoes", "Volcano Facts – Example Site")
    text = doc.text
    assert "molten rock" in text and "环太平洋火山带" in text and "tracking" not in text
    locations = {section.location for section in doc.sections}
    assert {"Volcanoes › Eruptions", "Volcanoes › 火山分布"} <= locations


def test_document_from_html_for_web_pages_and_tiny_pages() -> None:
    doc = document_from_html(HTML, "https://example.org/volcano", kind="web", mtime=5.0)
    assert (doc.kind, doc.source, doc.mtime) == ("web", "https://example.org/volcano", 5.0)
    tiny = document_from_html("<html><body><p>Just one line.</p></body></html>", "https://example.org/docs/tiny.html")
    assert tiny.title == "tiny.html" and "Just one line." in tiny.text
    empty = document_from_html("", "https://example.org/")
    assert empty.sections == [] and empty.title == "example.org"


# --- pdf -----------------------------------------------------------------------------------------

def test_pdf_has_one_section_per_page_with_text(tmp_path: Path) -> None:
    path = tmp_path / "earth.pdf"
    path.write_bytes(make_pdf(["Volcanoes erupt lava (molten rock).", "", "Glaciers carve valleys."], title="Earth Forces"))
    doc = read_document(path)
    assert (doc.kind, doc.title) == ("pdf", "Earth Forces")
    assert [(s.location, s.text) for s in doc.sections] == [
        ("page 1", "Volcanoes erupt lava (molten rock)."), ("page 3", "Glaciers carve valleys.")]


def test_broken_and_encrypted_pdfs_are_corrupt(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    data = make_pdf(["Secret plans."])
    (tmp_path / "truncated.pdf").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pdf").write_bytes(b"this is not a pdf at all")
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    (tmp_path / "locked.pdf").write_bytes(buffer.getvalue())
    for name in ("truncated.pdf", "garbage.pdf"):
        with pytest.raises(CorruptFileError, match="unreadable PDF"):
            read_document(tmp_path / name)
    with pytest.raises(CorruptFileError, match="encrypted"):
        read_document(tmp_path / "locked.pdf")
    owner_only = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    owner_only.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")  # opens without a password
    buffer = io.BytesIO()
    owner_only.write(buffer)
    (tmp_path / "restricted.pdf").write_bytes(buffer.getvalue())
    assert read_document(tmp_path / "restricted.pdf").sections[0].text == "Secret plans."
    (tmp_path / "blank.pdf").write_bytes(make_pdf([""]))
    with pytest.raises(CorruptFileError, match="no extractable text"):
        read_document(tmp_path / "blank.pdf")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(UnsupportedFileError, match="'.png'"):
        read_document(tmp_path / "photo.png")


# --- chunking ------------------------------------------------------------------------------------

def _english_paragraphs(count: int) -> str:
    sentences = [f"Sentence {n} of paragraph {p} talks about topic{p} with several ordinary words in it."
                 for p in range(count) for n in range(6)]
    return "\n\n".join(" ".join(sentences[p * 6:(p + 1) * 6]).replace(". ", ".\n", 2) for p in range(count))


def test_txt_chunks_fit_the_encoder_and_report_line_ranges() -> None:
    text = _english_paragraphs(12)
    doc = Document("/x.txt", "x.txt", "txt", 0.0, [Section(text, "", 1)])
    chunks = chunk_document(doc, size=120, overlap=20)
    assert len(chunks) > 3 and [c.ordinal for c in chunks] == list(range(len(chunks)))
    lines = text.splitlines()
    for chunk in chunks:
        assert estimate_tokens(chunk.text) <= 120
        first, last = (int(n) for n in chunk.location.removeprefix("lines ").split("–"))
        window = " ".join(lines[first - 1:last])
        first_sentence = chunk.text.split(".")[0]
        assert first_sentence in window and chunk.text.rstrip(".").split(".")[-1].strip() in window
    assert all("topic0" not in c.text for c in chunks[2:])  # chunks move through the text
    joined = " ".join(c.text for c in chunks)
    assert all(f"Sentence 5 of paragraph {p} " in joined for p in range(12))  # nothing lost


def test_chunks_prefer_paragraph_boundaries_and_overlap_little() -> None:
    paragraphs = [" ".join(f"Para{p} sentence {n} is here." for n in range(8)) for p in range(6)]
    doc = Document("/y.txt", "y.txt", "txt", 0.0, [Section("\n\n".join(paragraphs), "", 1)])
    chunks = chunk_document(doc, size=100, overlap=10)
    # a paragraph (~56 tokens) fits whole but two do not: one paragraph per chunk, led by the previous
    # chunk's last sentence (7 tokens, within the overlap)
    assert chunks[0].text == paragraphs[0]
    for p, chunk in enumerate(chunks[1:], start=1):
        assert chunk.text == f"Para{p - 1} sentence 7 is here.\n\n" + paragraphs[p]
        assert chunk.location == f"lines {2 * p - 1}–{2 * p + 1}"
    assert len(chunks) == 6


def test_chinese_is_cut_at_chinese_sentence_ends() -> None:
    sentence = "量子计算机使用量子比特进行计算，量子比特可以处于叠加态。"
    text = "".join(f"第{n}段。" + sentence * 3 + "\n\n" for n in range(8))
    doc = Document("/z.md", "z", "md", 0.0, [Section(text, "量子")])
    chunks = chunk_document(doc)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert chunk.text.endswith("。") and estimate_tokens(chunk.text) <= 220
        assert chunk.location == "量子"
        assert " " not in chunk.text.replace("\n\n", "")  # no spaces put between Chinese characters


def test_md_chunks_stay_in_their_section_and_pdf_chunks_span_pages() -> None:
    md = Document("/a.md", "a", "md", 0.0, [Section("Alpha one. Alpha two.", "A"), Section("Beta one.", "A › B")])
    assert [(c.text, c.location) for c in chunk_document(md)] == [("Alpha one. Alpha two.", "A"), ("Beta one.", "A › B")]
    pdf = Document("/a.pdf", "a", "pdf", 0.0, [Section("Short page one.", "page 1"), Section("Short page two.", "page 2")])
    assert [(c.text, c.location) for c in chunk_document(pdf)] == [("Short page one.\n\nShort page two.", "pages 1–2")]


def test_overlong_sentence_and_unbroken_text_are_split() -> None:
    words = " ".join(f"word{n}" for n in range(600))
    cjk = "汉" * 700
    doc = Document("/b.txt", "b", "txt", 0.0, [Section(words + "\n\n" + cjk, "", 1)])
    chunks = chunk_document(doc, size=100)
    assert all(estimate_tokens(c.text) <= 100 for c in chunks)
    assert "".join(c.text for c in chunks).count("汉") >= 700
