"""`hanlin index add|list|remove|stats|search` end to end on a real index file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_search_documents import make_pdf
from typer.testing import CliRunner

from hanlin.apps.search.errors import SearchError
from hanlin.cli import app

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "rivers.md").write_text("# Rivers\n\n## The Nile\nThe Nile flows north through Egypt into the "
                                      "Mediterranean Sea.\n\n## 长江\n长江是中国最长的河流，流经上海注入东海。\n", encoding="utf-8")
    (folder / "owls.txt").write_text("Owls hunt at night.\nTheir soft feathers make their flight silent.\n", encoding="utf-8")
    (folder / "moons.pdf").write_bytes(make_pdf(["Ganymede is the largest moon of Jupiter."], title="Moons"))
    (folder / "bad.pdf").write_bytes(b"%PDF-1.7 broken")
    (folder / "table.xlsx").write_bytes(b"PK")
    return folder


def invoke(*args: str, index: Path):
    result = CliRunner().invoke(app, ["index", *args], env={"HANLIN_INDEX": str(index), "COLUMNS": "200"})
    return result


def test_add_list_stats_search_remove(tmp_path: Path, docs: Path) -> None:
    index = tmp_path / "data" / "index.db"
    added = invoke("add", str(docs), index=index)
    assert added.exit_code == 0, added.output
    assert "3 added, 0 updated, 0 unchanged, 2 skipped" in added.stdout
    assert "MB/s" in added.stdout and str(index) in added.stdout
    assert "skipped" in added.stderr and "bad.pdf" in added.stderr and "table.xlsx" in added.stderr

    again = invoke("add", str(docs / "owls.txt"), index=index)
    assert "0 added, 0 updated, 1 unchanged, 0 skipped" in again.stdout

    listed = json.loads(invoke("list", "--json", index=index).stdout)
    assert sorted(Path(d["source"]).name for d in listed) == ["moons.pdf", "owls.txt", "rivers.md"]
    assert {d["title"] for d in listed} == {"Moons", "owls.txt", "Rivers"} and all(d["chunks"] >= 1 for d in listed)
    table = invoke("list", index=index).stdout
    assert "rivers.md" in table and "3 document(s)" in table

    stats = json.loads(invoke("stats", "--json", index=index).stdout)
    assert (stats["documents"], stats["embedding_model"], stats["dim"], stats["lexical"]) == (3, "all-MiniLM-L6-v2", 384, "jieba")
    assert stats["embedding_window"] == 128
    assert "all-MiniLM-L6-v2" in invoke("stats", index=index).stdout

    hits = json.loads(invoke("search", "which river ends in the Mediterranean", "-k", "2", "--json", index=index).stdout)
    assert Path(hits[0]["source"]).name == "rivers.md" and hits[0]["location"] == "Rivers › The Nile"
    shown = invoke("search", "长江流入哪里", "--mode", "bm25", index=index).stdout
    assert "1. Rivers" in shown and "Rivers › 长江" in shown and "注入东海" in shown
    dense = json.loads(invoke("search", "birds that fly without noise", "--mode", "dense", "-k", "1", "--json", index=index).stdout)
    assert Path(dense[0]["source"]).name == "owls.txt" and dense[0]["location"] == "lines 1–2"
    assert invoke("search", 'NEAR( "AND * OR', "--mode", "bm25", index=index).exit_code == 0

    removed = invoke("remove", str(docs / "owls.txt"), index=index)
    assert removed.exit_code == 0 and "1 document(s) removed" in removed.stdout
    assert len(json.loads(invoke("list", "--json", index=index).stdout)) == 2
    gone = invoke("remove", str(docs / "owls.txt"), index=index)
    assert isinstance(gone.exception, SearchError) and "not in the index" in str(gone.exception)


def test_commands_on_a_missing_index_say_how_to_create_it(tmp_path: Path) -> None:
    for args in (["list"], ["stats"], ["search", "x"], ["remove", "x"]):
        result = invoke(*args, index=tmp_path / "none.db")
        assert isinstance(result.exception, SearchError) and "hanlin index add PATH" in str(result.exception)
    assert not (tmp_path / "none.db").exists()


def test_user_errors_print_one_line(tmp_path: Path, docs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANLIN_")}
    env["HANLIN_INDEX"] = str(tmp_path / "index.db")
    command = [sys.executable, "-m", "hanlin.cli", "index"]
    missing = subprocess.run([*command, "add", str(docs), str(tmp_path / "nope"), str(tmp_path / "gone.md")],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0
    assert "no such file or folder" in missing.stderr and "nope" in missing.stderr and "gone.md" in missing.stderr
    empty = subprocess.run([*command, "search", "hello"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "no index at" in empty.stderr and "hanlin index add PATH" in empty.stderr
