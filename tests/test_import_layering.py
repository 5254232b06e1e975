"""The house of `spu_peft`: no import circles, and no module imports one of a higher layer (kernels < adapter <
selection < continual < studies), measured on the source by `scripts/code_metrics.py`."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("code_metrics", ROOT / "scripts" / "code_metrics.py")
metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metrics)


@pytest.fixture(scope="module")
def graph():
    return metrics.import_graph(ROOT / "src")


def test_every_module_has_a_layer(graph):
    assert "spu_peft.continual.sequence" in graph and "spu_peft.studies.overlap" in graph
    for module in graph:
        metrics.layer_of(module)  # raises for a module in no layer


def test_no_import_circles(graph):
    assert metrics.circles(graph) == []


def test_imports_run_one_way(graph):
    assert metrics.layer_violations(graph) == []
    assert "spu_peft.continual" in graph["spu_peft.studies.overlap"] or any(
        target.startswith("spu_peft.continual.") for target in graph["spu_peft.studies.overlap"]
    )


def test_the_checks_catch_a_breach_and_a_circle():
    """The checks themselves: an engine module importing a study, and two modules importing each other."""
    breach = {"spu_peft.continual.reporting": {"spu_peft.studies.tradeoff"}, "spu_peft.studies.tradeoff": set()}
    assert metrics.layer_violations(breach) == [("spu_peft.continual.reporting", "spu_peft.studies.tradeoff")]
    circle = {"spu_peft.layer": {"spu_peft.loading"}, "spu_peft.loading": {"spu_peft.layer"}, "spu_peft.config": set()}
    assert metrics.circles(circle) == [["spu_peft.layer", "spu_peft.loading"]]
    with pytest.raises(ValueError, match="no layer"):
        metrics.layer_of("spu_peft.newpackage.module")


def test_relative_imports_resolve_to_modules(tmp_path):
    package = tmp_path / "spu_peft"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .layer import X\n")
    (package / "layer.py").write_text("from . import config\n")
    (package / "config.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mod.py").write_text("def f():\n    from ..layer import X\n    import spu_peft.config\n")
    assert metrics.import_graph(tmp_path) == {
        "spu_peft": {"spu_peft.layer"},
        "spu_peft.config": set(),
        "spu_peft.layer": {"spu_peft.config"},
        "spu_peft.sub": set(),
        "spu_peft.sub.mod": {"spu_peft.layer", "spu_peft.config"},
    }
