"""LoRA, QLoRA and full fine-tuning each train a few steps on the embedded tiny model; Ctrl-C leaves a
resumable checkpoint; a push prepares an upload folder with a model card and fails offline losing nothing
(exit code 1 and the command that retries it)."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from tam_hf.finetune.errors import PushError
from tam_hf.finetune.pipeline import finetune
from tam_hf.finetune.training_args import build_training_arguments
from tam_hf.finetune.model import model_path
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.config.schema import ModelConfig


def _recipe(tmp_path, **sections):
    raw = {
        "model": {"name": "embedded:tiny-llama"},
        "data": {"format": "prompt_completion", "train_file": "embedded:demo_train.jsonl",
                 "eval_file": "embedded:demo_eval.jsonl", "max_length": 32, "max_eval_samples": 16},
        "optimizer": {"name": "adatamw", "lr": 1e-3},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 100,
                     "output_dir": str(tmp_path / "out"), "disable_tqdm": True},
    }
    raw.update(sections)
    return validate_recipe(raw)


def _base_state():
    model = AutoModelForCausalLM.from_pretrained(model_path(ModelConfig(name="embedded:tiny-llama")))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_finetune_changes_every_trained_matrix(tmp_path):
    recipe = _recipe(tmp_path, finetune={"method": "full"}, optimizer={"name": "tam", "lr": 0.05, "momentum": 0.9})
    summary = finetune(recipe)
    out = Path(summary["output_dir"])
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    before = _base_state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and len(changed) >= len(before) // 2
    assert summary["steps"] == 4 and 0.0 <= summary["damping"]["mean"] <= 1.0
    assert summary["eval"]["perplexity"] == pytest.approx(torch.tensor(summary["eval"]["loss"]).exp().item())
    assert validate_recipe(__import__("yaml").safe_load((out / "recipe.yaml").read_text())) == recipe
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_lora_trains_adapter_only_and_saves_a_loadable_adapter(tmp_path):
    from peft import PeftModel

    summary = finetune(_recipe(tmp_path, finetune={"method": "lora", "lora": {"r": 4, "alpha": 8}}))
    out = Path(summary["output_dir"])
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert not any("lora" not in k for k in adapter)  # the base is not in the adapter file
    before = _base_state()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path(ModelConfig(name="embedded:tiny-llama"))), out)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], base[k]) for k in before)  # LoRA left the base untouched


class _ModuleTypes(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.types = {type(m).__name__ for m in model.modules()}


def test_qlora_trains_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    seen = _ModuleTypes()
    summary = finetune(_recipe(tmp_path, finetune={"method": "qlora", "lora": {"r": 4, "alpha": 8}},
                               optimizer={"name": "adatam", "lr": 1e-3}), callbacks=[seen])
    assert "Linear4bit" in seen.types  # the frozen base really is bitsandbytes 4-bit
    out = Path(summary["output_dir"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(summary["train_loss"]))
    assert "quantization: 4bit" in (out / "recipe.yaml").read_text()


def test_lora_on_an_8bit_base_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    seen = _ModuleTypes()
    summary = finetune(_recipe(tmp_path, model={"name": "embedded:tiny-llama", "quantization": "8bit"},
                               finetune={"method": "lora", "lora": {"r": 4}}), callbacks=[seen])
    assert "Linear8bitLt" in seen.types and summary["steps"] == 4
    adapter = load_file(Path(summary["output_dir"]) / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_merged_upload_holds_a_plain_model_and_card_links_hub_base(tmp_path):
    from tam_hf.finetune.hub import model_card, prepare_upload
    from tam_hf.finetune.model import load_model, load_tokenizer

    recipe = _recipe(tmp_path, hub={"repo_id": "someone/merged", "artifact": "merged"})
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe, tokenizer)
    folder = prepare_upload(model, tokenizer, recipe, {"steps": 0, "train_loss": 1.0, "eval": {}}, tmp_path)
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(folder / "model.safetensors"))
    assert "library_name: transformers" in (folder / "README.md").read_text()
    recipe.model.name, recipe.data.dataset = "HuggingFaceTB/SmolLM2-135M-Instruct", "tatsu-lab/alpaca"
    card = model_card(recipe, {"steps": 3, "train_loss": 1.0})
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "- tatsu-lab/alpaca" in card


def test_lora_classifier_reports_classification_metrics(tmp_path):
    rows = [{"text": f"{w} {i}", "label": "pos" if w == "good" else "neg"} for i in range(12) for w in ("good", "bad")]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(
        tmp_path, task="sequence_classification",
        data={"format": "classification", "train_file": str(path), "eval_file": str(path), "max_length": 16},
        eval={"metrics": ["accuracy", "f1", "mcc"]}, finetune={"method": "lora", "lora": {"r": 4}},
    )
    summary = finetune(recipe)
    assert set(summary["eval"]) == {"loss", "accuracy", "f1", "mcc"}
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    config = json.loads((Path(summary["output_dir"]) / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def test_full_regression_reports_correlations(tmp_path):
    rows = [{"text": f"{'good ' * (i % 4)}day", "label": float(i % 4)} for i in range(24)]
    path = tmp_path / "reg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(
        tmp_path, task="sequence_classification", finetune={"method": "full"},
        data={"format": "classification", "target": "score", "train_file": str(path), "eval_file": str(path)},
    )
    summary = finetune(recipe)
    assert set(summary["eval"]) == {"loss", "pearson", "spearman"}
    assert json.loads((Path(summary["output_dir"]) / "config.json").read_text())["problem_type"] == "regression"


class _CtrlC(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            signal.raise_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    recipe = _recipe(tmp_path, finetune={"method": "full"})
    first = finetune(recipe, callbacks=[_CtrlC()])
    assert first["interrupted"] and 2 <= first["steps"] < 4
    assert (Path(first["checkpoint"]) / "optimizer.pt").is_file()
    recipe.resume = True
    second = finetune(recipe)
    assert second["steps"] == 4 and "interrupted" not in second
    state = json.loads((Path(first["checkpoint"]) / "trainer_state.json").read_text())
    assert state["global_step"] == first["steps"]


def test_push_prepares_folder_with_card_and_offline_failure_loses_nothing(tmp_path, monkeypatch, capsys):
    secret = "hf_thisIsNotARealTokenButMustNeverAppear"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = _recipe(tmp_path, hub={"push": True, "repo_id": "someone/tiny-tam"},
                     finetune={"method": "lora", "lora": {"r": 4}},
                     optimizer={"name": "adatam", "lr": 1e-3, "decay_rate": 0.8})
    with pytest.raises(PushError) as info:  # offline: exit code 1, after everything was saved locally
        finetune(recipe)
    summary = info.value.summary
    assert "failed" in summary["hub"] and "Nothing is lost" in summary["hub"]
    assert f"tam-finetune push {summary['output_dir']}" in str(info.value)
    folder = Path(summary["hub_folder"])
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert (Path(summary["output_dir"]) / "adapter_model.safetensors").is_file()  # the local save happened first
    card = (folder / "README.md").read_text()
    assert "base_model:" not in card  # a local/embedded base is not a Hub id: no broken metadata link
    for fragment in ("lora fine-tune of `embedded:tiny-llama`", "library_name: peft", "adatam", "| decay_rate | 0.8 |",
                     "| lr | 0.001 |", "arXiv:2412.18790", "| loss |", "tam_hf 0.1.0", "Torque-Aware Momentum"):
        assert fragment in card, fragment
    every_file = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file())
    assert secret not in every_file and secret not in capsys.readouterr().out


def test_optimizer_section_maps_onto_training_arguments(tmp_path):
    args = build_training_arguments(_recipe(tmp_path, optimizer={
        "name": "tam", "lr": 0.1, "momentum": 0.8, "decay_rate": 0.95, "weight_decay": 0.01}))
    assert args.optim == "tam" and args.learning_rate == 0.1 and args.weight_decay == 0.01
    assert args.adam_beta1 == 0.8  # the registry feeds TAM's momentum through TrainingArguments.adam_beta1
    assert args.optim_args == "decay_rate=0.95"
    adam = build_training_arguments(_recipe(tmp_path, optimizer={"name": "adamw", "lr": 1e-4, "betas": [0.8, 0.99],
                                                                 "eps": 1e-6}))
    assert (adam.optim, adam.adam_beta1, adam.adam_beta2, adam.adam_epsilon) == ("adamw_torch", 0.8, 0.99, 1e-6)
    sgd = build_training_arguments(_recipe(tmp_path, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.8}))
    assert sgd.optim == "sgd" and sgd.optim_args == "momentum=0.8"  # transformers' SGD reads momentum from optim_args


def test_push_calls_the_hub_with_the_prepared_folder(tmp_path, monkeypatch):
    import huggingface_hub

    from tam_hf.finetune.hub import push

    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            assert "token" not in kwargs  # huggingface_hub finds the login itself; we never hold a token
            calls.append(("init", kwargs))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", folder_path, repo_id))
            return type("Info", (), {"oid": "abc123"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    ok, message = push(tmp_path, "someone/model", private=True)
    assert calls[1:] == [("create_repo", "someone/model", True, True), ("upload_folder", str(tmp_path), "someone/model")]
    assert ok and message.startswith("pushed to https://huggingface.co/someone/model")
