"""`spu_peft.integrity`'s file and folder steps, one at a time: what `seal_file` writes, what `replace_folder` carries
over and how (links kept, files hard-linked), and which leftovers `recover_folder` removes."""

import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spu_peft.integrity import (
    DIGEST_KEY,
    SPUAdapterFileError,
    digest_entry,
    read_adapter_file,
    recover_folder,
    replace_folder,
    seal_file,
    staging_folder,
    tensor_digest,
)

TENSORS = {
    "base_model.model.a": torch.arange(6.0).reshape(2, 3),
    "base_model.model.b": torch.tensor([7], dtype=torch.int8),
}


def metadata(path):
    with safe_open(path, "pt") as file:
        return file.metadata()


def test_sealing_records_the_digest_of_the_other_tensors_and_keeps_the_header(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({**TENSORS, DIGEST_KEY: torch.zeros(32, dtype=torch.uint8)}, path, metadata={"note": "kept"})
    seal_file(path)
    sealed = read_adapter_file(path)
    assert sealed.keys() == {*TENSORS, DIGEST_KEY} and torch.equal(sealed[DIGEST_KEY], digest_entry(TENSORS))
    assert all(torch.equal(sealed[k], v) and sealed[k].dtype == v.dtype for k, v in TENSORS.items())
    assert metadata(path) == {"note": "kept", "format": "pt"}
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_a_header_digest_is_checked_then_moved_into_a_tensor(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(TENSORS, path, metadata={DIGEST_KEY: tensor_digest(TENSORS), "format": "pt"})
    seal_file(path)
    assert metadata(path) == {"format": "pt"}
    assert torch.equal(read_adapter_file(path)[DIGEST_KEY], digest_entry(TENSORS))


def test_a_header_digest_that_does_not_match_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(TENSORS, path, metadata={DIGEST_KEY: tensor_digest({"x": torch.ones(1)}), "format": "pt"})
    before = path.read_bytes()
    expected = f"{path}: the tensors do not match the digest recorded in its header when it was saved; the file was "
    with pytest.raises(SPUAdapterFileError, match=f"^{re.escape(expected)}"):
        seal_file(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def old_folder(tmp_path):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    (target / "kept.txt").write_text("old kept")
    (target / "sub" / "deep.txt").write_text("deep")
    (target / "replaced.txt").write_text("old replaced")
    (target / "dropped.txt").write_text("dropped")
    os.symlink("kept.txt", target / "link")
    return target


def test_replace_folder_carries_over_the_kept_entries_the_new_one_lacks(tmp_path):
    target = old_folder(tmp_path)
    kept_inode = (target / "kept.txt").stat().st_ino
    staging = staging_folder(target)
    assert staging.parent == tmp_path and staging.name.startswith(f".adapter.{os.getpid()}.")
    assert staging.name.endswith(".saving") and list(staging.iterdir()) == []
    (staging / "replaced.txt").write_text("new")
    replace_folder(staging, target, keep=["kept.txt", "sub", "link", "replaced.txt", "absent.txt"])
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert sorted(os.listdir(target)) == ["kept.txt", "link", "replaced.txt", "sub"]
    assert (target / "kept.txt").read_text() == "old kept" and (target / "kept.txt").stat().st_ino == kept_inode
    assert (target / "replaced.txt").read_text() == "new" and (target / "sub" / "deep.txt").read_text() == "deep"
    assert os.readlink(target / "link") == "kept.txt"


def test_replace_folder_into_a_new_place_moves_the_staging_folder(tmp_path):
    staging = staging_folder(tmp_path / "new" / "adapter")
    (staging / "f").write_text("x")
    replace_folder(staging, tmp_path / "new" / "adapter", keep=["f"])
    assert (
        sorted(os.listdir(tmp_path / "new")) == ["adapter"] and (tmp_path / "new" / "adapter" / "f").read_text() == "x"
    )


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    staging = staging_folder(target)
    real = os.replace

    def refuse_staging(source, destination):
        if str(source) == str(staging):
            raise OSError("disk gone")
        real(source, destination)

    monkeypatch.setattr(os, "replace", refuse_staging)
    with pytest.raises(OSError, match="disk gone"):
        replace_folder(staging, target)
    assert (target / "kept.txt").read_text() == "old kept"
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", staging.name])


@pytest.mark.parametrize("pid", [os.getpid(), 2**22 + 7])
def test_recover_removes_leftovers_no_living_writer_holds(tmp_path, pid):
    target = old_folder(tmp_path)
    for suffix in (".saving", ".old"):
        (tmp_path / f".adapter.{pid}.abc{suffix}").mkdir()
    (tmp_path / ".adapter.nopid.saving").mkdir()
    (tmp_path / ".other.1.saving").mkdir()
    recover_folder(target)
    assert sorted(os.listdir(tmp_path)) == [".other.1.saving", "adapter"]
    assert (target / "kept.txt").read_text() == "old kept"


def test_recover_keeps_what_a_living_writer_holds_and_completes_a_swap_cut_between_renames(tmp_path):
    (tmp_path / ".adapter.1.abc.saving").mkdir()  # process 1 always runs
    (tmp_path / ".adapter.99999991.tok.old").mkdir()
    (tmp_path / ".adapter.99999991.tok.saving").mkdir()
    (tmp_path / ".adapter.99999991.tok.saving" / "new.txt").write_text("new")
    recover_folder(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == [".adapter.1.abc.saving", "adapter"]
    assert os.listdir(tmp_path / "adapter") == ["new.txt"]
