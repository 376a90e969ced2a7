"""corpus: the one .txt rule, local files vs dataset names, hold-out, and clear errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from llamascope_sdk import corpus
from llamascope_sdk.errors import (
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
