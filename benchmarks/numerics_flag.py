"""The `--numerics` a command line asks for, read before any import that computes: the sequence and scaling scripts
put the pins in the environment first, since MKL and ATen fix their choices at their first call (and bitsandbytes,
which PEFT imports, makes that call at import). Kept free of torch and spu_peft imports for that reason."""

from __future__ import annotations


def numerics_asked(argv: list[str], default: str) -> str:
    """`X` of `--numerics X` or `--numerics=X` in `argv` (the arguments after the script), else `default`."""
    for flag, value in zip(argv, [*argv[1:], None]):
        if flag.startswith("--numerics="):
            return flag.removeprefix("--numerics=")
        if flag == "--numerics" and value is not None:
            return value
    return default
