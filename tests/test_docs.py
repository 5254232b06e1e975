"""The documentation holds: every relative link in README.md and docs/*.md leads to a file, and every `--flag` that
README.md writes after a `benchmarks/*.py` script is one of that script's flags."""

import contextlib
import importlib
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCRIPT = re.compile(r"benchmarks/(\w+)\.py")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def relative_links(page: Path) -> list[str]:
    """The page's link targets that are not URLs or anchors within the page, without their anchors."""
    targets = [m.group(1) for m in LINK.finditer(page.read_text())]
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def commands(text: str) -> list[str]:
    """Inline code spans and the logical lines of fenced blocks (backslash continuations joined)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`]+)`", prose)  # a span may wrap onto the next line, never across a paragraph
    return lines + [" ".join(span.split()) for span in spans if "\n\n" not in span]


def flags_after_scripts(text: str) -> dict[str, set[str]]:
    """Script -> the flags written after its name in the same command (up to a comment or the next script)."""
    found: dict[str, set[str]] = {}
    for command in commands(text):
        command = command.split(" #")[0]
        pieces = SCRIPT.split(command)  # [before, script, after, script, after, ...]
        for script, after in zip(pieces[1::2], pieces[2::2]):
            found.setdefault(script, set()).update(FLAG.findall(after))
    return found


def script_flags(script: str) -> set[str]:
    """The flags of a script's `--help`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(FLAG.findall(out.getvalue()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page) if t and not (page.parent / t).exists()]
    assert missing == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md#top) [gone](docs/none.md) ![img](x.png) [web](https://e.org) [in](#here)\n")
    assert [t for t in relative_links(page) if not (tmp_path / t).exists()] == ["docs/none.md", "x.png"]


def test_flag_extraction():
    text = (
        "Run `accelerate launch --cpu benchmarks/cl_sequence.py --quick --lr-sweep` or:\n\n```bash\n"
        "python benchmarks/scaling.py --widths 64 \\\n    --seeds 0   # then --fresh\n```\n"
    )
    assert flags_after_scripts(text) == {"cl_sequence": {"--quick", "--lr-sweep"}, "scaling": {"--widths", "--seeds"}}


def test_every_flag_readme_names_for_a_script_exists():
    named = flags_after_scripts((ROOT / "README.md").read_text())
    assert named, "README names no benchmark command"
    unknown = {script: sorted(flags - script_flags(script)) for script, flags in named.items()}
    assert {script: flags for script, flags in unknown.items() if flags} == {}
