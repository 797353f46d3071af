"""Regenerates the embedded demo files in tam_hf/assets: `python scripts/build_embedded.py`.

Provenance and licence: every row of demo_train.jsonl / demo_eval.jsonl is produced by the templates below (no
external text); the tokenizer is trained on those rows only. Released with tam_hf under Apache-2.0.
The tiny model has no weights file here: tam_hf.finetune.model builds it from tiny-llama/config.json with a fixed seed.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "tam_hf" / "assets"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIAL = ["<unk>", "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the template SmolLM2 uses too, so chat data behaves alike on the demo and the real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def rows() -> list[dict]:
    """Single-digit sums in two phrasings: small enough to be learned by a 0.8M model in a minute."""
    out = []
    for a in range(10):
        for b in range(10):
            out.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"})
            out.append({"prompt": f"Add {WORDS[a]} and {WORDS[b]}.", "completion": f" {a + b}"})
    random.Random(0).shuffle(out)
    return out


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    data = rows()
    for name, part in (("demo_train.jsonl", data[:168]), ("demo_eval.jsonl", data[168:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + r["completion"] for r in data] + ["user assistant system The quick brown fox."]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|pad|>",
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    target = HERE / "tiny-llama"
    fast.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    config.save_pretrained(target)


if __name__ == "__main__":
    main()
