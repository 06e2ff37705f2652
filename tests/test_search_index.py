"""SearchIndex on real SQLite files with the real MiniLM encoder: adding, re-adding, removing, BM25/dense/hybrid."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_search_documents import make_pdf

from hanlin.apps.search.documents import document_from_html
from hanlin.apps.search.errors import EmptyIndexError, SearchError
from hanlin.apps.search.hybrid import reciprocal_rank_fusion
from hanlin.apps.search.index import SearchIndex
from hanlin.apps.search.index_schema import EMBEDDING_WINDOW
from hanlin.apps.search.lexical import match_expression
from hanlin.embeddings import load_embedder

SMALL_CHUNKS = {"chunk_size": 70, "chunk_overlap": 10}  # several chunks per small test document

VOLCANOES_MD = """# Volcanoes

## How eruptions start
Magma rises because it is lighter than the solid rock around it. Gases dissolved in the magma, mostly water
vapour and carbon dioxide, come out of solution as the pressure drops, and the bubbles push the magma upward
until it breaks through the surface.

## Kinds of volcanoes
Shield volcanoes such as Mauna Loa are broad and gently sloping, built from runny basalt lava. Stratovolcanoes
such as Mount Fuji are steep cones made of alternating layers of ash and sticky lava, and their eruptions are
often explosive.

## Living near a volcano
Volcanic soil is very fertile, which is why farms crowd the slopes of active volcanoes. Observatories watch for
swelling ground, small earthquakes and gas emissions to warn people before an eruption.
"""

BREAD_TXT = """Baking bread at home

Yeast feeds on the sugars in flour and releases carbon dioxide, which gets trapped in the gluten network and
makes the dough rise. A slow first rise in a cool kitchen develops more flavour than a fast rise in a warm one.

Kneading stretches the gluten strands. Ten minutes by hand is usually enough; the dough is ready when it feels
smooth and springs back when pressed with a finger.

Preheat the oven to 230 degrees Celsius and put a tray of water on the bottom shelf: the steam keeps the crust
soft at first so the loaf can expand. A loaf is done when it sounds hollow when tapped underneath.
"""

CHESS_HTML = """<html><head><title>Chess openings for beginners</title></head><body>
<nav>Home · Lessons · Shop</nav>
<main><h1>Chess openings</h1>
<p>The opening is the first phase of a chess game. Good openings develop the knights and bishops quickly, fight
for the centre squares and get the king to safety by castling.</p>
<h2>The Italian Game</h2>
<p>After 1.e4 e5 2.Nf3 Nc6 3.Bc4 White aims the bishop at the weak f7 square. It is one of the oldest openings
and a favourite of club players.</p>
<h2>The Sicilian Defence</h2>
<p>Black answers 1.e4 with c5, an asymmetrical reply that leads to sharp, unbalanced positions. It scores better
for Black than any other answer to the king's pawn.</p>
</main><footer>Copyright Chess Club</footer></body></html>"""

PLANET_PAGES = [
    "Mars is the fourth planet from the Sun. Its red colour comes from iron oxide, rust, in the dust\n"
    "that covers its surface. Olympus Mons on Mars is the tallest volcano in the solar system.",
    "Jupiter is the largest planet. Ganymede, which orbits Jupiter, is the biggest moon in the solar system,\n"
    "even larger than the planet Mercury. Europa hides a salty ocean under its ice.",
]

PANDA_TXT = """大熊猫是中国特有的哺乳动物，主要生活在四川、陕西和甘肃的山区。它们的栖息地海拔通常在一千五百米到三千米之间，那里有茂密的竹林。

大熊猫的食物几乎全部是竹子，一只成年大熊猫每天要花十几个小时进食，吃掉十二到三十八公斤的竹子。虽然大熊猫属于食肉目，但它们的消化系统并不擅长消化纤维素。
"""

TEA_MD = """# 中国茶文化

## 起源
茶起源于中国西南地区，相传神农氏尝百草时发现了茶叶的解毒作用。唐代陆羽撰写的《茶经》是世界上第一部关于茶的专著。

## 冲泡方法
冲泡绿茶的水温不宜过高，一般在八十摄氏度左右，否则会烫伤嫩芽，使茶汤变得苦涩。乌龙茶和普洱茶则需要用接近沸腾的开水冲泡。
"""

GREAT_WALL_TXT = """今天人们看到的长城大多是明代修建的。明长城东起辽宁的虎山，西至甘肃的嘉峪关。

长城沿线设有烽火台。一旦发现敌情，守军白天燃烟、夜间举火，把警报迅速传递到远方。
"""


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "volcanoes.md").write_text(VOLCANOES_MD, encoding="utf-8")
    (folder / "bread.txt").write_text(BREAD_TXT, encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "chess.html").write_text(CHESS_HTML, encoding="utf-8")
    (folder / "sub" / "planets.pdf").write_bytes(make_pdf(PLANET_PAGES, title="The Planets"))
    return folder


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory, embedder):
    folder = write_corpus(tmp_path_factory.mktemp("corpus"))
    with SearchIndex(tmp_path_factory.mktemp("db") / "index.db", embedder=embedder, **SMALL_CHUNKS) as index:
        report = index.add([folder])
        assert not report.skipped and len(report.added) == 4
        yield index, folder


def fts_rows(index: SearchIndex) -> int:
    return sqlite3.connect(index.path).execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]


# --- adding, re-adding, removing -------------------------------------------------------------------

def test_add_skips_corrupt_and_unsupported_files_and_indexes_the_rest(tmp_path: Path, embedder) -> None:
    folder = write_corpus(tmp_path / "docs")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    (folder / "slides.pptx").write_bytes(b"PK\x03\x04")
    (folder / ".hidden.txt").write_text("never indexed", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    seen: list[str] = []
    with SearchIndex(tmp_path / "index.db", embedder=embedder) as index:
        report = index.add([folder], progress=seen.append)
        skipped = dict(report.skipped)
        assert set(skipped) == {str(folder / "broken.pdf"), str(folder / "slides.pptx"), str(folder / "empty.txt")}
        assert "PDF" in skipped[str(folder / "broken.pdf")] and "unsupported" in skipped[str(folder / "slides.pptx")]
        assert sorted(report.added) == sorted(str(p) for p in (folder / "volcanoes.md", folder / "bread.txt",
                                                               folder / "sub" / "chess.html", folder / "sub" / "planets.pdf"))
        assert report.chunks == index.chunk_count() == fts_rows(index) > 0
        assert report.bytes == sum((folder / name).stat().st_size for name in
                                   ("volcanoes.md", "bread.txt", "sub/chess.html", "sub/planets.pdf"))
        assert len(seen) == 7 and report.seconds > 0
        kinds = {info.source.rsplit("/", 1)[-1]: (info.kind, info.title) for info in index.documents()}
        assert kinds["planets.pdf"] == ("pdf", "The Planets") and kinds["bread.txt"] == ("txt", "bread.txt")
        stats = index.stats()
        assert (stats.documents, stats.chunks, stats.embedding_model, stats.dim, stats.lexical) == \
            (4, report.chunks, "all-MiniLM-L6-v2", 384, "jieba")
        assert stats.file_size > 0


def test_readd_skips_unchanged_and_replaces_changed_files(tmp_path: Path, embedder) -> None:
    folder = write_corpus(tmp_path / "docs")
    with SearchIndex(tmp_path / "index.db", embedder=embedder, **SMALL_CHUNKS) as index:
        first = index.add([folder])
        again = index.add([folder, folder / "bread.txt"])  # a file named twice is looked at once
        assert (again.added, again.updated, again.chunks) == ([], [], 0) and len(again.unchanged) == 4

        bread = folder / "bread.txt"
        os.utime(bread, (1, 1))  # touched, same content: stays unchanged (content hash)
        assert index.add([bread]).unchanged == [str(bread)]

        bread.write_text("Sourdough uses a wild starter instead of packaged yeast.\n", encoding="utf-8")
        changed = index.add([folder])
        assert changed.updated == [str(bread)] and len(changed.unchanged) == 3 and changed.chunks == 1
        assert index.chunk_count() == fts_rows(index) == first.chunks - _chunks_of(first, index, bread) + 1
        bread_chunks = [p for p in index.search("starter yeast", 10, mode="bm25") if p.source == str(bread)]
        assert [p.text for p in bread_chunks] == ["Sourdough uses a wild starter instead of packaged yeast."]
        assert not index.search("gluten kneading", 5, mode="bm25")  # the old text is gone from FTS too

        (folder / "sub" / "chess.html").unlink()
        assert index.add([folder / "bread.txt"]).removed == []  # only re-adding its folder notices a deletion
        synced = index.add([folder])
        assert synced.removed == [str(folder / "sub" / "chess.html")] and len(synced.unchanged) == 3
        assert index.chunk_count() == fts_rows(index)


def _chunks_of(first_report, index: SearchIndex, path: Path) -> int:
    # chunks the file had before it changed: all chunks minus the other three files' (unchanged) ones
    others = sum(info.chunks for info in index.documents() if info.source != str(path))
    return first_report.chunks - others


def test_remove_files_and_folders(tmp_path: Path, embedder) -> None:
    folder = write_corpus(tmp_path / "docs")
    with SearchIndex(tmp_path / "index.db", embedder=embedder) as index:
        index.add([folder])
        assert index.remove([folder / "bread.txt", tmp_path / "not-indexed.txt"]) == [str(folder / "bread.txt")]
        assert sorted(index.remove([folder / "sub"])) == [str(folder / "sub" / "chess.html"), str(folder / "sub" / "planets.pdf")]
        assert [info.source for info in index.documents()] == [str(folder / "volcanoes.md")]
        assert index.chunk_count() == fts_rows(index)
        assert all(p.source.endswith("volcanoes.md") for p in index.search("bread chess planets volcano", 5))


def test_missing_path_is_an_error_naming_it(tmp_path: Path, embedder) -> None:
    with SearchIndex(tmp_path / "index.db", embedder=embedder) as index:
        with pytest.raises(SearchError, match="no such file or folder: .*nope.txt"):
            index.add([tmp_path / "nope.txt"])


def test_add_documents_for_web_pages(embedder) -> None:
    page = document_from_html(CHESS_HTML, "https://chess.example/openings", kind="web")
    with SearchIndex(":memory:", embedder=embedder) as index:
        assert index.add_documents([page]) == index.chunk_count() > 0
        assert index.add_documents([page]) == index.chunk_count()  # the same source is replaced, not doubled
        top = index.search("Sicilian defence c5", 1)[0]
        assert (top.source, top.title) == ("https://chess.example/openings", "Chess openings")


# --- searching ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("question, source, location, phrase", [
    ("why does the dough get bigger", "bread.txt", "lines ", "makes the dough rise"),
    ("what makes magma come up to the surface", "volcanoes.md", "Volcanoes › How eruptions start", "bubbles push"),
    ("where do farmers like to grow crops near volcanoes", "volcanoes.md", "Volcanoes › Living near a volcano", "fertile"),
    ("most successful reply for black to e4", "chess.html", "Chess openings › The Sicilian Defence", "scores better"),
    ("which is the biggest moon", "planets.pdf", "page 2", "Ganymede"),
])
@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_mode_finds_the_passage_for_a_paraphrased_question(corpus_index, mode, question, source, location,
                                                                 phrase) -> None:
    index, _ = corpus_index
    top = index.search(question, 3, mode=mode)[0]
    assert top.source.endswith(source) and location in top.location and phrase in top.text, (mode, question, top)
    assert top.chunk_id is not None and top.score > 0 and top.title


def test_dense_finds_what_bm25_cannot(corpus_index) -> None:
    index, _ = corpus_index
    question = "satellite that exceeds a planet in size"  # no word in common with the Ganymede sentence but "planet"
    assert index.search(question, 1, mode="dense")[0].location == "page 2"
    assert index.search(question, 1, mode="hybrid")[0].location == "page 2"


def test_search_results_are_ranked_and_capped(corpus_index) -> None:
    index, _ = corpus_index
    for mode in ("bm25", "dense", "hybrid"):
        passages = index.search("volcano lava eruption", 4, mode=mode)
        assert 1 <= len(passages) <= 4
        assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
        assert len({p.chunk_id for p in passages}) == len(passages)


@pytest.mark.parametrize("query", ['"AND OR NEAR(', "*", '"', "NOT", "volcano*", "a:b", "(magma) AND",
                                   "col:text ^start", "''", "NEAR(magma gases, 2)", "-1 OR 1=1; DROP TABLE chunks"])
def test_fts5_syntax_in_queries_is_plain_text(corpus_index, query) -> None:
    index, _ = corpus_index
    for mode in ("bm25", "hybrid"):
        index.search(query, 3, mode=mode)  # never an FTS5 syntax error
    assert index.chunk_count() > 0


def test_searches_from_several_threads_while_another_connection_writes(corpus_index, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    index, folder = corpus_index
    (tmp_path / "extra.txt").write_text("Tides are caused by the Moon's gravity.", encoding="utf-8")
    with ThreadPoolExecutor(4) as pool:
        searches = [pool.submit(index.search, question, 2, mode=mode)
                    for question in ("magma", "chess opening", "oven", "moon") for mode in ("bm25", "dense", "hybrid")]
        with SearchIndex(index.path) as writer:
            writer.add([tmp_path / "extra.txt"])
        assert all(future.result() for future in searches)
    assert index.search("what causes tides", 1)[0].source == str(tmp_path / "extra.txt")
    with SearchIndex(index.path) as writer:
        writer.remove([tmp_path / "extra.txt"])


def test_match_expression_quotes_every_term() -> None:
    assert match_expression('magma" OR x*', "jieba") == '"magma" OR "x"'
    assert match_expression("the and of", "jieba") == '"the" OR "and" OR "of"'  # only stopwords: keep them
    assert match_expression("*()", "jieba") is None


def test_blank_query_and_bad_mode(corpus_index) -> None:
    index, _ = corpus_index
    with pytest.raises(SearchError, match="empty"):
        index.search("   ")
    with pytest.raises(SearchError, match="unknown search mode"):
        index.search("magma", mode="fuzzy")


def test_empty_index_says_how_to_fill_it(tmp_path: Path, embedder) -> None:
    with SearchIndex(tmp_path / "index.db", embedder=embedder) as index:
        with pytest.raises(EmptyIndexError, match="hanlin index add PATH"):
            index.search("anything")


def test_index_reopens_and_sees_other_connections_writes(tmp_path: Path, embedder) -> None:
    folder = write_corpus(tmp_path / "docs")
    path = tmp_path / "index.db"
    with SearchIndex(path, embedder=embedder) as reader, SearchIndex(path, embedder=embedder) as writer:
        writer.add([folder / "bread.txt"])
        assert reader.search("oven temperature", 1, mode="dense")[0].source == str(folder / "bread.txt")
        writer.add([folder / "volcanoes.md"])  # the reader's cached vector matrix must notice
        assert reader.search("stratovolcano ash cone", 1, mode="dense")[0].source == str(folder / "volcanoes.md")
    with SearchIndex(path) as reopened:  # the embedder loads lazily, by name
        assert reopened.stats().documents == 2
        assert reopened.search("yeast", 1)[0].source == str(folder / "bread.txt")


def test_index_refuses_another_embedding_model_or_lexical_mode(tmp_path: Path, embedder) -> None:
    path = tmp_path / "index.db"
    (tmp_path / "a.txt").write_text("Some text about rivers.", encoding="utf-8")
    with SearchIndex(path, embedder=embedder) as index:
        index.add([tmp_path / "a.txt"])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'other-encoder' WHERE key = 'embedding_model'")
    with SearchIndex(path, embedder=embedder) as index:
        with pytest.raises(SearchError, match="built with the embedding model other-encoder"):
            index.search("rivers")
        (tmp_path / "b.txt").write_text("More about lakes.", encoding="utf-8")
        with pytest.raises(SearchError, match="other-encoder"):
            index.add([tmp_path / "b.txt"])
    with pytest.raises(SearchError, match="lexical='jieba'"):
        SearchIndex(path, lexical="trigram")
    with pytest.raises(SearchError, match="unknown lexical mode"):
        SearchIndex(tmp_path / "new.db", lexical="bigram")


def test_vectors_embed_the_first_window_of_each_chunk(tmp_path: Path, embedder) -> None:
    """A chunk's vector is the encoder's embedding of its first EMBEDDING_WINDOW tokens (pinned in the
    file's meta); an index file from before that setting keeps embedding whole chunks."""
    words = " ".join(f"river{n} flows" for n in range(90))  # ~270 encoder tokens: one chunk, over the window
    (tmp_path / "long.txt").write_text(words, encoding="utf-8")
    with SearchIndex(tmp_path / "index.db", embedder=embedder, chunk_size=400) as index:
        index.add([tmp_path / "long.txt"])
        assert index.embedding_window == EMBEDDING_WINDOW
        text, blob = sqlite3.connect(index.path).execute("SELECT text, vector FROM chunks").fetchone()
    assert len(embedder.tokenize([text])[0]) > EMBEDDING_WINDOW
    stored = np.frombuffer(blob, dtype="<f4")
    np.testing.assert_allclose(stored, embedder.embed([text], max_tokens=EMBEDDING_WINDOW)[0], atol=1e-6)
    assert float(stored @ embedder.embed([text])[0]) < 0.999  # the window really changed the vector

    with sqlite3.connect(tmp_path / "index.db") as db:
        db.execute("DELETE FROM meta WHERE key = 'embedding_window'")
    with SearchIndex(tmp_path / "index.db", embedder=embedder) as old:
        assert old.embedding_window is None
        (tmp_path / "long.txt").write_text(words + " and ends.", encoding="utf-8")
        old.add([tmp_path / "long.txt"])
        text, blob = sqlite3.connect(old.path).execute("SELECT text, vector FROM chunks").fetchone()
    np.testing.assert_allclose(np.frombuffer(blob, dtype="<f4"), embedder.embed([text])[0], atol=1e-6)


def test_not_an_index_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SearchError):
        SearchIndex(path)


# --- Chinese -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["jieba", "trigram"])
def chinese_index(request, tmp_path_factory, embedder):
    folder = tmp_path_factory.mktemp("zh")
    (folder / "panda.txt").write_text(PANDA_TXT, encoding="utf-8")
    (folder / "tea.md").write_text(TEA_MD, encoding="utf-8")
    (folder / "greatwall.txt").write_text(GREAT_WALL_TXT, encoding="gb18030")  # a GBK-era file
    with SearchIndex(tmp_path_factory.mktemp("zhdb") / "zh.db", embedder=embedder, lexical=request.param) as index:
        assert not index.add([folder]).skipped
        yield index


@pytest.mark.parametrize("question, expected", [
    ("大熊猫一天要吃多少竹子？", "三十八公斤"),
    ("哪部书是第一部关于茶的专著？", "茶经"),
    ("泡绿茶应该用多少度的水", "八十摄氏度"),
    ("古代守军怎样传递警报？", "烽火台"),
    ("熊猫", "大熊猫"),  # two characters: shorter than a trigram
    ("茶", "茶"),  # one character
])
@pytest.mark.parametrize("mode", ["bm25", "hybrid"])
def test_chinese_questions_find_chinese_passages(chinese_index, mode, question, expected) -> None:
    top = chinese_index.search(question, 3, mode=mode)
    assert top and expected in top[0].text, (chinese_index.lexical, mode, question, top[:1])


def test_chinese_locations(chinese_index) -> None:
    top = chinese_index.search("冲泡绿茶的水温", 1)[0]
    assert top.source.endswith("tea.md") and top.location == "中国茶文化 › 冲泡方法" and top.title == "中国茶文化"
    wall = chinese_index.search("嘉峪关", 1)[0]
    assert wall.source.endswith("greatwall.txt") and wall.location.startswith("line")


# --- fusion --------------------------------------------------------------------------------------------

def test_reciprocal_rank_fusion() -> None:
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60)
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert [item for item, _ in reciprocal_rank_fusion([["a", "b"], ["b", "a"]], weights=[1.0, 0.0])] == ["a", "b"]
    assert reciprocal_rank_fusion([[], []]) == []
