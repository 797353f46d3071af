"""``python -m tam_hf.integrations.example DIR``: the offline material of the example configs in
``recipes/integrations/``, written under DIR (the configs say ``tam_tiny``, relative to where the tool runs):

* ``DIR/model/``: the package's tiny Llama (tam_hf/assets/tiny-llama, 97k parameters, with its tokenizer) as a
  Hugging Face checkpoint, weights drawn from a fixed seed the way transformers initialises a Llama
  (normal(0, initializer_range) matrices, unit norms, tied embeddings);
* ``DIR/train.jsonl``: the package's single-digit sums, each row with ``prompt``, ``completion``, ``text``
  (prompt + completion) and, for Alpaca readers, ``instruction`` and ``output``; ``DIR/dataset_info.json``
  names it ``tam_demo`` for LLaMA-Factory, ``DIR/v1_dataset.yaml`` for its v1 trainer.

Only torch and safetensors, which every one of the three tools brings: no transformers (torchtune has none).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["write_example"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _llama_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    std = config["initializer_range"]
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        weights.update({
            layer + "self_attn.q_proj.weight": normal(q, hidden),
            layer + "self_attn.k_proj.weight": normal(kv, hidden),
            layer + "self_attn.v_proj.weight": normal(kv, hidden),
            layer + "self_attn.o_proj.weight": normal(hidden, q),
            layer + "mlp.gate_proj.weight": normal(inter, hidden),
            layer + "mlp.up_proj.weight": normal(inter, hidden),
            layer + "mlp.down_proj.weight": normal(hidden, inter),
            layer + "input_layernorm.weight": torch.ones(hidden),
            layer + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = normal(vocab, hidden)
    return weights


def write_example(folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    model = folder / "model"
    model.mkdir(parents=True, exist_ok=True)
    for item in (ASSETS / "tiny-llama").iterdir():
        if item.is_file():
            shutil.copy(item, model / item.name)
    config = json.loads((model / "config.json").read_text())
    save_file(_llama_weights(config), str(model / "model.safetensors"), metadata={"format": "pt"})
    rows = [json.loads(line) for line in (ASSETS / "demo_train.jsonl").read_text().splitlines() if line.strip()]
    (folder / "train.jsonl").write_text("".join(json.dumps(
        {**r, "text": r["prompt"] + r["completion"], "instruction": r["prompt"], "output": r["completion"]}) + "\n"
        for r in rows))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"tam_demo": {"file_name": "train.jsonl", "columns": {"prompt": "prompt", "response": "completion"}}},
        indent=2))
    (folder / "v1_dataset.yaml").write_text(
        f"tam_demo:\n  path: {json.dumps(str(folder / 'train.jsonl'))}\n  source: local\n  converter: alpaca\n")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tam_hf.integrations.example DIR")
    print(write_example(sys.argv[1]))
