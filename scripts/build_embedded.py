"""Regenerates the embedded demo files in tam_hf/assets: `python scripts/build_embedded.py`.

Provenance and licence: every row of demo_train.jsonl / demo_eval.jsonl / demo_chat.jsonl is produced by the
templates below (no external text); the tokenizer is trained on those rows only. Released with tam_hf under
Apache-2.0. The tiny model has no weights file here: tam_hf.finetune.model builds it from tiny-llama/config.json
with a fixed seed. tests/test_recipe_data.py checks that the committed files are what this script makes.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "tam_hf" / "assets"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIAL = ["<unk>", "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the template SmolLM2 uses too, so chat data behaves alike on the demo and the real model. Assistant turns
# are wrapped in {% generation %} ... {% endgeneration %} (the rendered text is unchanged): TRL finds the tokens of
# assistant-only loss through them. Also shipped alone, for chat recipes whose tokenizer template has no markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SYSTEM = "You add small numbers. Answer with the number only."


def rows() -> list[dict]:
    """Single-digit sums in two phrasings: small enough to be learned by a 0.8M model in a minute."""
    out = []
    for a in range(10):
        for b in range(10):
            out.append({"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"})
            out.append({"prompt": f"Add {WORDS[a]} and {WORDS[b]}.", "completion": f" {a + b}"})
    random.Random(0).shuffle(out)
    return out


def chat_rows() -> list[dict]:
    """64 conversations (a, b < 8): a system turn, the sum asked in digits or in words (alternating, checkerboard
    over a and b), the answer; every third conversation asks for one more."""
    out = []
    for a in range(8):
        for b in range(8):
            question = f"What is {a} plus {b}?" if (a + b) % 2 else f"Add {WORDS[a]} and {WORDS[b]}."
            messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": question},
                        {"role": "assistant", "content": str(a + b)}]
            if (8 * a + b) % 3 == 0:
                messages += [{"role": "user", "content": "And one more?"},
                             {"role": "assistant", "content": str(a + b + 1)}]
            out.append({"messages": messages})
    random.Random(0).shuffle(out)
    return out


def jsonl(rows_: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows_)


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    data = rows()
    for name, part in (("demo_train.jsonl", data[:168]), ("demo_eval.jsonl", data[168:]),
                       ("demo_chat.jsonl", chat_rows())):
        (HERE / name).write_text(jsonl(part))
    (HERE / "chat_templates").mkdir(exist_ok=True)
    (HERE / "chat_templates" / "chatml.jinja").write_text(CHAT_TEMPLATE)

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
