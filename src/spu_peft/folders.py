"""A folder about to be written (an adapter's, a run's outputs), checked first so that a bad path is named with its fix.

Without the check the OS says `FileExistsError` or `NotADirectoryError` about some part of the path, from deep
inside a save, and an empty path writes into the current folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def writable_folder(path: str | os.PathLike[str], name: str) -> Path:
    """`path` as a `Path`, if it is a folder or can be made one; else a `ValueError` naming `name` (the argument or
    flag that gave it), the part of the path in the way, and the fix.

    Links are followed: a link to a folder is written through; a link to a file, or to nothing, is in the way.
    """
    text = os.fspath(path)
    if not text:
        raise ValueError(f"{name} is empty; pass the folder to write in (it is created if needed).")
    target = Path(text)
    for part in (target, *target.parents):
        if part.is_dir():
            return target
        where = f"{name} {text!r}" if part == target else f"{name} {text!r} cannot be a folder: {str(part)!r}"
        if part.exists():
            kind = "a file" if part.is_file() else "not a folder"
            if os.path.realpath(part) != os.path.abspath(part):
                kind += f" (through a link, {os.path.realpath(part)!r})"
            fix = (
                "pass a folder (it is created if needed)"
                if part == target
                else f"pass a path under a folder, or move {str(part)!r} away"
            )
            raise ValueError(f"{where} is {kind}; {fix}.")
        if part.is_symlink():
            raise ValueError(
                f"{where} is a link to {os.readlink(part)!r}, which leads nowhere; create the folder it points to, or "
                "remove the link."
            )
    return target
