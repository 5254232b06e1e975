"""The eight peers of the paper's comparison, as its reference code has them (with its bugs fixed, see each
module), registered like the built-in methods when `spu_peft.continual` is imported.

- `lwf`, `prd`: everything trains; distillation from the previous task's model on current and replay images.
- `mas`: everything trains; an importance-weighted pull towards the previous weights.
- `lora_ewc`: LoRA on the query/value projections, with replay; an EWC penalty whose importances come from
  reference data.
- `zscl`: everything trains; distillation from the original model on reference data, and weight averaging.
- `sparsecl`: 5% of the attention and MLP weights, with replay; magnitude masks on the gradients.
- `spg`: `fc1` and the visual projection; soft masks on the updates from earlier tasks' importances.
- `slca`: everything (projections at 5x the rate), with replay; classifier alignment on sampled class features.

Each method's options (coefficients), the reference's values under `--protocol paper`, and where it departs from
the reference code: docs/peers.md.
"""

from . import distill, lora_ewc, mas, slca, sparsecl, spg, zscl

__all__ = ["distill", "lora_ewc", "mas", "slca", "sparsecl", "spg", "zscl"]
