"""`writable_folder`: the path returned as given where a folder is or can be made, and each refusal's whole message."""

import os
import re
from pathlib import Path

import pytest

from spu_peft.folders import writable_folder


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh current folder reached without links (so that only the links a test makes are seen)."""
    monkeypatch.chdir(tmp_path.resolve())
    return tmp_path.resolve()


def refusal(path, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        writable_folder(path, "`out`")


@pytest.mark.parametrize("path", ["made", "made/a/b", Path("made/a"), "."])
def test_a_folder_or_a_path_under_one_comes_back_as_given_and_nothing_is_made(here, path):
    found = writable_folder(path, "`out`")
    assert type(found) is type(Path()) and found == Path(path)
    assert sorted(os.listdir(here)) == []


def test_an_existing_folder_and_a_link_to_one_come_back_as_given(here):
    (here / "disk").mkdir()
    os.symlink("disk", here / "latest")
    assert writable_folder("disk", "`out`") == Path("disk")
    assert writable_folder("latest/adapter", "`out`") == Path("latest/adapter")
    assert sorted(os.listdir(here)) == ["disk", "latest"] and os.listdir(here / "disk") == []


def test_an_empty_path_is_refused_naming_the_argument():
    refusal("", "`out` is empty; pass the folder to write in (it is created if needed).")


def test_a_file_at_the_path_or_above_it_is_refused_naming_the_part_in_the_way(here):
    (here / "notes").write_text("keep")
    refusal("notes", "`out` 'notes' is a file; pass a folder (it is created if needed).")
    refusal(
        "notes/a/b",
        "`out` 'notes/a/b' cannot be a folder: 'notes' is a file; pass a path under a folder, or move 'notes' away.",
    )
    assert (here / "notes").read_text() == "keep" and sorted(os.listdir(here)) == ["notes"]


def test_something_neither_file_nor_folder_is_refused_as_not_a_folder(here):
    os.mkfifo(here / "pipe")
    refusal("pipe", "`out` 'pipe' is not a folder; pass a folder (it is created if needed).")
    refusal(
        "pipe/a",
        "`out` 'pipe/a' cannot be a folder: 'pipe' is not a folder; pass a path under a folder, or move 'pipe' away.",
    )


def test_a_link_to_a_file_is_refused_naming_where_it_leads(here):
    (here / "notes").write_text("keep")
    os.symlink("notes", here / "latest")
    target = str(here / "notes")
    refusal(
        "latest", f"`out` 'latest' is a file (through a link, {target!r}); pass a folder (it is created if needed)."
    )
    refusal(
        "latest/a",
        f"`out` 'latest/a' cannot be a folder: 'latest' is a file (through a link, {target!r}); pass a path under a "
        "folder, or move 'latest' away.",
    )


def test_a_link_that_leads_nowhere_is_refused_naming_its_target(here):
    os.symlink("gone/adapter", here / "latest")
    refusal(
        "latest",
        "`out` 'latest' is a link to 'gone/adapter', which leads nowhere; create the folder it points to, or remove "
        "the link.",
    )
    refusal(
        "latest/a",
        "`out` 'latest/a' cannot be a folder: 'latest' is a link to 'gone/adapter', which leads nowhere; create the "
        "folder it points to, or remove the link.",
    )
    assert sorted(os.listdir(here)) == ["latest"]
