"""Fault probes on the embedded tiny model: each fault ends in a clear message and an exit code, never in a
traceback, a lost result or a checkpoint that cannot be trusted.

NaN injection, resuming non-finite weights, output directories holding another run, concurrent runs (the lock),
kill -9 in the middle of a checkpoint, SIGTERM then an exact resume, a second Ctrl-C during a save, corrupt
checkpoint files, malformed data, the Hub while offline, a failed push and its retry, and the offline commands
the example recipes promise.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from hf_tiny import PoisonGradient, complete, read_summary, run_raw, run_recipe, set_fields
from transformers import TrainerCallback

import tam_hf.finetune.model
from tam_hf.finetune.errors import (CheckpointError, DataError, EvaluationError, HubUnavailableError,
                                    NonFiniteError, OutputDirError, PushError)
from tam_hf.finetune.config.load import validate_recipe
from tam_hf.finetune.pipeline import finetune

ROOT = Path(__file__).absolute().parent.parent
EXAMPLES = ROOT / "recipes" / "examples"


# ------------------------------------------------------------------------------------------- non-finite


def test_nan_stops_the_run_keeps_the_last_good_checkpoint_and_resuming_nan_weights_fails(tmp_path):
    out = tmp_path / "out"
    recipe = run_recipe(out, max_steps=8, save_steps=2, logging_steps=4)  # step 3: neither logged nor saved
    with pytest.raises(NonFiniteError) as info:
        finetune(recipe, callbacks=[PoisonGradient(3)])
    message = str(info.value)
    assert info.value.exit_code == 1 and "step 3" in message and "checkpoint-2" in message
    assert complete(out / "checkpoint-2") and not (out / "checkpoint-4").exists()
    assert not (out / "model.safetensors").exists()  # the diverged weights are not the run's result
    summary = read_summary(out)
    assert summary["status"] == "failed" and "step 3" in summary["reason"]

    # A checkpoint whose weights are NaN must not "finish" when resumed.
    weights = out / "checkpoint-2" / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    set_fields(recipe, resume=True)
    with pytest.raises(NonFiniteError) as info:
        finetune(recipe)
    assert "checkpoint-2" in str(info.value) and "weights" in str(info.value)
    assert not (out / "checkpoint-4").exists() and read_summary(out)["status"] == "failed"


# ----------------------------------------------------------------------------------- output directories


def test_a_directory_with_another_runs_outputs_is_refused_before_loading_then_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=3, save_steps=3))  # another run: checkpoint-3, weights, summary

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(tam_hf.finetune.model, "load_tokenizer", refuse)
    recipe = run_recipe(out, max_steps=2, save_strategy="no")
    with pytest.raises(OutputDirError) as info:
        finetune(recipe)
    message = str(info.value)
    assert info.value.exit_code == 2 and str(out) in message
    assert "resume: true" in message and "overwrite: true" in message and "checkpoint-3" in message
    monkeypatch.undo()
    summary = finetune(set_fields(recipe, overwrite=True))
    assert summary["steps"] == 2 and not (out / "checkpoint-3").exists()
    assert read_summary(out)["status"] == "completed"


def test_overwrite_removes_only_what_runs_wrote(tmp_path, monkeypatch):
    """A directory that no run recorded writing (outputs of an older tool, a saved model, a user's files) is never
    cleared: overwrite refuses it before loading, naming what it would not remove; so does a run's directory
    where a user added a file."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    recipe = set_fields(run_recipe(out, max_steps=2, save_strategy="no"), overwrite=True)
    with pytest.raises(OutputDirError) as info:
        finetune(recipe)
    assert info.value.exit_code == 2 and "model.safetensors" in str(info.value) and "nothing was removed" in str(info.value)
    assert (out / "model.safetensors").read_bytes() == b"weights" and (out / "checkpoint-3").is_dir()

    other = tmp_path / "other"
    finetune(run_recipe(other, max_steps=2, save_strategy="no"))
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError) as info:
        finetune(set_fields(run_recipe(other, max_steps=2, save_strategy="no"), overwrite=True))
    assert "notes.txt" in str(info.value) and (other / "model.safetensors").is_file()
    (other / "notes.txt").unlink()
    assert finetune(set_fields(run_recipe(other, max_steps=1, save_strategy="no"), overwrite=True))["steps"] == 1


LOCK_HOLDER = """\
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_concurrent_run_is_refused_naming_the_pid_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    from tam_hf.finetune.outputs import LOCK_NAME

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = run_recipe(out, max_steps=2, save_strategy="no")
        with pytest.raises(OutputDirError) as info:
            finetune(recipe)
        assert info.value.exit_code == 2 and f"pid {holder.pid}" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # the dead holder's lock file stays
    assert finetune(recipe)["steps"] == 2
    assert f"stale lock of process {holder.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_only_rank_0_of_a_launched_run_locks(tmp_path, monkeypatch):
    from tam_hf.finetune.outputs import LOCK_NAME, run_lock

    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path):
        assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())


# ------------------------------------------------------------------------------------------ checkpoints


KILL_MID_SAVE = """\
import os, signal, sys
import torch
real_save = torch.save

def save(obj, f, *args, **kwargs):  # the optimizer of checkpoint-4 is written after its weights: die between
    if "checkpoint-4" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from tam_hf.finetune.config.load import load_recipe
from tam_hf.finetune.pipeline import finetune
finetune(load_recipe(sys.argv[1]))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    # the checkout under test, also when another copy of tam_hf is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return env


def test_kill_9_in_the_middle_of_a_save_then_resume_uses_the_previous_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(run_raw(out, max_steps=6, save_steps=2)))
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # half written: weights, no optimizer
    assert complete(out / "checkpoint-2") and not complete(out / "checkpoint-4")

    summary = finetune(set_fields(run_recipe(out, max_steps=6, save_steps=2), resume=True))
    assert summary["resumed_from"] == str(out / "checkpoint-2")
    assert any("checkpoint-4" in s for s in summary["skipped_checkpoints"])
    assert summary["steps"] == 6 and complete(out / "checkpoint-4") and complete(out / "checkpoint-6")


def _wait_for_logged_steps(stream, n):
    """Reads the run's printed log lines (one per logged step) until `n` steps have been logged."""
    seen = 0
    for line in stream:
        seen += "'loss'" in line
        if seen >= n:
            return
    raise AssertionError("the run ended before it was signalled (its stderr is in stderr.txt)")


def test_sigterm_saves_at_the_end_of_the_step_and_the_resumed_run_is_exact(tmp_path):
    steps = 12
    reference = finetune(run_recipe(tmp_path / "ref", max_steps=steps, logging_steps=1, save_strategy="no"))

    out = tmp_path / "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(run_raw(out, max_steps=steps, logging_steps=1, save_strategy="no")))
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full stderr pipe would stall the run
        proc = subprocess.Popen([sys.executable, "-m", "tam_hf.cli", str(path)], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            _wait_for_logged_steps(proc.stdout, 2)
            proc.send_signal(signal.SIGTERM)  # what a scheduler sends before it preempts the job
            proc.stdout.read()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "SIGTERM: saving a checkpoint after this step" in err, err[-3000:]
    assert proc.returncode in (0, 143)  # 143 = 128 + SIGTERM once the CLI maps the interrupted status
    interrupted = read_summary(out)
    assert interrupted["status"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    stopped = interrupted["steps"]
    assert 2 <= stopped < steps and complete(out / f"checkpoint-{stopped}")

    resumed = finetune(set_fields(run_recipe(out, max_steps=steps, logging_steps=1, save_strategy="no"), resume=True))
    assert resumed["steps"] == steps and resumed["train_loss"] == reference["train_loss"]
    final, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


class _CtrlCAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def test_a_second_ctrl_c_during_a_save_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C arrives while checkpoint-2 is being written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        finetune(run_recipe(out, max_steps=4, save_steps=1), callbacks=[_CtrlCAt(2)])
    assert complete(out / "checkpoint-1") and not (out / "checkpoint-2").exists()


def test_corrupt_checkpoint_files_are_skipped_or_named(tmp_path):
    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=4, save_steps=2))
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    summary = finetune(set_fields(run_recipe(out, max_steps=6, save_steps=2), resume=True))
    assert summary["resumed_from"] == str(out / "checkpoint-2")
    assert any("checkpoint-4" in s and "optimizer.pt" in s for s in summary["skipped_checkpoints"])

    optimizer = out / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(bytes(optimizer.stat().st_size))  # same size, garbage: found only when loaded
    with pytest.raises(CheckpointError) as info:
        finetune(set_fields(run_recipe(out, max_steps=8, save_steps=2), resume=True))
    assert info.value.exit_code == 1 and "checkpoint-6" in str(info.value)
    assert read_summary(out)["status"] == "failed"


# ------------------------------------------------------------------------------------------------- data


CHAT_ROWS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             {"messages": [{"role": "user", "content": "hi"}, {"content": "no role here"}]}]


@pytest.mark.parametrize("name, content, data, fragments", [
    ("binary.jsonl", b"\x00\x01\xff\xfe" * 64, {}, ["binary.jsonl", "binary"]),
    ("empty.jsonl", b"", {}, ["empty.jsonl", "empty"]),
    ("broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', {},
     ["broken.jsonl", "line 2", "not valid JSON"]),
    ("nocol.jsonl", b'{"question": "a", "completion": "b"}\n', {}, ["nocol.jsonl", "'prompt'", "data.columns"]),
    ("number.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "d"}\n', {},
     ["number.jsonl", "line 2", "'prompt'", "string", "int"]),
    ("null.jsonl", b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": null}\n', {},
     ["null.jsonl", "line 3", "'completion'", "string"]),
    ("chat.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode(), {"format": "chat"},
     ["chat.jsonl", "line 2", "'messages'", "turn 2", "role"]),
])
def test_bad_data_is_a_one_line_message_naming_file_line_and_column(tmp_path, name, content, data, fragments):
    from tam_hf.finetune.data import load_raw

    path = tmp_path / name
    path.write_bytes(content)
    raw = run_raw(tmp_path / "out")
    raw["data"].update(train_file=str(path), **data)
    with pytest.raises(DataError) as info:
        load_raw(validate_recipe(raw).data)  # what the run loads before TRL tokenises anything
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("section, value, variable", [
    ("model", {"name": "someone/not-in-the-cache"}, "HF_HUB_OFFLINE=1"),
    ("data", {"format": "prompt_completion", "dataset": "someone/not-in-the-cache"}, "HF_DATASETS_OFFLINE=1"),
])
def test_the_hub_while_offline_is_one_line_naming_the_id_the_setting_and_a_local_way(tmp_path, section, value, variable):
    raw = run_raw(tmp_path / "out")
    raw[section] = value
    with pytest.raises(HubUnavailableError) as info:
        finetune(validate_recipe(raw))
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert "someone/not-in-the-cache" in message and variable in message and "local" in message
    failed = read_summary(tmp_path / "out")  # the run's record says where it stopped ...
    assert failed["status"] == "failed" and failed["phase"] == "build" and "someone/not-in-the-cache" in failed["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".tam_hf_run.json", "summary.json"]
    # ... and a run that trained nothing does not block the next one (no overwrite needed)
    assert finetune(run_recipe(tmp_path / "out", max_steps=1, save_strategy="no"))["status"] == "completed"


def test_bad_data_fails_the_run_before_anything_is_removed_or_written(tmp_path):
    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=2, save_strategy="no"))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 7}\n')
    raw = run_raw(out, max_steps=2, save_strategy="no")
    raw["data"]["train_file"] = str(path)
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        finetune(set_fields(validate_recipe(raw), overwrite=True))
    assert (out / "model.safetensors").is_file() and read_summary(out)["status"] == "completed"  # the old run is intact


# ----------------------------------------------------------------------------------------- evaluation


def test_a_perplexity_beyond_float_range_is_null_with_a_note(tmp_path, monkeypatch):
    from tam_hf.finetune import sft
    from tam_hf.commands.run import format_summary

    monkeypatch.setattr(sft.TAMSFTTrainer, "evaluate", lambda self, *a, **k: {"eval_loss": 800.0})
    raw = run_raw(tmp_path / "out", max_steps=1, save_strategy="no")
    raw["data"]["eval_file"] = "embedded:demo_eval.jsonl"
    raw["eval"] = {"metrics": ["perplexity"]}
    summary = finetune(validate_recipe(raw))
    assert summary["eval"] == {"loss": 800.0, "perplexity": None}
    assert read_summary(tmp_path / "out")["eval"]["perplexity"] is None  # JSON null, not Infinity
    assert "beyond float range" in summary["notes"][0]
    assert "eval perplexity: n/a" in format_summary(summary) and "note: eval perplexity is null" in format_summary(summary)


def test_a_failing_lm_eval_keeps_the_saved_run_exits_1_and_names_the_eval_command(tmp_path):
    pytest.importorskip("lm_eval")
    task = tmp_path / "broken.yaml"
    task.write_text(yaml.safe_dump({"task": "tam_broken", "dataset_path": "json", "test_split": "test",
                                    "dataset_kwargs": {"data_files": {"test": "no_such_rows.jsonl"}},
                                    "output_type": "multiple_choice", "doc_to_text": "{{q}}",
                                    "doc_to_choice": "{{c}}", "doc_to_target": 0}))
    out = tmp_path / "out"
    raw = run_raw(out, max_steps=1, save_strategy="no")
    raw["eval"] = {"metrics": [], "lm_eval": {"tasks": [str(task)], "limit": 2}}
    raw["hub"] = {"repo_id": "someone/tiny-tam"}  # the Hub step still runs after the failure: nothing is lost
    with pytest.raises(EvaluationError) as info:
        finetune(validate_recipe(raw))
    message = str(info.value)
    assert info.value.exit_code == 1 and f"saved at {out}" in message and f"tam-finetune eval {out}" in message
    assert (out / "model.safetensors").is_file() and (out / "hub_upload" / "README.md").is_file()
    summary = read_summary(out)
    assert summary["status"] == "completed" and summary["lm_eval_error"] == message
    assert not (out / "lm_eval" / "results.json").exists()


def test_the_recipe_a_run_writes_neither_resumes_nor_wipes_it(tmp_path):
    from tam_hf.commands.run import main as run_command
    from tam_hf.finetune.config.load import load_recipe

    out = tmp_path / "out"
    finetune(run_recipe(out, max_steps=2, save_steps=2))
    finetune(set_fields(run_recipe(out, max_steps=3, save_steps=2), resume=True))  # this run had resume: true
    written = out / "recipe.yaml"
    text = written.read_text()
    assert "resume:" not in text and "overwrite:" not in text
    assert "rerun with: tam-finetune " + str(written) in text.splitlines()[0]
    recipe = load_recipe(written)
    assert (recipe.resume, recipe.overwrite, recipe.training["max_steps"]) == (False, False, 3)
    before = sorted(p.name for p in out.iterdir())
    assert run_command([str(written)]) == 2  # the "rerun with" line refuses the directory, naming both ways
    assert sorted(p.name for p in out.iterdir()) == before and read_summary(out)["steps"] == 3


# -------------------------------------------------------------------------------------------------- hub


def test_a_failed_push_keeps_outputs_exits_1_and_names_the_retry_command_which_works(tmp_path, monkeypatch):
    import huggingface_hub

    from tam_hf.commands.push import main as push_main

    out = tmp_path / "out"
    raw = run_raw(out, max_steps=1, save_strategy="no")
    raw["hub"] = {"push": True, "repo_id": "someone/tiny-tam"}
    with pytest.raises(PushError) as info:
        finetune(validate_recipe(raw))  # offline: the push fails
    assert info.value.exit_code == 1 and f"tam-finetune push {out}" in str(info.value)
    assert (out / "model.safetensors").is_file() and (out / "hub_upload" / "README.md").is_file()
    assert read_summary(out)["status"] == "completed" and "failed" in read_summary(out)["hub"]
    assert push_main([str(out)]) == 1  # still offline: the retry fails the same way, nothing is touched

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploads.append(("upload", folder_path, repo_id))
            return type("Info", (), {"oid": "abc123"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_main([str(out)]) == 0
    assert uploads == [("create", "someone/tiny-tam", True), ("upload", str(out / "hub_upload"), "someone/tiny-tam")]
    assert read_summary(out)["hub"].startswith("pushed to")


# ------------------------------------------------------------------------------------- offline headers


def _commands(header: str) -> list[str]:
    """The `tam-finetune RECIPE ...` commands in a recipe's leading comment, continuation lines joined (not the
    commands on a finished run, `tam-finetune eval|push RUN_DIR`: they read no recipe of their own)."""
    other = tuple(f"tam-finetune {name} " for name in ("eval", "push", "compare"))
    return [line for line in header.replace("\\\n", " ").splitlines()
            if line.startswith("tam-finetune ") and not line.startswith(other)]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_command_a_header_calls_offline_reads_only_local_files(path):
    from tam_hf.finetune.config.load import load_recipe

    header = "\n".join(line.lstrip("#").strip() for line in path.read_text().split("\nmodel:")[0].splitlines())
    at = header.lower().find("offline")
    if at < 0:
        return
    # The commands after the word "offline"; without any there, the header's own command is the offline one.
    offline = _commands(header[at:]) or _commands(header)
    assert offline, f"{path.name}: the header mentions offline use but gives no command"
    for command in offline:
        expanded = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=60)
        argv = expanded.stdout.split("\0")[:-1]
        if expanded.returncode != 0 or any(not a for a in argv):
            pytest.skip(f"cannot expand {command!r} here: {expanded.stderr.strip()}")
        try:
            recipe = load_recipe(ROOT / argv[1], argv[2:])
        except Exception as exc:  # e.g. the GGUF package is not installed
            if "not found" in str(exc):
                pytest.skip(str(exc))
            raise
        assert recipe.model.name.startswith("embedded:") or Path(recipe.model.name).is_dir(), command
        assert recipe.data.dataset is None or Path(recipe.data.dataset).exists(), command
        for key in ("train_file", "eval_file"):
            files = getattr(recipe.data, key)
            for item in [files] if isinstance(files, str) else files or []:
                assert item.startswith("embedded:") or Path(item).is_file(), command
