"""A stock-style training script: HfArgumentParser(TrainingArguments) and the plain Trainer, nothing from
tam_hf. tests/test_register.py runs it through `python -m tam_hf.run` with `--optim adatam`.

It prints "stock_clm: model built" once the model exists and writes <output_dir>/result.json with the optimizer
it got and the log history."""

import json
import os

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    print("stock_clm: model built", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (64, 1), generator=g) + torch.arange(16)) % 64
    data = [{"input_ids": x, "labels": x} for x in ids]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper
    if trainer.is_world_process_zero():
        result = {
            "optimizer": type(optimizer).__name__,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            "log_history": trainer.state.log_history,
            "world_size": args.world_size,
        }
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f, default=str)
    if torch.distributed.is_initialized():  # gloo can abort a rank at exit otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
