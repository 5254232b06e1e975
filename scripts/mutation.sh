#!/usr/bin/env bash
# Mutation testing of one library module with mutmut, in a scratch copy of src/ and tests/ (the tree is not touched).
# Usage: scripts/mutation.sh MODULE [TEST_FILE...]   (installs the dev extra, which holds mutmut, where it is missing)
#   MODULE: a file of src/spu_peft without .py (compose, encoding, ...); TEST_FILEs default to the module's own tests.
#   PYTHON=... picks the interpreter (default .venv's); MUTATION_DIR=... keeps the scratch copy there.
# Prints the killed share and every surviving mutant as a diff. One test process at a time, under `nice`.
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:?usage: scripts/mutation.sh MODULE [TEST_FILE...]}
shift
[ -f "src/spu_peft/$module.py" ] || { echo "no module src/spu_peft/$module.py" >&2; exit 2; }
selection_tests="tests/test_selection.py tests/test_selection_oracles.py tests/test_selection_contract.py"
declare -A TESTS=(
    [compose]="tests/test_compose.py"
    [encoding]="tests/test_encoding.py tests/test_blocks.py tests/test_selection_oracles.py tests/test_save_load.py"
    [scoring]="$selection_tests tests/test_collectives.py"
    [selection]="$selection_tests tests/test_user_mistakes.py tests/test_collectives.py tests/test_distributed_one_process.py"
    [layer]="tests/test_layer_equals_dense_reference.py tests/test_layer_contract.py tests/test_distributed_one_process.py tests/test_selection.py tests/test_compose.py tests/test_save_load.py tests/test_peft_contract.py tests/test_bf16.py tests/test_blocks.py tests/test_quantized.py"
    [sparse_linear]="tests/test_sparse_linear_paths.py tests/test_layer_equals_dense_reference.py tests/test_bf16.py tests/test_blocks.py $selection_tests"
    [distributed]="tests/test_distributed_one_process.py tests/test_collectives.py $selection_tests tests/test_save_load.py tests/test_user_mistakes.py"
    [loading]="tests/test_loading_messages.py tests/test_fuzz_adapter_files.py tests/test_save_load.py tests/test_integrity.py tests/test_peft_contract.py tests/test_blocks.py tests/test_model.py tests/test_loading_side_doors.py"
    [selection_data]="tests/test_selection_data.py tests/test_user_mistakes.py tests/test_selection_contract.py tests/test_selection.py"
    [budgets]="tests/test_budgets.py tests/test_selection.py tests/test_selection_oracles.py"
    [supports]="tests/test_layer_contract.py tests/test_blocks.py tests/test_peft_contract.py"
    [blocks]="tests/test_blocks.py tests/test_bsr.py tests/test_injection.py"
    [naming]="tests/test_naming.py tests/test_save_load.py"
    [optim_state]="tests/test_optim_state.py tests/test_selection.py"
    [integrity]="tests/test_integrity_files.py tests/test_integrity.py tests/test_save_load.py"
    [folders]="tests/test_folders.py"
    [injection]="tests/test_injection.py tests/test_loading_side_doors.py tests/test_save_load.py"
    [adapter_loader]="tests/test_adapter_loader.py tests/test_loading_side_doors.py"
    [comparison]="tests/test_comparison.py"
    [bnb]="tests/test_quantized.py"
    [bsr]="tests/test_bsr.py"
    [config]="tests/test_config.py tests/test_loading_messages.py tests/test_loading_side_doors.py tests/test_user_mistakes.py tests/test_save_load.py"
    [model]="tests/test_peft_contract.py tests/test_save_load.py tests/test_layer_contract.py tests/test_task_types.py tests/test_user_mistakes.py tests/test_config.py tests/test_model.py tests/test_quantized.py tests/test_blocks.py"
    [hub]="tests/test_hub.py tests/test_save_load.py tests/test_user_mistakes.py"
    [trainer]="tests/test_trainer.py"
    [memory]="tests/test_peak_memory.py"
)
tests=${*:-${TESTS[$module]:-tests/test_$module.py}}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
mutmut="$(cd "$(dirname "$PYTHON")" && pwd)/mutmut"  # absolute: the run happens in the scratch copy
if [ ! -x "$mutmut" ]; then  # mutmut is a maintainers' tool: the dev extra, not the test extra
    echo "mutmut is not installed beside $PYTHON: installing the dev extra (pip install -e '.[dev]')" >&2
    "$PYTHON" -m pip install -q -e ".[dev]"
fi
[ -x "$mutmut" ] || { echo "mutmut is still not beside $PYTHON after installing the dev extra" >&2; exit 2; }

work=${MUTATION_DIR:-$(mktemp -d)}
mkdir -p "$work" && rm -rf "$work/src" "$work/tests" "$work/benchmarks" "$work/mutants"
cp -r src tests benchmarks pyproject.toml "$work/"  # benchmarks: tests that run a benchmark script load it from there
find "$work" -name __pycache__ -prune -exec rm -rf {} +
{
    echo "[mutmut]"
    echo "source_paths=src"
    echo "only_mutate=src/spu_peft/$module.py"
    echo "pytest_add_cli_args_test_selection="
    printf '    %s\n' $tests
    echo "also_copy="
    printf '    %s\n' tests benchmarks
} >"$work/setup.cfg"

cd "$work"
unset PYTHONPATH  # mutmut puts its mutated copy of src/ first
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
nice "$mutmut" run --max-children 1 >run.log 2>&1 || { tail -c 2000 run.log; exit 1; }
"$mutmut" results --all true >results.txt 2>&1
killed=$(grep -c ": killed$" results.txt || true)
survived=$(grep ": survived$" results.txt | sed 's/^ *//; s/: survived$//' || true)
total=$(grep -cE ": (killed|survived|timeout|suspicious|no tests|segfault)" results.txt || true)
echo "mutation score of spu_peft/$module.py against $tests: $killed of $total mutants killed" \
    "($(awk -v k="$killed" -v t="$total" 'BEGIN { printf "%.1f", t ? 100 * k / t : 0 }')%)"
grep -vE ": (killed|survived)$" results.txt | grep ": " || true
for name in $survived; do
    echo "--- survived: $name"
    "$mutmut" show "$name" 2>&1 | grep -E "^[-+][^-+]" || true
done
echo "(scratch copy: $work)"
