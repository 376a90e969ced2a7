"""corpus: the one .txt rule, local files vs dataset names, hold-out, and clear errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from llamascope_sdk import corpus
from llamascope_sdk.base.errors import (
    DataFileNotFoundError,
    DataFormatError,
    DatasetStreamError,
    DataUnavailableError,
    TextFieldError,
)

WIKI = " = Alpha = \n\n a text \n\n = = Sub = = \n\n more \n\n = Beta = \n\n b text \n"


def test_txt_splits_at_headings_else_at_blank_lines(tmp_path: Path) -> None:
    assert [d.splitlines()[0].strip() for d in corpus.split_text(WIKI)] == ["= Alpha =", "= Beta ="]
    assert corpus.split_text("a\nb\n\n \nc\n\n\nd") == ["a\nb", "c", "d"]
    assert corpus.split_text("a\n\nb\n\nc", pack_chars=2) == ["a\n\nb", "c"]
    (tmp_path / "w.txt").write_text(WIKI)
    assert len(list(corpus.iter_documents(tmp_path / "w.txt"))) == 2


def test_names_local_files_and_comma_lists(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n\ny\n\nz\n\nw")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"j{i}"}) for i in range(4)))
    both = f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"
    assert corpus.local_paths("cerebras/SlimPajama-627B") is None
    assert corpus.local_paths(both) == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    assert corpus.local_documents(both, holdout_fraction=0.25) == ["x", "y", "z", "j0", "j1", "j2"]
    assert corpus.local_documents(both, holdout_fraction=0.25, heldout=True) == ["w", "j3"]
    assert list(corpus.iter_documents(both)) == ["x", "y", "z", "w", "j0", "j1", "j2", "j3"]


def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataFileNotFoundError, match="missing.txt") as info:
        list(corpus.iter_documents(str(tmp_path / "missing.txt")))
    assert isinstance(info.value, FileNotFoundError | DataUnavailableError)
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(DataFormatError, match=r"\.csv"):
        list(corpus.iter_documents(tmp_path / "a.csv"))
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(TextFieldError, match="'text'.*body"):
        list(corpus.iter_documents(tmp_path / "a.jsonl"))
    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"pip install 'llamascope-sdk\[train\]'"):
        list(corpus.iter_documents("someone/corpus"))


def test_offline_dataset_is_a_stream_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetStreamError, match="nobody/nothing.*local") as info:
        list(corpus.hub_documents("nobody/nothing"))
    assert isinstance(info.value, ConnectionError) and "HF_HUB_OFFLINE" in (info.value.hint or "")


# ---------------------------------------------------------------------------- streaming
def whole_file_rule(text: str, pack_chars: int | None = None) -> list[str]:
    """The .txt rule applied to the whole text at once (the pre-streaming implementation)."""
    import re

    heading = re.compile(r"^ ?= [^=].* = ?$")
    lines = text.splitlines()
    if sum(1 for ln in lines if heading.match(ln)) >= 2:
        docs: list[list[str]] = []
        for ln in lines:
            if heading.match(ln) or not docs:
                docs.append([])
            docs[-1].append(ln)
        return [d for d in ("\n".join(x).strip() for x in docs) if d]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not pack_chars:
        return paras
    out, cur, size = [], [], 0
    for p in paras:
        cur.append(p)
        size += len(p)
        if size >= pack_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    return out + (["\n\n".join(cur)] if cur else [])


@pytest.mark.parametrize("seed", range(40))
def test_streamed_txt_equals_the_whole_file_rule(tmp_path: Path, seed: int, monkeypatch) -> None:
    """Random files of headings, sub-headings, blank and whitespace lines, long lines read in
    parts (PIECE_CHARS shrunk to 12 characters, longer than the headings; multi-byte characters
    and CRLF line ends cut between parts): the streamed reader gives the whole-file rule's
    documents."""
    import random

    monkeypatch.setattr(corpus.textfile, "PIECE_CHARS", 12)
    rng = random.Random(seed)
    pieces = [" = T{} = ", " = = S = = ", "", "  ", "\t", "word", " two words here ", "x" * 30,
              "  indented  and long line of text  ", "naïve — 東京の夜 — ünïcödé, split mid-character"]
    weights = [1 if seed % 2 else 0, 1, 3, 1, 1, 4, 3, 1, 2, 2]
    lines = [rng.choices(pieces, weights)[0].format(rng.randint(0, 99)) for _ in range(rng.randint(0, 60))]
    text = "\n".join(lines) + rng.choice(["", "\n", "\n\n"])
    path = tmp_path / "c.txt"
    path.write_bytes((text.replace("\n", "\r\n") if seed % 3 == 0 else text).encode())
    for pack in (None, 25):
        assert corpus.file_documents(path, pack_chars=pack) == whole_file_rule(text, pack), pack
    assert corpus.split_text(text) == whole_file_rule(text)


def test_a_dropped_document_is_skipped_over(tmp_path: Path) -> None:
    """Documents are lazy: one left half-read does not leak into the next."""
    from llamascope_sdk.corpus.documents import document_pieces

    path = tmp_path / "c.txt"
    path.write_text("a1\na2\na3\n\nb1\nb2\n\n\nc1\n")
    got = []
    for doc in document_pieces(path, "train", "text", None, corpus.ReadCounts()):
        got.append(next(iter(doc)))
    assert got == ["a1", "b1", "c1"]


# ---------------------------------------------------------------------------- text values
def test_null_texts_are_skipped_and_counted_alike_in_jsonl_and_parquet(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": null}\n{"text": ""}\n"two"\n')
    pq.write_table(pa.table({"text": ["one", None, "", "two"]}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        counts = corpus.ReadCounts()
        assert list(corpus.iter_documents(tmp_path / name, counts=counts)) == ["one", "two"]
        assert counts.null_rows == 1
        assert f"corpus: skipped 1 row of {tmp_path / name} whose 'text' is null" in capsys.readouterr().err


@pytest.mark.parametrize(("row", "shown"), [("[1, 2]", "list ([1, 2])"), ("7", "int (7)"),
                                            ('{"a": 1}', "dict ({'a': 1})"), ("true", "bool (True)")])
def test_a_non_string_jsonl_text_is_refused_with_its_line(tmp_path: Path, row: str, shown: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": ' + row + '}\n')
    with pytest.raises(DataFormatError) as info:
        list(corpus.iter_documents(path))
    assert str(info.value) == (f"{path}:3: 'text' is {shown}, not a string; every text must be a "
                               "string (null rows are skipped)")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("column", "kind"), [([None, 5, 6], "int64"),
                                              ([None, b"\x00b", b"c"], "binary"),
                                              ([None, [1], [2]], "list<element: int64>")])
def test_a_non_string_parquet_column_is_refused_with_its_row(tmp_path: Path, column, kind) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": column}), path)
    with pytest.raises(DataFormatError) as info:
        list(corpus.iter_documents(path))
    assert str(info.value) == (f"{path}: row 2: column 'text' holds {kind}, not text; the text "
                               "column must hold strings (pass text_field=)")


def test_a_bad_json_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: not a JSON line"):
        list(corpus.iter_documents(path))


def test_a_non_string_dataset_row_is_refused_and_nulls_skipped(monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"text": "a"}, {"text": None},
                                                                   {"text": 3}])
    counts = corpus.ReadCounts()
    with pytest.raises(DataFormatError, match=r"^someone/c\[train\] row 2: 'text' is int \(3\)"):
        list(corpus.iter_documents("someone/c", counts=counts))
    assert counts.null_rows == 1


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b'"one"\n"two"\n"\xff\xfe"\n')
    with pytest.raises(DataFormatError) as info:
        list(corpus.iter_documents(path))
    assert str(info.value) == f"{path}: not UTF-8 text (line 3: invalid start byte)"


def test_a_file_that_is_not_parquet_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(DataFormatError, match=r"a\.parquet: not a readable Parquet file \("):
        list(corpus.iter_documents(path))


@pytest.mark.parametrize("command", [["inspect", "--sae", "demo"], ["eval", "demo"]])
def test_commands_check_the_corpus_before_loading_anything(tmp_path: Path, monkeypatch,
                                                           command: list[str]) -> None:
    from typer.testing import CliRunner

    from llamascope_sdk.cli import app
    from llamascope_sdk.loading import models, sae

    def no_load(*a, **k):
        raise AssertionError("loaded before the corpus was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(sae.SAE, "from_pretrained", no_load)
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "ok.txt").write_text("x\n")
    for dataset, message in [
        (f"{tmp_path / 'ok.txt'},{tmp_path / 'missing.txt'}",
         f"error: dataset file {tmp_path / 'missing.txt'} does not exist"),
        (str(tmp_path / "a.csv"), f"error: {tmp_path / 'a.csv'}: unsupported file type '.csv'; "
                                  "use .txt, .jsonl or .parquet, or a Hugging Face dataset name")]:
        extra = ["--out", str(tmp_path / "o")] if command[0] == "inspect" else []
        res = CliRunner().invoke(app, [*command, "--dataset", dataset, *extra])
        assert res.exit_code == 1, res.output
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")] == [message]
