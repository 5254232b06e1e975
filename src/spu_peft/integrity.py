"""Files that say whether they are intact, and writes that readers see whole or not at all.

The one place in spu-peft that hashes tensors and replaces files or folders:

- `tensor_digest` / `hash_tensors`: SHA-256 over tensors' names, dtypes, shapes and bytes; a flipped byte, two
  swapped tensors or a rewritten dtype change it.
- `digest_entry` / `digest_problem`: an adapter's state dict carries the digest of its other tensors as one more
  tensor, `DIGEST_KEY`, which SPU's save hook adds, so PEFT writes it with the rest and no file is rewritten; only the
  embedding layers PEFT adds after that hook (`save_embedding_layers`) are covered by `cover_added_tensors`, which
  rewrites the file once.
- `read_adapter_file`: the tensors of an adapter file, refused with an `SPUAdapterFileError` naming the file unless
  it is a regular file, readable safetensors, and its tensors match their digest; `seal_file` records the digest of a
  file one trusts.
- `replacing` / `atomic_write_text`: a file written beside its target and renamed over it.
- `staging_folder` / `replace_folder` / `recover_folder`: a whole folder written beside its target and swapped in with
  renames; whatever stops a swap (an error, a kill), the next `recover_folder` leaves the old folder or the new one,
  and no staging copy.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .folders import writable_folder

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
# the prefix under which PEFT saves an adapter's tensors
PEFT_PREFIX = "base_model.model."
# the state dict entry (top level, outside every module) holding the digest of an adapter's other tensors
DIGEST_KEY = "spu_sha256"
# suffixes of the folders a swap leaves beside its target while it runs
_STAGING, _OLD = ".saving", ".old"


class SPUAdapterFileError(ValueError):
    """An SPU adapter file or folder that cannot be loaded as it is: damaged, edited, incomplete, or made for another
    model or config. The message names the file (or the module and field) and says what to do."""


def hash_tensors(digest: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Feed every tensor's name, dtype, shape and bytes, in name order, into the hashlib object `digest`."""
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in name order."""
    return hash_tensors(hashlib.sha256(), tensors).hexdigest()


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """Refuse, before anything opens it, a path that is not a regular file: missing, a dangling or looping symlink,
    a folder, a FIFO (whose reader would wait forever) or a device."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        link = " (a symlink whose target is missing or loops)" if os.path.islink(path) else ""
        raise SPUAdapterFileError(
            f"{path}: the {what} cannot be read{link}: {error.strerror}. Save the adapter again, or restore the file "
            "from a copy."
        ) from error
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise SPUAdapterFileError(
            f"{path}: the {what} is {kind}; SPU reads adapters only from regular files. Put the file there that "
            "`save_pretrained` wrote, or save the adapter again."
        )


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; anything else raises an `SPUAdapterFileError` naming it."""
    check_regular_file(path, "safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as error:  # safetensors raises its own error type, without the path, for every kind of damage
        raise _unreadable(path, error) from error
    return tensors, metadata


def _tensor_keys(path: str | os.PathLike[str]) -> set[str]:
    """The tensor names of a safetensors file, read from its header alone."""
    check_regular_file(path, "safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # as in `read_safetensors`
        raise _unreadable(path, error) from error


def _unreadable(path: str | os.PathLike[str], error: Exception) -> SPUAdapterFileError:
    return SPUAdapterFileError(
        f"{os.fspath(path)}: not a readable safetensors file ({error}); it is truncated or damaged. Save the "
        "adapter again, or restore the file from a copy."
    )


def digest_entry(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The `DIGEST_KEY` entry of an adapter's state dict: the SHA-256 of its other tensors, as 32 bytes."""
    return torch.frombuffer(bytearray(hash_tensors(hashlib.sha256(), tensors).digest()), dtype=torch.uint8)


def digest_problem(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why a state dict with a `DIGEST_KEY` entry does not match it (None: it does); the entry must be present."""
    recorded = tensors.get(DIGEST_KEY)
    if recorded is None:
        return (
            f"carries no SPU digest (a `{DIGEST_KEY}` tensor), so SPU cannot tell whether it was altered. It was "
            "edited, written by another tool, or saved by an earlier spu-peft. Save the adapter again with "
            "`save_pretrained` or `spu_peft.save_adapter`; for a file you trust, "
            "`spu_peft.integrity.seal_file(path)` records its digest."
        )
    others = {key: tensor for key, tensor in tensors.items() if key != DIGEST_KEY}
    if recorded.dtype != torch.uint8 or not torch.equal(recorded.cpu().reshape(-1), digest_entry(others)):
        return (
            "the tensors do not match the digest recorded when the adapter was saved; the file was altered or "
            "damaged after saving. Save the adapter again, or restore the file from a copy."
        )
    return None


def read_adapter_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file as PEFT saved it: a regular file of safetensors, intact by its `DIGEST_KEY`
    entry, every other key under `base_model.model.` (PEFT looks up the dense modules' tensors under that prefix and
    fails on others). Anything else raises an `SPUAdapterFileError` naming the file."""
    tensors, metadata = read_safetensors(path)
    if DIGEST_KEY not in tensors and DIGEST_KEY in metadata:
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: saved by an earlier spu-peft, which kept the digest in the safetensors header. "
            "`spu_peft.integrity.seal_file(path)` checks that digest and records it where this version looks for it "
            "(a tensor); or save the adapter again."
        )
    if problem := digest_problem(tensors):
        raise SPUAdapterFileError(f"{os.fspath(path)}: {problem}")
    if stray := sorted(key for key in tensors if key != DIGEST_KEY and not key.startswith(PEFT_PREFIX)):
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: {len(stray)} tensor(s) not under `{PEFT_PREFIX}` (e.g. `{stray[0]}`), where PEFT "
            "saves an adapter's tensors; the file was written by another tool. Save the adapter again with "
            "`save_pretrained`."
        )
    return tensors


def seal_file(path: str | os.PathLike[str]) -> None:
    """Record, for a file you trust, the digest of its tensors as its `DIGEST_KEY` entry (the file is rewritten
    through a temporary file). A file saved by an earlier spu-peft, with the digest in its header, is checked against
    that digest first, so a damaged one is not sealed."""
    tensors, metadata = read_safetensors(path)
    tensors.pop(DIGEST_KEY, None)
    legacy = metadata.pop(DIGEST_KEY, None)
    if legacy is not None and legacy != tensor_digest(tensors):
        raise SPUAdapterFileError(
            f"{os.fspath(path)}: the tensors do not match the digest recorded in its header when it was saved; the "
            "file was altered or damaged. Save the adapter again, or restore the file from a copy."
        )
    _write_sealed(path, tensors, metadata)


def cover_added_tensors(path: str | os.PathLike[str], digested: Collection[str], digest: torch.Tensor) -> list[str]:
    """Extend the digest of the adapter file PEFT just wrote to the tensors PEFT added after SPU's save hook digested
    the others (the embedding layers `save_embedding_layers` saves, which PEFT adds last); return their keys.

    The file is rewritten (through a temporary file) only if its recorded digest is `digest`, the one the hook added,
    and matches exactly the tensors of the keys `digested`, which the hook covered: then the file is the one this save
    wrote (not another adapter's, whose keys are the same), and nothing else. A file with
    no added tensor is not read beyond its header, nor rewritten."""
    added = sorted(_tensor_keys(path) - set(digested) - {DIGEST_KEY})
    if not added:
        return []
    tensors, metadata = read_safetensors(path)
    covered = {key: tensor for key, tensor in tensors.items() if key not in added}
    if (
        covered.keys() != {*digested, DIGEST_KEY}
        or digest_problem(covered) is not None
        or not torch.equal(covered[DIGEST_KEY].reshape(-1), digest.reshape(-1).cpu())
    ):
        return []  # not the file the hook digested: left as it is, and a load refuses it
    tensors.pop(DIGEST_KEY)
    _write_sealed(path, tensors, metadata)
    return added


def _write_sealed(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (no `DIGEST_KEY` among them) to `path` with the digest of all of them, through a rename."""
    with replacing(path) as tmp:
        save_file({**tensors, DIGEST_KEY: digest_entry(tensors)}, tmp, metadata={**metadata, "format": "pt"})


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[str]:
    """`with replacing(path) as tmp:` write `tmp` (same folder, same suffix); on success it becomes `path` in one
    rename.

    Readers see the old file or the new one, never a part; on an error the temporary file is removed and `path`
    stays as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The target's suffix ends the name too, for writers that pick a format by it (matplotlib's savefig).
    tmp = str(target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp{target.suffix}")
    # Created as open() creates files (0666 less the umask), not mkstemp's private 0600: `path` keeps that mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file through a temporary file in the same folder and a rename."""
    with replacing(path) as tmp:
        Path(tmp).write_text(text)


def staging_folder(target: str | os.PathLike[str]) -> Path:
    """A new, empty folder beside `target` to write its next version into, for `replace_folder`.

    Its name (`.<target>.<pid>.<random>.saving`) tells `recover_folder` which process made it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _sibling(target, _STAGING)


def _sibling(target: Path, suffix: str) -> Path:
    """A new empty folder `.<target>.<pid>.<random><suffix>` beside `target`, made as `mkdir` makes folders (0777 less
    the umask), not mkdtemp's private 0700: the staged folder becomes `target` and keeps that mode."""
    while True:
        path = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}{suffix}"
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


def replace_folder(staging: Path, target: str | os.PathLike[str], keep: Iterable[str] = ()) -> None:
    """Swap the finished `staging` folder in as `target`, and delete the old one.

    The entries of the old `target` named in `keep` and absent from `staging` are carried over (hard links, else
    copies). Two renames: `target` to `.<target>.<token>.old`, then `staging` to `target`. An error between them puts
    the old folder back; a kill between them leaves both beside an absent `target`, which `recover_folder` completes.
    """
    target = Path(target)
    for name in keep:
        source = target / name
        if (source.exists() or source.is_symlink()) and not (staging / name).exists():
            _link_tree(source, staging / name)
    for file in (p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()):
        _fsync(file)
    ours = staging.name.startswith(f".{target.name}.{os.getpid()}.") and staging.name.endswith(_STAGING)
    old = staging.with_name(staging.name.removesuffix(_STAGING) + _OLD) if ours else _sibling(target, _OLD)
    had_target = target.exists() or target.is_symlink()
    if had_target:
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if had_target:
            os.replace(old, target)
        raise
    _fsync_folder(target.parent)
    if had_target:
        _remove(old)


def recover_folder(target: str | os.PathLike[str]) -> None:
    """Finish or undo what a killed `replace_folder` left beside `target`: put the new folder in place if the kill
    came between its two renames, and delete every staging copy and old folder that no living process is writing."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    leftovers = sorted(
        p for p in target.parent.glob(f".{glob.escape(target.name)}.*") if p.name.endswith((_STAGING, _OLD))
    )
    for path in leftovers:
        if _writer_alive(path, target):
            continue
        if path.name.endswith(_OLD) and not (target.exists() or target.is_symlink()):
            staged = path.with_name(path.name.removesuffix(_OLD) + _STAGING)
            os.replace(staged if staged.is_dir() else path, target)  # the new folder was complete: it was staged
            logger.info("completed the interrupted save of %s", target)
    for path in leftovers:
        if (path.exists() or path.is_symlink()) and not _writer_alive(path, target):
            _remove(path)


def _writer_alive(path: Path, target: Path) -> bool:
    """Whether the process that made this staging copy or old folder still runs (and may still be swapping)."""
    token = path.name[len(target.name) + 2 :].split(".", 1)[0]
    if not token.isdigit():
        return False
    pid = int(token)
    if pid == os.getpid():
        return False  # this process is not inside a swap while it recovers
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_tree(source: Path, destination: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
    elif source.is_symlink():
        os.symlink(os.readlink(source), destination)
    else:
        _link_or_copy(source, destination)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the renames stand regardless
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def save_pretrained_atomically(model: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """`model.save_pretrained` into a staging folder beside `save_directory`, then the folders swapped.

    Every check and every byte happens in the staging folder, so a failed or killed save leaves the adapter that was
    in `save_directory` (weights, config and model card together) or the new one, never a mix. Entries of the old
    folder that the save does not write (other adapters' subfolders, files of the user's) are carried over.
    """
    target = writable_folder(save_directory, "`save_directory`")
    if target.is_symlink():  # swap the folder it leads to, keeping the link
        target = Path(os.path.realpath(target))
    recover_folder(target)
    staging = staging_folder(target)
    try:
        model.save_pretrained(staging, **kwargs)
        keep = [p.name for p in target.iterdir()] if target.is_dir() else []
        replace_folder(staging, target, keep=keep)
    finally:
        _remove(staging)
