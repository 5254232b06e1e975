"""`spu_peft.integrity`'s file and folder steps, one at a time: what `seal_file` writes, what `replace_folder` carries
over and how (links kept, files hard-linked), and which leftovers `recover_folder` removes."""

import hashlib
import logging
import os
import re
import secrets
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spu_peft.integrity import (
    DIGEST_KEY,
    SPUAdapterFileError,
    atomic_write_text,
    check_regular_file,
    digest_entry,
    digest_problem,
    read_adapter_file,
    read_safetensors,
    recover_folder,
    replace_folder,
    replacing,
    save_pretrained_atomically,
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
    expected = (
        f"{path}: the tensors do not match the digest recorded in its header when it was saved; the file was altered "
        "or damaged. Save the adapter again, or restore the file from a copy."
    )
    with pytest.raises(SPUAdapterFileError, match=f"^{re.escape(expected)}$"):
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


# Each refusal below is matched as a whole message: the path it names, what it found, and the fix it gives.
SAVE_AGAIN = "Save the adapter again, or restore the file from a copy."
NOT_REGULAR = (
    "; SPU reads adapters only from regular files. Put the file there that `save_pretrained` wrote, or save the "
    "adapter again."
)


def refusal(call, *args) -> SPUAdapterFileError:
    with pytest.raises(SPUAdapterFileError) as error:
        call(*args)
    assert type(error.value) is SPUAdapterFileError and isinstance(error.value, ValueError)
    return error.value


def checked(tmp_path, make, what):
    """The path `make` puts in place and `check_regular_file`'s refusal of it (with the default `what` for None)."""
    path = tmp_path / "adapter_model.safetensors"
    make(path)
    return path, refusal(check_regular_file, *([path] if what is None else [path, what]))


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (lambda path: None, ": No such file or directory. "),
        (
            lambda path: path.symlink_to(path.parent / "nowhere"),
            " (a symlink whose target is missing or loops): No such file or directory. ",
        ),
        (
            lambda path: path.symlink_to(path),
            " (a symlink whose target is missing or loops): Too many levels of symbolic links. ",
        ),
    ],
    ids=["missing", "dangling-symlink", "symlink-loop"],
)
@pytest.mark.parametrize("what", [None, "safetensors file"])
def test_a_path_that_cannot_be_read_is_refused_naming_it_and_why(tmp_path, make, found, what):
    path, error = checked(tmp_path, make, what)
    assert str(error) == f"{path}: the {what or 'file'} cannot be read{found}{SAVE_AGAIN}"
    assert isinstance(error.__cause__, OSError) and error.__cause__.filename == str(path)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda path: path.mkdir(), "a folder"),
        (lambda path: os.mkfifo(path), "a FIFO"),
        (lambda path: path.symlink_to(os.devnull), "not a regular file"),
    ],
    ids=["folder", "fifo", "device"],
)
@pytest.mark.parametrize("what", [None, "safetensors file"])
def test_a_path_that_is_not_a_regular_file_is_refused_saying_what_it_is(tmp_path, make, kind, what):
    path, error = checked(tmp_path, make, what)
    assert str(error) == f"{path}: the {what or 'file'} is {kind}{NOT_REGULAR}" and error.__cause__ is None


def test_a_regular_file_or_a_link_to_one_passes(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "link").symlink_to("file")
    assert check_regular_file(tmp_path / "file") is None and check_regular_file(str(tmp_path / "link")) is None


def test_read_safetensors_gives_every_tensor_and_the_header(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(TENSORS, path, metadata={"note": "kept", "format": "pt"})
    tensors, header = read_safetensors(str(path))
    assert header == {"note": "kept", "format": "pt"} and tensors.keys() == TENSORS.keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in TENSORS.items())
    save_file(TENSORS, path)  # no header at all
    assert read_safetensors(path)[1] == {}


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"not safetensors at all"])
def test_a_file_safetensors_cannot_read_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "a.safetensors"
    path.write_bytes(content)
    for read in (read_safetensors, read_adapter_file, seal_file):
        error = refusal(read, path)
        cause = error.__cause__
        assert cause is not None and str(error) == (
            f"{path}: not a readable safetensors file ({cause}); it is truncated or damaged. {SAVE_AGAIN}"
        )
    assert path.read_bytes() == content


def test_read_safetensors_checks_the_path_first_naming_a_safetensors_file(tmp_path):
    error = refusal(read_safetensors, tmp_path / "a.safetensors")
    assert str(error).startswith(f"{tmp_path / 'a.safetensors'}: the safetensors file cannot be read: ")


def sealed(tensors):
    return {**tensors, DIGEST_KEY: digest_entry(tensors)}


NO_DIGEST = (
    f"carries no SPU digest (a `{DIGEST_KEY}` tensor), so SPU cannot tell whether it was altered. It was edited, "
    "written by another tool, or saved by an earlier spu-peft. Save the adapter again with `save_pretrained` or "
    "`spu_peft.save_adapter`; for a file you trust, `spu_peft.integrity.seal_file(path)` records its digest."
)
MISMATCH = (
    "the tensors do not match the digest recorded when the adapter was saved; the file was altered or damaged after "
    f"saving. {SAVE_AGAIN}"
)


def test_the_digest_entry_is_the_sha256_of_the_tensors_as_32_bytes():
    entry = digest_entry(TENSORS)
    assert entry.dtype == torch.uint8 and entry.shape == (32,)
    assert bytes(entry.tolist()).hex() == tensor_digest(TENSORS)
    expected = hashlib.sha256()
    for key in sorted(TENSORS):
        value = TENSORS[key]
        expected.update(f"{key}\0{value.dtype}\0{tuple(value.shape)}\0".encode() + value.numpy().tobytes())
    assert tensor_digest(TENSORS) == expected.hexdigest()


def test_digest_problem_is_none_for_a_matching_entry_of_any_shape():
    assert digest_problem(sealed(TENSORS)) is None
    assert digest_problem({**TENSORS, DIGEST_KEY: digest_entry(TENSORS).reshape(4, 8)}) is None
    assert digest_problem(sealed({})) is None


@pytest.mark.parametrize(
    "state",
    [
        {**TENSORS, DIGEST_KEY: digest_entry(TENSORS).to(torch.int16)},  # the same numbers, another dtype
        {**TENSORS, DIGEST_KEY: digest_entry(TENSORS).to(torch.int8)},
        {**TENSORS, DIGEST_KEY: digest_entry({})},
        {**sealed(TENSORS), "base_model.model.c": torch.zeros(1)},
        {**sealed(TENSORS), "base_model.model.a": TENSORS["base_model.model.a"].flip(0)},
    ],
    ids=["int16", "int8", "of-nothing", "one-more-tensor", "changed-values"],
)
def test_digest_problem_names_a_mismatch(state):
    assert digest_problem(state) == MISMATCH


def test_digest_problem_names_a_missing_entry():
    assert digest_problem(TENSORS) == NO_DIGEST and digest_problem({}) == NO_DIGEST


def test_read_adapter_file_gives_every_tensor_of_an_intact_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(sealed(TENSORS), path, metadata={DIGEST_KEY: "a header digest next to the tensor is ignored"})
    tensors = read_adapter_file(str(path))
    assert tensors.keys() == {*TENSORS, DIGEST_KEY} and torch.equal(tensors[DIGEST_KEY], digest_entry(TENSORS))
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in TENSORS.items())


@pytest.mark.parametrize(
    ("state", "header", "message"),
    [
        (TENSORS, None, NO_DIGEST),
        (TENSORS, {"format": "pt"}, NO_DIGEST),
        ({**TENSORS, DIGEST_KEY: digest_entry({})}, None, MISMATCH),
        (
            TENSORS,
            {DIGEST_KEY: "0" * 64},
            "saved by an earlier spu-peft, which kept the digest in the safetensors header. "
            "`spu_peft.integrity.seal_file(path)` checks that digest and records it where this version looks for it "
            "(a tensor); or save the adapter again.",
        ),
        (
            sealed({**TENSORS, "z": torch.ones(1), "base_model.y": torch.ones(1)}),
            None,
            "2 tensor(s) not under `base_model.model.` (e.g. `base_model.y`), where PEFT saves an adapter's tensors; "
            "the file was written by another tool. Save the adapter again with `save_pretrained`.",
        ),
        (
            sealed({"a": torch.ones(1)}),
            None,
            "1 tensor(s) not under `base_model.model.` (e.g. `a`), where PEFT saves an adapter's tensors; the file "
            "was written by another tool. Save the adapter again with `save_pretrained`.",
        ),
    ],
    ids=["no-digest", "no-digest-with-header", "mismatch", "header-digest", "two-unprefixed", "one-unprefixed"],
)
def test_read_adapter_file_refuses_naming_the_file_and_the_fix(tmp_path, state, header, message):
    path = tmp_path / "a.safetensors"
    save_file(state, path, metadata=header)
    assert str(refusal(read_adapter_file, path)) == f"{path}: {message}"


def test_read_adapter_file_takes_a_digest_only_tensor(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(sealed({}), path)
    assert read_adapter_file(path).keys() == {DIGEST_KEY}


def test_replacing_writes_beside_the_target_with_its_suffix_and_renames_it_over(tmp_path):
    target = tmp_path / "new" / "plot.png"
    with replacing(target) as tmp:
        assert re.fullmatch(rf"{re.escape(str(target.parent))}/\.plot\.png\.[0-9a-f]{{16}}\.tmp\.png", tmp)
        assert os.path.isfile(tmp) and os.stat(tmp).st_size == 0 and not target.exists()
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["plot.png"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_replaced_file_gets_the_mode_open_gives_it(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}" and stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == (
        0o666 & ~umask
    )


def test_an_error_while_replacing_keeps_the_target_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="^stop$"), replacing(target) as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("stop")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def record_renames(monkeypatch):
    """The (source, destination) names of every `os.replace`, which still happens."""
    renames, real = [], os.replace

    def replace(source, destination):
        renames.append((Path(source).name, Path(destination).name))
        real(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    return renames


def test_replace_folder_moves_the_old_folder_aside_under_the_staging_name(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    staging = staging_folder(target)
    renames = record_renames(monkeypatch)
    replace_folder(staging, target)
    old = staging.name.removesuffix(".saving") + ".old"
    assert renames == [("adapter", old), (staging.name, "adapter")]
    assert os.listdir(tmp_path) == ["adapter"] and os.listdir(target) == []


@pytest.mark.parametrize(
    "name", [".adapter.1.tok.saving", f".adapter.{os.getpid()}.tok.tmp", f".other.{os.getpid()}.tok.saving", "mine"]
)
def test_a_staging_folder_replace_folder_did_not_make_gets_an_old_folder_of_its_own(tmp_path, monkeypatch, name):
    target = old_folder(tmp_path)
    staging = tmp_path / name
    staging.mkdir()
    (staging / "f").write_text("new")
    renames = record_renames(monkeypatch)
    replace_folder(staging, target)
    assert len(renames) == 2 and renames[0][0] == "adapter" and renames[1] == (name, "adapter")
    assert re.fullmatch(rf"\.adapter\.{os.getpid()}\.[0-9a-f]{{12}}\.old", renames[0][1]), renames
    assert os.listdir(tmp_path) == ["adapter"] and os.listdir(target) == ["f"]


def test_replace_folder_replaces_a_dangling_link_and_carries_over_links_that_lead_nowhere(tmp_path):
    (tmp_path / "adapter").symlink_to(tmp_path / "gone")
    staging = staging_folder(tmp_path / "adapter")
    replace_folder(staging, tmp_path / "adapter")
    assert (tmp_path / "adapter").is_dir() and not (tmp_path / "adapter").is_symlink()
    assert os.listdir(tmp_path) == ["adapter"]
    os.symlink("nowhere", tmp_path / "adapter" / "dangling")
    staging = staging_folder(tmp_path / "adapter")
    replace_folder(staging, tmp_path / "adapter", keep=["dangling"])
    assert os.readlink(tmp_path / "adapter" / "dangling") == "nowhere" and os.listdir(tmp_path) == ["adapter"]


def test_a_kept_entry_the_new_folder_has_stays_the_new_one(tmp_path):
    target = old_folder(tmp_path)
    staging = staging_folder(target)
    (staging / "sub").mkdir()
    (staging / "link").write_text("new file")
    replace_folder(staging, target, keep=["sub", "link"])
    assert os.listdir(target / "sub") == [] and (target / "link").read_text() == "new file"
    assert not (target / "link").is_symlink()


def test_replace_folder_syncs_every_staged_file_and_the_parent_folder(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    staging = staging_folder(target)
    (staging / "deeper" / "still").mkdir(parents=True)
    (staging / "deeper" / "still" / "f").write_text("f")
    (staging / "top").write_text("t")
    os.symlink("top", staging / "to-top")
    synced, real = [], os.fsync

    def fsync(handle):
        synced.append(os.readlink(f"/proc/self/fd/{handle}"))
        real(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_folder(staging, target, keep=["kept.txt", "sub"])
    files = [str(staging / "deeper" / "still" / "f"), str(staging / "kept.txt"), str(staging / "sub" / "deep.txt")]
    assert sorted(synced[:-1]) == sorted([*files, str(staging / "top")]) and synced[-1] == str(tmp_path)


def test_a_folder_sync_the_file_system_refuses_leaves_the_swap_done(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    staging = staging_folder(target)
    (staging / "f").write_text("new")
    real = os.fsync

    def fsync(handle):
        if os.path.isdir(f"/proc/self/fd/{handle}"):
            raise OSError("cannot sync a folder here")
        real(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_folder(staging, target)
    assert os.listdir(tmp_path) == ["adapter"] and os.listdir(target) == ["f"]


def test_a_failed_swap_into_a_new_place_raises_its_own_error_and_moves_nothing(tmp_path, monkeypatch):
    staging = staging_folder(tmp_path / "adapter")
    (staging / "f").write_text("new")

    def refuse(source, destination):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="^disk gone$"):
        replace_folder(staging, tmp_path / "adapter")
    assert os.listdir(tmp_path) == [staging.name]


def test_recover_folder_of_a_target_whose_parent_is_missing_does_nothing(tmp_path):
    assert recover_folder(tmp_path / "no" / "adapter") is None and os.listdir(tmp_path) == []


def test_recover_puts_back_the_old_folder_when_a_kill_came_before_the_new_one_was_staged(tmp_path, caplog):
    (tmp_path / ".adapter.99999991.tok.old").mkdir()
    (tmp_path / ".adapter.99999991.tok.old" / "old.txt").write_text("old")
    with caplog.at_level(logging.INFO, logger="spu_peft.integrity"):
        recover_folder(tmp_path / "adapter")
    assert os.listdir(tmp_path) == ["adapter"] and (tmp_path / "adapter" / "old.txt").read_text() == "old"
    assert [r.getMessage() for r in caplog.records] == [f"completed the interrupted save of {tmp_path / 'adapter'}"]


def test_recover_completes_nothing_where_the_target_is_a_link_and_removes_dead_leftovers_of_any_kind(tmp_path, caplog):
    (tmp_path / "adapter").symlink_to("elsewhere")
    (tmp_path / ".adapter.99999991.tok.old").mkdir()
    (tmp_path / ".adapter.99999991.tok.saving").mkdir()
    (tmp_path / ".adapter.99999992.tok.saving").symlink_to("nowhere")
    (tmp_path / ".adapter.99999993.tok.old").write_text("a file")
    (tmp_path / ".adapter.99999994.tok.tmp").mkdir()  # not a swap's: kept
    with caplog.at_level(logging.INFO, logger="spu_peft.integrity"):
        recover_folder(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == [".adapter.99999994.tok.tmp", "adapter"]
    assert os.readlink(tmp_path / "adapter") == "elsewhere" and caplog.records == []


def test_recover_finds_the_leftovers_of_a_target_whose_name_is_a_pattern(tmp_path):
    (tmp_path / ".a[1].99999991.tok.saving").mkdir()
    (tmp_path / ".a1.99999991.tok.saving").mkdir()
    recover_folder(tmp_path / "a[1]")
    assert os.listdir(tmp_path) == [".a1.99999991.tok.saving"]


def test_a_writer_this_user_may_not_signal_is_taken_as_alive(tmp_path, monkeypatch):
    signalled = []

    def kill(pid, signal):
        signalled.append((pid, signal))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    (tmp_path / ".adapter.99999991.tok.saving").mkdir()
    (tmp_path / ".adapter.99999992.tok.old").mkdir()
    recover_folder(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == [".adapter.99999991.tok.saving", ".adapter.99999992.tok.old"]
    assert sorted(set(signalled)) == [(99999991, 0), (99999992, 0)]


def test_a_staging_folder_is_made_with_every_missing_parent_and_a_name_that_says_whose_it_is(tmp_path):
    umask = os.umask(0o027)
    try:
        staging = staging_folder(tmp_path / "a" / "b" / "adapter")
    finally:
        os.umask(umask)
    assert staging.parent == tmp_path / "a" / "b" and list(staging.iterdir()) == []
    assert re.fullmatch(rf"\.adapter\.{os.getpid()}\.[0-9a-f]{{12}}\.saving", staging.name), staging.name
    assert stat.S_IMODE(staging.stat().st_mode) == 0o750  # as mkdir makes folders, not mkdtemp's 0o700


def test_a_staging_name_taken_already_is_drawn_again(tmp_path, monkeypatch):
    tokens = iter(["taken0", "free00"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: f"{next(tokens)}{'0' * (2 * n - 6)}")
    (tmp_path / f".adapter.{os.getpid()}.taken0000000.saving").mkdir()
    staging = staging_folder(tmp_path / "adapter")
    assert staging.name == f".adapter.{os.getpid()}.free00000000.saving" and staging.is_dir()


def test_a_kept_folder_is_carried_over_with_its_links_as_links_and_its_files_hard_linked(tmp_path):
    target = old_folder(tmp_path)
    os.symlink("deep.txt", target / "sub" / "to-deep")
    os.symlink("nowhere", target / "sub" / "dangling")
    inode = (target / "sub" / "deep.txt").stat().st_ino
    staging = staging_folder(target)
    replace_folder(staging, target, keep=["sub"])
    assert sorted(os.listdir(target / "sub")) == ["dangling", "deep.txt", "to-deep"]
    assert (
        os.readlink(target / "sub" / "to-deep") == "deep.txt" and os.readlink(target / "sub" / "dangling") == "nowhere"
    )
    assert (target / "sub" / "deep.txt").stat().st_ino == inode


def test_a_kept_file_that_cannot_be_hard_linked_is_copied_with_its_times(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    os.utime(target / "kept.txt", (1_000_000, 1_000_000))
    os.utime(target / "sub" / "deep.txt", (2_000_000, 2_000_000))
    os.symlink("deep.txt", target / "sub" / "to-deep")  # a link is made again, not copied through
    os.symlink("nowhere", target / "sub" / "dangling")
    inode = (target / "kept.txt").stat().st_ino

    def refuse(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    staging = staging_folder(target)
    replace_folder(staging, target, keep=["kept.txt", "sub"])
    assert (target / "kept.txt").read_text() == "old kept" and (target / "kept.txt").stat().st_ino != inode
    assert (target / "kept.txt").stat().st_mtime == 1_000_000 and (target / "sub" / "deep.txt").read_text() == "deep"
    assert (target / "sub" / "deep.txt").stat().st_mtime == 2_000_000
    assert (
        os.readlink(target / "sub" / "to-deep") == "deep.txt" and os.readlink(target / "sub" / "dangling") == "nowhere"
    )


class Saver:
    """A model whose `save_pretrained` writes one file and records its arguments."""

    def __init__(self):
        self.calls = []

    def save_pretrained(self, folder, **kwargs):
        self.calls.append((Path(folder), kwargs))
        (Path(folder) / "adapter_config.json").write_text("{}")


def test_save_pretrained_atomically_passes_every_argument_and_keeps_the_users_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "adapter_config.json").write_text("old")
    model = Saver()
    save_pretrained_atomically(model, tmp_path / "out", selected_adapters=["a"], safe_serialization=True)
    [(folder, kwargs)] = model.calls
    assert kwargs == {"selected_adapters": ["a"], "safe_serialization": True}
    assert folder.parent == tmp_path and folder.name.endswith(".saving")
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(tmp_path / "out")) == [
        "adapter_config.json",
        "notes.txt",
    ]
    assert (tmp_path / "out" / "adapter_config.json").read_text() == "{}"
