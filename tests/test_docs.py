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


# ---- README's Python examples run as written ----------------------------------------------------------------------

# What README leaves to the reader or to the Hub, and how the test supplies it (the documented substitution):
# the Hub's CLIP is the embedded CLIP saved to a folder, `class_names` and `task_image_batches` are a tiny task,
# `push_to_hub` records its call instead of uploading, a block that traces `batches` gets a list of them, and of a
# block not run only the imports run (later blocks use them). Methods the blocks register are unregistered after.
HUB_MODEL = "openai/clip-vit-base-patch16"
NOT_RUN = {
    "run_sequence(": "a whole continual sequence; tests/test_notebook.py runs it on the embedded model",
    "BitsAndBytesConfig(": "a Hub causal LM in 4 bits; tests/test_quantized.py runs the same recipe on a tiny LLaMA",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_python_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\nz = 3\n"]


@pytest.mark.slow  # about 10 s of CPU: loads the embedded model, selects, saves, reloads and traces
def test_readmes_python_examples_run_as_written(tmp_path, monkeypatch):
    import peft
    import torch

    from spu_peft.continual import methods
    from spu_peft.embedded import load_embedded_clip

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    clip, processor = load_embedded_clip()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    size = clip.config.vision_config.image_size
    pushed = []
    monkeypatch.setattr(peft.PeftModel, "push_to_hub", lambda self, repo, **kwargs: pushed.append((repo, kwargs)))
    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    namespace = {
        "class_names": ["cat", "zebra"],
        "task_image_batches": [torch.randn(4, 3, size, size, generator=generator) for _ in range(3)],
    }
    ran = []
    for block in python_blocks((ROOT / "README.md").read_text()):
        if any(key in block for key in NOT_RUN):
            imports = re.findall(r"^(?:from \S+ )?import [^\n]+$", block, flags=re.M)
            exec("\n".join(imports), namespace)
            continue
        if "causal_trace(" in block:
            captions = namespace["captions"]
            namespace["batches"] = [{"pixel_values": images, **captions} for images in namespace["task_image_batches"]]
        exec(compile(block.replace(HUB_MODEL, str(tmp_path / "clip")), "README.md", "exec"), namespace)
        ran.append(block)
    assert len(ran) == len(python_blocks((ROOT / "README.md").read_text())) - len(NOT_RUN)
    assert namespace["report"].num_batches == 3 and namespace["report"].score == "output_norm"
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and pushed[0][0] == "you/clip-spu"
