"""Adapter files that say whether they are intact, and writes that never leave half a file under a real name.

safetensors files carry a string-to-string metadata header that every reader (PEFT's loaders included) passes over,
so SPU records there a SHA-256 digest of the tensors (names, dtypes, shapes and bytes). A byte flipped in the data, two
tensors swapped or a dtype rewritten in the header change the digest; loading compares it before any weight is
written. Files written without one (earlier versions, other tools) still load, after a note in the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
DIGEST_KEY = "spu_sha256"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or damaged file raises a `ValueError` naming it."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as error:  # safetensors raises its own error type, without the path, for every kind of damage
        raise ValueError(
            f"{os.fspath(path)}: not a readable safetensors file ({error}); it is truncated or damaged. Save the "
            "adapter again, or restore the file from a copy."
        ) from error
    return tensors, metadata


def verify_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, after checking them against the digest recorded when it was saved."""
    tensors, metadata = read_safetensors(path)
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        logger.info(
            "%s carries no SPU digest (saved by an earlier version or another tool): its tensors are checked field "
            "by field only.",
            os.fspath(path),
        )
    elif recorded != tensor_digest(tensors):
        raise ValueError(
            f"{os.fspath(path)}: the tensors do not match the digest recorded when the adapter was saved; the file "
            "was altered or damaged after saving. Save the adapter again, or restore the file from a copy."
        )
    return tensors


def seal_file(path: str | os.PathLike[str]) -> None:
    """Record the digest of an adapter file's tensors in its metadata (rewritten through a temporary file).

    Only the header changes: the tensor bytes are copied as they are, and the metadata is written in a fixed order
    (safetensors' own writer orders it at random), so one adapter always gives the same file.
    """
    tensors, metadata = read_safetensors(path)
    digest = tensor_digest(tensors)
    if metadata.get(DIGEST_KEY) == digest:
        return
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    metadata = dict(sorted({**metadata, "format": "pt", DIGEST_KEY: digest}.items()))
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    with replacing(path) as tmp:
        Path(tmp).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[str]:
    """`with replacing(path) as tmp:` write `tmp` (same folder); on success it becomes `path` in one rename.

    Readers see the old file or the new one, never a part; on an error the temporary file is removed and `path`
    stays as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp")
    # Created as open() creates files (0666 less the umask), not mkstemp's private 0600: `path` keeps that mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file through a temporary file in the same folder and a rename."""
    with replacing(path) as tmp:
        Path(tmp).write_text(text)


def save_pretrained_atomically(model: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """`model.save_pretrained` into a staging folder beside `save_directory`, then each file renamed into place.

    Every check and every byte happens in the staging folder, so a failing save leaves the adapter that was in
    `save_directory` as it was; each file then changes in one rename (weights before their config), so no reader
    ever sees part of a file.
    """
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".saving", dir=target.parent))
    try:
        model.save_pretrained(staging, **kwargs)
        written = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in sorted(written, key=lambda p: p.name != WEIGHTS_NAME):
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
