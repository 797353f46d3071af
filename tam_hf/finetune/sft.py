"""Causal-LM fine-tuning on TRL's ``SFTTrainer``: the recipe's data formats mapped onto TRL's dataset types,
completion-only / assistant-only loss and packing from TRL, the TAM optimizers from ``TrainingArguments.optim``.

Formats (canonical columns, see ``FORMAT_COLUMNS`` in :mod:`tam_hf.finetune.config.schema`) -> TRL dataset type:

============================  =========================  ==========================================
recipe ``data.format``        TRL type                   loss with ``completion_only_loss`` (default on)
============================  =========================  ==========================================
``text``                      language modeling          every token
``prompt_completion``         prompt-completion          the completion (``SFTConfig.completion_only_loss``)
``instruction``               prompt-completion          the output; the prompt is the instruction template
``chat``                      conversational LM          assistant turns (``SFTConfig.assistant_only_loss``)
============================  =========================  ==========================================

Assistant-only loss needs a chat template that marks assistant turns with ``{% generation %}`` ...
``{% endgeneration %}``; TRL swaps in a marked version of the templates it knows, and
:func:`check_chat_template` reports any other as a data error naming the fix before anything is tokenised.

Packing (``packing=True``) is TRL's best-fit-decreasing packing, which is padding-free: TRL's collator concatenates
the batch into one row and keeps the sequences apart only through ``position_ids``. Flash-attention reads the
boundaries from them; under ``sdpa`` and ``eager`` a packed row is kept apart only while transformers can infer
the boundaries itself (no attention mask, no cache), at the cost of one ``(batch * length)**2`` mask. So with any
attention other than flash-attention, :class:`TAMSFTTrainer` collates packed rows with
:class:`PackedBatchCollator` instead: one row per packed row, and an explicit block-diagonal causal mask per row,
so a token attends only to earlier tokens of its own sequence and the loss of a packed batch equals the loss of
the same sequences unpacked.

The optimizer: after ``tam_hf.trainer.register()`` any ``Trainer`` (``SFTTrainer`` included) builds TAM / AdaTAM /
AdaTAMW for ``optim="tam|adatam|adatamw"`` and gets the damping telemetry. :class:`TAMSFTTrainer` adds what
``TAMTrainer`` adds: the ``--optim_args`` check before the data is tokenised, and the distributed checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from trl import SFTTrainer

from tam_hf.finetune.config.checks import attention_kind, packing_problems
from tam_hf.finetune.errors import DataError

__all__ = ["TRL_TYPES", "to_trl_dataset", "instruction_prompt", "loss_settings", "sft_config", "model_attention",
           "check_chat_template", "PackedBatchCollator", "TAMSFTTrainer", "build_sft_trainer"]

IGNORE = -100
# recipe data.format -> the TRL dataset type it becomes, and the columns TRL reads
TRL_TYPES = {
    "text": ("language modeling", ("text",)),
    "prompt_completion": ("prompt-completion", ("prompt", "completion")),
    "instruction": ("prompt-completion", ("prompt", "completion")),
    "chat": ("conversational", ("messages",)),
}
BLOCK_MASK_KEY = "block_attention_mask"  # a batch key only PackedBatchCollator writes and the model hook reads


# ------------------------------------------------------------------------------------------------ datasets


def instruction_prompt(row: dict, template: str) -> str:
    """The prompt of an ``instruction`` row: the template with ``{instruction}`` and ``{input}`` filled in."""
    return template.format(instruction=row["instruction"], input=row.get("input") or "")


def to_trl_dataset(ds, fmt: str, instruction_template: Optional[str] = None):
    """A datasets.Dataset with the canonical columns of ``fmt`` -> the columns of its TRL type, nothing else
    (TRL decides the type from the column names, so stray columns must not reach it)."""
    if fmt not in TRL_TYPES:
        raise ValueError(f"format {fmt!r} is not a causal-LM format ({', '.join(TRL_TYPES)})")
    if fmt == "instruction":
        if instruction_template is None:
            raise ValueError("format instruction needs an instruction_template")
        return ds.map(lambda row: {"prompt": instruction_prompt(row, instruction_template), "completion": row["output"]},
                      remove_columns=ds.column_names, desc="instruction -> prompt/completion")
    return ds.select_columns(list(TRL_TYPES[fmt][1]))


def loss_settings(fmt: str, completion_only_loss: Optional[bool]) -> dict[str, Any]:
    """SFTConfig's completion_only_loss / assistant_only_loss for the recipe's one switch (None = on where the
    format has a completion: prompt_completion, instruction, chat)."""
    on = completion_only_loss is not False
    if fmt in ("prompt_completion", "instruction"):
        return {"completion_only_loss": on, "assistant_only_loss": False}
    if fmt == "chat":
        return {"completion_only_loss": None, "assistant_only_loss": on}
    if completion_only_loss:
        raise ValueError(f"completion_only_loss: format {fmt} has no completion")
    return {"completion_only_loss": False, "assistant_only_loss": False}


def sft_config(args, *, fmt: str, max_length: int, completion_only_loss: Optional[bool] = None,
               packing: bool = False, padding_free: bool = False, chat_template_path: Optional[str] = None):
    """An ``SFTConfig`` carrying every field of ``args`` (a ``TrainingArguments``) unchanged, plus the SFT fields.

    Built from ``args`` rather than from SFTConfig's defaults, which differ from TrainingArguments' (bf16 and
    gradient checkpointing on, logging every 10 steps): a recipe trains with the same settings under either
    trainer. Padding-free without packing keeps TRL's rule that it does not truncate (``max_length`` None):
    :func:`build_sft_trainer` truncates in the collator instead."""
    from trl import SFTConfig

    from tam_hf.trainer.register import register

    register()  # SFTConfig(optim="adatam") is checked against transformers' OptimizerNames
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides it
    values.update(loss_settings(fmt, completion_only_loss))
    values.update(
        max_length=None if padding_free and not packing else max_length,
        packing=packing,
        packing_strategy="bfd",  # keeps sequence boundaries; a longer sequence is truncated, as without packing
        padding_free=padding_free,
        chat_template_path=chat_template_path,
        dataset_kwargs=None,
    )
    return SFTConfig(**values)


# ------------------------------------------------------------------------------------------------ checks


def model_attention(model) -> str:
    """The loaded model's attention as :func:`~tam_hf.finetune.config.checks.attention_kind` names it ('flash',
    'sdpa', 'eager', ...)."""
    return attention_kind(getattr(model.config, "_attn_implementation", None) or "eager")


def check_chat_template(tokenizer, assistant_only_loss: bool, chat_template_path: Optional[str] = None) -> None:
    """Raise DataError when chat data cannot be rendered or its assistant turns cannot be found, naming the fix."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if chat_template_path is not None:
        if assistant_only_loss and not has_generation_markers(Path(chat_template_path).read_text()):
            raise DataError(
                f"data.chat_template_path {chat_template_path} has no {{% generation %}} ... {{% endgeneration %}} "
                "markers around assistant turns, which loss on assistant turns only (data.completion_only_loss, on "
                "by default for chat) needs; add them, or set data.completion_only_loss: false")
        return
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError("format chat needs a tokenizer with a chat template (tokenizer.chat_template is empty); "
                        "give one with data.chat_template_path: a .jinja file")
    if not assistant_only_loss or has_generation_markers(template):
        return
    try:
        get_training_chat_template(tokenizer)  # TRL's marked versions of the templates it knows
    except ValueError:
        raise DataError(
            "loss on assistant turns only (data.completion_only_loss, on by default for chat) needs a chat template "
            "that marks them with {% generation %} ... {% endgeneration %}; this tokenizer's template has no markers "
            "and TRL knows no marked version of it. Give a marked template with data.chat_template_path: "
            "a .jinja file, or train on every token with data.completion_only_loss: false") from None


# ------------------------------------------------------------------------------------------------ collator


@dataclass
class PackedBatchCollator:
    """Collates packed rows (``input_ids``, ``labels``, optional ``seq_lengths`` from TRL's packing; a row without
    ``seq_lengths`` is one sequence) into a padded batch that keeps the sequences of a row apart:

    * ``position_ids`` restart at 0 at each sequence;
    * ``labels`` are -100 at each sequence's first token (unpacked, the shift drops it; packed, it would be
      predicted from the previous sequence) and on padding;
    * ``attention_mask``: the usual 2D padding mask (what TRL counts tokens with);
    * ``block_attention_mask``: bool ``[batch, 1, length, length]``, True where query i may attend to key j
      (same sequence, j <= i). A padding position attends to itself only, so no row is fully masked (an
      all-masked softmax row is NaN). :class:`TAMSFTTrainer`'s model hook turns it into the model's mask.

    ``max_length`` truncates each row first (padding-free without packing, where TRL does not truncate)."""

    pad_token_id: int
    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            ids = list(ex["input_ids"])
            labels = list(ex["labels"]) if ex.get("labels") is not None else list(ids)
            lengths = [int(n) for n in ex["seq_lengths"]] if ex.get("seq_lengths") is not None else [len(ids)]
            if self.max_length is not None and len(ids) > self.max_length:
                ids, labels, lengths = ids[: self.max_length], labels[: self.max_length], _cut(lengths, self.max_length)
            if sum(lengths) != len(ids):
                raise ValueError(f"seq_lengths {lengths} do not add up to the row's {len(ids)} tokens")
            rows.append((ids, labels, lengths))
        width = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        sequence = torch.full((batch, width), -1, dtype=torch.long)  # sequence index within the row; -1 = padding
        for b, (ids, row_labels, lengths) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
            labels[b, :n] = torch.tensor(row_labels, dtype=torch.long)
            position_ids[b, :n] = torch.cat([torch.arange(k) for k in lengths])
            sequence[b, :n] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        real = sequence >= 0
        labels[(position_ids == 0) | ~real] = IGNORE
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (sequence[:, :, None] == sequence[:, None, :]) & causal & real[:, :, None]
        allowed |= torch.eye(width, dtype=torch.bool)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": real.long(), BLOCK_MASK_KEY: allowed[:, None]}


def _cut(lengths: list[int], limit: int) -> list[int]:
    out, total = [], 0
    for n in lengths:
        if total >= limit:
            break
        out.append(min(n, limit - total))
        total += out[-1]
    return out


class _Truncating:
    """TRL's padding-free collator (flash-attention) behind a per-row truncation to max_length."""

    def __init__(self, inner, max_length: int):
        self.inner, self.max_length = inner, max_length

    def __call__(self, examples: list[dict]):
        n = self.max_length
        return self.inner([{k: (v[:n] if k in ("input_ids", "labels") else v) for k, v in ex.items()} for ex in examples])


def _block_mask_hook(module, args, kwargs):
    """Forward pre-hook: a batch from PackedBatchCollator carries the block mask under its own key; the model gets
    it as ``attention_mask``, in the form its attention takes (bool for sdpa; additive, in the weights' dtype,
    for eager). Any other call (generation, an unpacked batch) passes through untouched."""
    allowed = kwargs.pop(BLOCK_MASK_KEY, None)
    if allowed is None:
        return args, kwargs
    if model_attention(module) == "eager":
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        allowed = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    kwargs["attention_mask"] = allowed
    return args, kwargs


# ------------------------------------------------------------------------------------------------ trainer


class TAMSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with TAMTrainer's additions (see the module docstring) and, for packed or padding-free
    data under sdpa/eager attention, :class:`PackedBatchCollator` plus the model hook that applies its mask.
    Constructor arguments are SFTTrainer's."""

    def __init__(self, model, args=None, *more, **kwargs):
        from tam_hf.trainer.optim_args import check_optim_args
        from tam_hf.trainer.tam_trainer import equip

        if args is not None and kwargs.get("optimizer_cls_and_kwargs") is None and kwargs.get("optimizers", (None,))[0] is None:
            check_optim_args(args)  # the same check as TAMTrainer's: a bad --optim_args fails before tokenising
        packing, padding_free = getattr(args, "packing", False), getattr(args, "padding_free", False)
        if (packing or padding_free) and not isinstance(model, str):
            problems = packing_problems(packing, padding_free, getattr(model.config, "_attn_implementation", None))
            if problems:
                raise ValueError("; ".join(problems))
        super().__init__(model, args, *more, **kwargs)
        equip(self)
        if self.padding_free and model_attention(self.model) != "flash":
            self.data_collator = PackedBatchCollator(self._tokenizer.pad_token_id,
                                                     pad_to_multiple_of=self.args.pad_to_multiple_of)
            self.model.register_forward_pre_hook(_block_mask_hook, with_kwargs=True)


def build_sft_trainer(model, tokenizer, args, train_rows, eval_rows=None, *, fmt: str, max_length: int,
                      completion_only_loss: Optional[bool] = None, instruction_template: Optional[str] = None,
                      packing: bool = False, padding_free: bool = False, chat_template_path: Optional[str] = None,
                      callbacks: list = (), compute_metrics=None, validation_rows=None) -> TAMSFTTrainer:
    """The trainer of a causal-LM run: ``train_rows`` / ``eval_rows`` / ``validation_rows`` are datasets with the
    canonical columns of ``fmt``; ``args`` the run's TrainingArguments; the model may be a peft model. The
    validation set, tokenised like the eval set, is ``trainer.validation_dataset`` (None without one): it is scored
    after training only, so it never enters the evaluations logged during training. ``eval_rows`` may also be a
    dict of named datasets (a staged run's sets of every stage), left in ``trainer.eval_dataset`` as a dict of
    tokenised sets. Raises DataError when the data
    cannot be trained on as asked (no chat template, no assistant markers, nothing left after truncation)."""
    config = sft_config(args, fmt=fmt, max_length=max_length, completion_only_loss=completion_only_loss,
                        packing=packing, padding_free=padding_free, chat_template_path=chat_template_path)
    if fmt == "chat":
        check_chat_template(tokenizer, config.assistant_only_loss, chat_template_path)
    train = to_trl_dataset(train_rows, fmt, instruction_template)
    # TRL tokenises every entry of a dict of eval datasets the same way; the validation set is taken out again
    # below, so that the evaluations during training see the eval set alone, as without one.
    named = eval_rows if isinstance(eval_rows, dict) else {"eval": eval_rows, "validation": validation_rows}
    held_out = {name: to_trl_dataset(rows, fmt, instruction_template) for name, rows in named.items()
                if rows is not None}
    trainer = TAMSFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=held_out or None,
                            processing_class=tokenizer, callbacks=list(callbacks), compute_metrics=compute_metrics)
    trainer.validation_dataset = None
    if held_out and not isinstance(eval_rows, dict):
        trainer.validation_dataset = trainer.eval_dataset.get("validation")
        trainer.eval_dataset = trainer.eval_dataset.get("eval")
    if padding_free and not packing:  # flash-attention (checked above); TRL's padding-free collator does not truncate
        trainer.data_collator = _Truncating(trainer.data_collator, max_length)
    sets = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else \
        {"eval": trainer.eval_dataset, "validation": trainer.validation_dataset}
    for split, ds in (("train", trainer.train_dataset), *sets.items()):
        if ds is not None and len(ds) == 0:
            raise DataError(f"no {split} example has a label left after tokenising (is data.max_length too short?)")
    return trainer
