"""Studies built on the sequence engine: the scaling study of SPU's selection (which methods and variants it compares,
the trade-off curves and SPU's advantage at matched accuracy, its tables and plots) and the overlap of supports.

This package imports `spu_peft.continual`, never the reverse. `benchmarks/scaling.py` and
`benchmarks/selection_overlap.py` are its command lines. `text_retention` and `text_data` (imported on their own:
they need the all-MiniLM-L6-v2 wheel only when run) are the study of SPU on a real sentence encoder,
`benchmarks/text_retention.py`."""

from .family import capped, load_control, load_member
from .overlap import measure_overlap, selection_overlaps, shared, supports
from .scaling import LR_GRIDS, StudyDesign, analyse, learning_rate_grid, score_methods, study_methods
from .scaling_report import markdown, plot
from .tradeoff import advantage, curves_of, drop_at, per_doubling, spread

__all__ = [
    "LR_GRIDS",
    "StudyDesign",
    "advantage",
    "analyse",
    "capped",
    "curves_of",
    "drop_at",
    "learning_rate_grid",
    "load_control",
    "load_member",
    "markdown",
    "measure_overlap",
    "per_doubling",
    "plot",
    "score_methods",
    "selection_overlaps",
    "shared",
    "spread",
    "study_methods",
    "supports",
]
