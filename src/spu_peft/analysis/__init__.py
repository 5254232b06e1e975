"""The paper's analyses as tools for any transformers model.

- `causal_trace` / `recommend_target_modules`: where a model keeps what it predicts (Figure 2), and so where SPU
  should go in it.
- `top_selected_neurons` / `neuron_maps`: what the fc1 neurons SPU selects respond to in an image (Figure 3).
- `task_supports` / `repeat_rates`: how much the tasks of a sequence share their selected entries (Figure 4).

`plot_causal_trace`, `plot_neuron_maps` and `plot_repeat_rates` draw them; `benchmarks/causal_tracing.py` runs
all three.
"""

from .neurons import neuron_maps, selected_per_row, top_selected_neurons
from .plots import plot_causal_trace, plot_neuron_maps, plot_repeat_rates
from .sharing import adapter_support, model_support, repeat_rates, task_adapter_dirs, task_supports
from .towers import KIND_MODULES, LAYER_KINDS, TraceTower, find_towers
from .tracing import CausalTraceResult, causal_trace, forward_hooks, recommend_target_modules, target_probabilities

__all__ = [
    "KIND_MODULES",
    "LAYER_KINDS",
    "CausalTraceResult",
    "TraceTower",
    "adapter_support",
    "causal_trace",
    "find_towers",
    "forward_hooks",
    "model_support",
    "neuron_maps",
    "plot_causal_trace",
    "plot_neuron_maps",
    "plot_repeat_rates",
    "recommend_target_modules",
    "repeat_rates",
    "selected_per_row",
    "target_probabilities",
    "task_adapter_dirs",
    "task_supports",
    "top_selected_neurons",
]
