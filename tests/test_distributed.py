"""Exact torque statistics across processes: 1 process (batch 8) vs 2 processes (batch 4 each) under DDP and
DeepSpeed ZeRO-1/2/3 (+ CPU optimizer offload) through transformers.Trainer (the test's subclass and the project's
TAMTrainer), the FSDP2 path (DTensor unit check and a fully_shard model in a plain loop: accelerate runs FSDP only
on accelerators), the statistics all-reduce count, and the guardrails.

Three launches run side by side (tests/dist/parity.py): the 1-process reference, a torchrun with DDP and the
DTensor/FSDP2 checks, and a torchrun with every DeepSpeed configuration (only where deepspeed is installed: only
the DeepSpeed tests skip without it); the tests then compare the files they wrote. The single-process tests at
the end need no launch.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tam_hf.trainer.distributed import DistributedConfigError, check_deepspeed_config, check_training_args
from tam_hf.optim import TAM, AdaTAM
from tam_hf.optim.sharded import Fragment, ShardedSource, ShardedStats

HERE = Path(__file__).parent
PARITY = HERE / "dist" / "parity.py"

# backend -> cases it runs in the 2-process launches (parity.py CASES); ddp in the torch launch, the rest under
# DeepSpeed
MATRIX = {
    "ddp": ["adatam-full", "tam-full", "adatam-lora", "tam-lora"],
    "zero1": ["adatam-full", "adatam-lora"],
    "zero2": ["adatam-full", "tam-full", "adatam-lora", "tam-lora", "adatam-global"],
    "zero3": ["adatam-full", "tam-full", "adatam-lora", "tam-lora", "adatam-global"],
    "zero3-subgroups": ["adatam-full"],  # sub_group_size 3000: several flat partitions, each stepped alone
    "zero2-accum": ["adatam-full"],  # per-rank batch 2 x 2 gradient accumulation steps
    "zero2-offload": ["tam-full"],
    "zero3-offload": ["adatam-full"],
    "zero3-tamtrainer": ["adatam-full"],  # the real TAMTrainer, optim="adatam", with the attach() hook
    "zero2-tamtrainer": ["adatam-lora"],
    # 2 steps, checkpoint, a fresh Trainer resumes for 2 more: the optimizer state (s per fragment included)
    # must come back through DeepSpeed's checkpoint
    "zero2-resume": ["adatam-full"],
    "zero3-resume": ["adatam-full"],
}
PARAM_ATOL = 2e-5  # float32 reduction-order noise through 4 AdaTAM steps is ~4e-6; the naive ZeRO run is off by ~3e-3
DAMPING_ATOL = 1e-6


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


TORCH_BACKENDS = ["ddp", "dtensor"]  # no DeepSpeed: these run wherever torch and transformers do
DEEPSPEED_MATRIX = {b: c for b, c in MATRIX.items() if b != "ddp"}


def _deepspeed_wanted(session) -> bool:
    """Launch the DeepSpeed half only when a selected test needs it and deepspeed can be imported."""
    import importlib.util

    return (importlib.util.find_spec("deepspeed") is not None
            and any("deepspeed_runs" in getattr(item, "fixturenames", ()) for item in session.items))


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory):
    """Starts, side by side: the 1-process reference, the 2-process torch launch (DDP, DTensor, FSDP2) and, when
    wanted, the 2-process DeepSpeed launch (ZeRO-1/2/3, the naive control, the guards). Each dependent fixture
    waits for its own launch, so a DeepSpeed failure or absence touches only the DeepSpeed tests."""
    out = tmp_path_factory.mktemp("parity")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmds = {
        "ref": [sys.executable, str(PARITY), str(out), "ref"],
        "torch": torchrun + [str(PARITY), str(out), f"ddp:{'+'.join(MATRIX['ddp'])}", "dtensor"],
    }
    if _deepspeed_wanted(request.session):
        backends = [f"{b}:{'+'.join(cases)}" for b, cases in DEEPSPEED_MATRIX.items()] + ["zero2-naive", "guard"]
        cmds["deepspeed"] = torchrun + [str(PARITY), str(out)] + backends
    procs = {}
    for name, cmd in cmds.items():
        with open(out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    yield out, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(launches, name):
    out, procs = launches
    proc = procs[name]
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    if rc != 0:
        pytest.fail(f"{name} launch failed ({rc}):\n{(out / f'{name}.log').read_text()[-4000:]}")
    return out


@pytest.fixture(scope="module")
def torch_runs(launches):
    _wait(launches, "ref")
    return _wait(launches, "torch")


@pytest.fixture(scope="module")
def deepspeed_runs(launches):
    pytest.importorskip("deepspeed")
    _wait(launches, "ref")
    return _wait(launches, "deepspeed")


def _load(out, name):
    return torch.load(out / f"{name}.pt", weights_only=False)


DS_PAIRS = [(b, c) for b, cases in DEEPSPEED_MATRIX.items() for c in cases]


def _check_parity(out, backend, case):
    ref = _load(out, f"ref-{case}-rank0")
    held = set()
    for rank in (0, 1):
        got = _load(out, f"{backend}-{case}-rank{rank}")
        assert got["world"] == 2
        assert got["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            torch.testing.assert_close(got["params"][name], p, atol=PARAM_ATOL, rtol=0, msg=f"{name} rank {rank}")
        for name, m in got["exp_avg"].items():  # ZeRO: read back through safe_get_full_optimizer_state
            torch.testing.assert_close(m, ref["exp_avg"][name], atol=PARAM_ATOL, rtol=1e-3, msg=f"exp_avg {name}")
        assert got["exp_avg"].keys() == ref["exp_avg"].keys()
        for name, ds in got["damping"].items():  # every fragment of a tensor carries the whole tensor's damping
            assert ds, name
            for d in ds:
                assert d == pytest.approx(ref["damping"][name][0], abs=DAMPING_ATOL), f"{name} rank {rank}"
            held.add(name)
        if got["installed"]:  # the collective readout: every tensor's damping on every rank
            assert got["gathered_damping"].keys() == ref["damping"].keys()
            for name, d in got["gathered_damping"].items():
                assert d == pytest.approx(ref["damping"][name][0], abs=DAMPING_ATOL), f"{name} rank {rank}"
    assert held == set(ref["damping"]), "some tensors' damping is held by no rank"
    assert any(abs(v[0] - 0.5) > 1e-3 for v in ref["damping"].values()), "damping never moved: a vacuous check"


@pytest.mark.parametrize("case", MATRIX["ddp"])
def test_ddp_two_processes_match_one(torch_runs, case):
    _check_parity(torch_runs, "ddp", case)


@pytest.mark.parametrize("backend,case", DS_PAIRS, ids=[f"{b}-{c}" for b, c in DS_PAIRS])
def test_deepspeed_two_processes_match_one(deepspeed_runs, backend, case):
    _check_parity(deepspeed_runs, backend, case)


@pytest.mark.parametrize("case", MATRIX["ddp"])
def test_ddp_steps_without_extra_collectives(torch_runs, case):
    for rank in (0, 1):
        got = _load(torch_runs, f"ddp-{case}-rank{rank}")
        assert not got["installed"]  # whole tensors need no statistics layer
        assert got["allreduces"] == [0] * 4 and got["steps_per_train_step"] == [1] * 4


@pytest.mark.parametrize("backend,case", DS_PAIRS, ids=[f"{b}-{c}" for b, c in DS_PAIRS])
def test_deepspeed_statistics_cost_one_allreduce_per_step_call(deepspeed_runs, backend, case):
    for rank in (0, 1):
        got = _load(deepspeed_runs, f"{backend}-{case}-rank{rank}")
        assert len(got["allreduces"]) == (2 if "resume" in backend else 4)  # steps this Trainer took
        assert got["installed"]
        # DeepSpeed steps the client optimizer once per param group (ZeRO-3: per sub-group); each call reduces once
        calls = got["steps_per_train_step"]
        if "subgroups" in backend:
            assert len(set(calls)) == 1 and calls[0] > got["n_groups"]
        else:
            assert calls == [got["n_groups"]] * len(got["allreduces"])
        assert got["allreduces"] == calls


def test_zero_without_the_layer_trains_but_is_not_exact(deepspeed_runs):
    """The control: ZeRO-2 without ShardedStats trains all its steps, but takes cosines of flat partitions and
    drifts from the 1-process run (a crashed or diverged control proves nothing)."""
    ref = _load(deepspeed_runs, "ref-adatam-full-rank0")
    for rank in (0, 1):
        naive = _load(deepspeed_runs, f"zero2-naive-adatam-full-rank{rank}")
        assert naive["global_step"] == 4 and naive["steps_per_train_step"] == [naive["n_groups"]] * 4
        assert not naive["installed"] and naive["allreduces"] == [0] * 4
        assert all(torch.isfinite(p).all() for p in naive["params"].values())
        err = max((naive["params"][n] - p).abs().max().item() for n, p in ref["params"].items())
        assert 50 * PARAM_ATOL < err < 1.0, err


def test_trainer_refuses_configs_that_replace_tam(deepspeed_runs):
    for rank in (0, 1):
        messages = _load(deepspeed_runs, f"guard-rank{rank}")
        assert '"optimizer" block' in messages["optimizer-block"]
        assert "zero_force_ds_cpu_optimizer" in messages["offload-without-flag"]
        assert "DeepSpeedCPUAdam" in messages["offload-without-flag"]


def test_dtensor_shards_match_whole_tensors(torch_runs):
    for rank in (0, 1):
        res = _load(torch_runs, f"dtensor-rank{rank}")
        for case in ("adatam", "adatamw", "tam", "adatam-global"):
            r = res[case]
            assert r["param_err"] < 1e-6, case
            torch.testing.assert_close(r["damping"], r["damping_ref"], atol=1e-7, rtol=0)
            assert r["n_groups"] == 2 and r["allreduces_per_step"] == [1] * 4  # one per step for all groups
            assert r["state_is_dtensor"]  # checkpoints (DCP) see DTensor state
        assert 0 in res["adatam"]["local_numels"] or rank == 0  # the uneven split left rank 1 an empty shard


def test_dtensor_without_the_layer_does_not_step_like_whole_tensors(torch_runs):
    """The control: the same DTensors stepped without the statistics layer. With this torch, DTensor cannot run
    TAM's per-tensor reductions at all (a sharding-propagation error); should a later torch run them, they must
    cost extra collectives or drift. Any other failure is a bug, not a control."""
    for rank in (0, 1):
        naive = _load(torch_runs, f"dtensor-rank{rank}")["adatam-naive"]
        if "error" in naive:
            assert "shard" in naive["error"].lower(), naive["error"]  # raised by DTensor's sharding propagation
            assert naive["steps_done"] == 0
        else:
            assert len(naive["allreduces_per_step"]) == 4
            assert naive["param_err"] > 1e-6 or naive["allreduces_per_step"][0] > 1


def test_fsdp2_model_matches_one_process_and_resumes_from_a_dcp_checkpoint(torch_runs):
    for rank in (0, 1):
        res = _load(torch_runs, f"fsdp2-rank{rank}")
        for case in ("adatam", "tam"):
            r = res[case]
            assert r["dtensor_params"] > 0  # fully_shard really turned the parameters into DTensors
            assert r["param_err"] < PARAM_ATOL, case
            torch.testing.assert_close(r["damping"], r["damping_ref"], atol=DAMPING_ATOL, rtol=0)
            assert (r["damping_ref"] - 0.5).abs().max() > 1e-3
            assert r["n_groups"] == 2 and r["allreduces"] == 4  # 4 steps, one all-reduce each for both groups
        resumed = res["adatam-resume"]  # a torch.distributed.checkpoint save/load half-way
        assert resumed["param_err"] < PARAM_ATOL
        torch.testing.assert_close(resumed["damping"], resumed["damping_ref"], atol=DAMPING_ATOL, rtol=0)


# ------------------------------------------------------------------------------- single process, no launch


def _split_flat(cls, kwargs, steps=5):
    """Three tensors in one flat buffer, the first split into two fragments: must equal whole tensors."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    ps = [torch.randn(s) for s in shapes]
    whole = [p.clone().requires_grad_() for p in ps]
    flat = torch.cat([p.reshape(-1) for p in ps]).requires_grad_()
    opt_whole, opt_flat = cls(whole, **kwargs), cls([flat], **kwargs)
    frags = [Fragment(0, 5, 0), Fragment(5, 7, 0), Fragment(12, 5, 1), Fragment(17, 8, 2)]
    stats = ShardedStats(opt_flat, [ShardedSource(flat, "flat", frags, ["a", "b", "c"])])
    for _ in range(steps):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(whole, grads):
            p.grad = g.clone()
        flat.grad = torch.cat([g.reshape(-1) for g in grads])
        opt_whole.step()
        opt_flat.step()
    return whole, flat, opt_whole, opt_flat, stats


@pytest.mark.parametrize("cls,kwargs", [
    (AdaTAM, dict(lr=1e-2)),
    (TAM, dict(lr=1e-2, weight_decay=0.1)),
    (AdaTAM, dict(lr=1e-2, cosine_scope="global")),
    (AdaTAM, dict(lr=1e-2, foreach=True)),
], ids=["adatam", "tam-wd", "global", "foreach"])
def test_fragments_of_a_flat_buffer_step_like_whole_tensors(cls, kwargs):
    whole, flat, opt_whole, opt_flat, stats = _split_flat(cls, kwargs)
    torch.testing.assert_close(flat.detach(), torch.cat([p.detach().reshape(-1) for p in whole]), atol=1e-7, rtol=0)
    d = opt_whole.damping()["d"].tolist()
    local = stats.local_damping()
    assert local["a"] == pytest.approx([d[0], d[0]]) and local["b"] == pytest.approx([d[1]])
    assert local["c"] == pytest.approx([d[2]])
    # state stays keyed by the flat buffer (what DeepSpeed checkpoints and maps back), with flat-sized buffers
    assert list(opt_flat.state) == [flat]
    assert opt_flat.state[flat][opt_flat.state_buffers[0]].shape == flat.shape
    assert opt_flat.param_groups[0]["params"] == [flat]
    assert stats.allreduce_calls == 0  # no process group: nothing to reduce


def test_without_the_layer_a_flat_buffer_is_one_tensor():
    """The control for the test above: the same start and gradients on the flat buffer, stepped without the layer,
    take one cosine over the concatenation and drift from the whole tensors, whose dampings differ."""
    whole, flat, opt_whole, _, _ = _split_flat(AdaTAM, dict(lr=1e-2))
    shapes = [(4, 3), (5,), (2, 2, 2)]
    torch.manual_seed(0)  # the draws _split_flat made: the start, then one gradient per step
    naive_flat = torch.cat([torch.randn(s).reshape(-1) for s in shapes]).requires_grad_()
    naive = AdaTAM([naive_flat], lr=1e-2)
    for _ in range(5):
        naive_flat.grad = torch.cat([torch.randn(s).reshape(-1) for s in shapes])
        naive.step()
    d_whole = opt_whole.damping()["d"]
    assert d_whole.max() - d_whole.min() > 1e-3  # one damping value cannot be right for all three tensors
    assert (naive_flat.detach() - torch.cat([p.detach().reshape(-1) for p in whole])).abs().max() > 1e-6


def test_deepspeed_config_with_optimizer_block_is_refused():
    with pytest.raises(DistributedConfigError, match='"optimizer" block'):
        check_deepspeed_config({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}})


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_optimizer_offload_is_refused_unless_the_swap_is_disabled(device):
    cfg = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": device}}}
    with pytest.raises(DistributedConfigError, match="zero_force_ds_cpu_optimizer" if device == "cpu" else "NVMe"):
        check_deepspeed_config(cfg)
    cfg["zero_force_ds_cpu_optimizer"] = False
    if device == "cpu":
        check_deepspeed_config(cfg)  # then TAM itself steps the offloaded partitions (tested in the parity runs)
    else:
        with pytest.raises(DistributedConfigError, match="NVMe"):
            check_deepspeed_config(cfg)


def test_both_problems_are_reported_at_once(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"},
                                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(DistributedConfigError) as err:
        check_deepspeed_config(str(path))
    assert '"optimizer" block' in str(err.value) and "DeepSpeedCPUAdam" in str(err.value)


def test_plain_zero_configs_pass():
    for stage in (0, 1, 2, 3):
        check_deepspeed_config({"zero_optimization": {"stage": stage}})


def test_fsdp_version_1_is_refused():
    args = SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 1})
    with pytest.raises(DistributedConfigError, match="FSDP2"):
        check_training_args(args)
    check_training_args(SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 2}))


def test_launcher_deepspeed_config_is_checked_too(monkeypatch):
    """`accelerate launch --config_file zero2.yml` hands the DeepSpeed config to the Trainer through accelerate's
    state, not TrainingArguments: it is checked all the same."""
    import tam_hf.trainer.distributed as td

    monkeypatch.setattr(td, "_launcher_plugins", lambda: ({"optimizer": {"type": "AdamW"}}, None))
    with pytest.raises(DistributedConfigError, match='"optimizer" block'):
        check_training_args(SimpleNamespace(deepspeed=None, fsdp=None))
    monkeypatch.setattr(td, "_launcher_plugins", lambda: (None, 1))
    with pytest.raises(DistributedConfigError, match="FSDP version 1"):
        check_training_args(SimpleNamespace(deepspeed=None, fsdp=None))


def test_replaced_optimizer_is_caught_when_training_begins():
    from tam_hf.trainer.distributed import TorqueStatsCallback

    wrapper = SimpleNamespace(optimizer=SimpleNamespace(optimizer=torch.optim.AdamW([torch.zeros(1,
                                                                                                requires_grad=True)])))
    args = SimpleNamespace(optim="adatam")
    with pytest.raises(DistributedConfigError, match="runs AdamW"):
        TorqueStatsCallback().on_train_begin(args, None, None, optimizer=wrapper)
    # other optimizers pass untouched: the callback may sit in DEFAULT_CALLBACKS
    TorqueStatsCallback().on_train_begin(SimpleNamespace(optim="adamw_torch"), None, None, optimizer=wrapper)


ACCELERATE = HERE.parent / "recipes" / "accelerate"


@pytest.mark.parametrize("path", sorted(ACCELERATE.glob("*.yml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert path.read_text().startswith(f"# accelerate launch --config_file recipes/accelerate/{path.name} ")
    kind = str(cfg.distributed_type).split(".")[-1]
    if path.stem.startswith("zero"):
        assert kind == "DEEPSPEED"
        ds_file = HERE.parent / cfg.deepspeed_config["deepspeed_config_file"]
        ds = __import__("json").loads(ds_file.read_text())
        check_deepspeed_config(ds)  # no optimizer block; offload only with the swap disabled
        assert ds["zero_optimization"]["stage"] == int(path.stem[4])
        assert ("offload_optimizer" in ds["zero_optimization"]) == path.stem.endswith("offload")
        assert "scheduler" not in ds  # the Trainer's schedule (warm-up) stays in charge
    elif path.stem == "fsdp2":
        assert kind == "FSDP" and int(cfg.fsdp_config["fsdp_version"]) == 2
    else:
        assert path.stem == "ddp" and kind == "MULTI_GPU"


def test_one_reduction_for_all_groups_equals_one_per_group():
    """An optimizer that concatenates every group's statistics before calling the reducer (one all-reduce per
    step) gets the same rows as one call per group, global scope included."""
    torch.manual_seed(0)
    flats = [torch.randn(20, requires_grad=True), torch.randn(12, requires_grad=True)]
    for f in flats:
        f.grad = torch.randn_like(f)
    opt = AdaTAM([{"params": [flats[0]]}, {"params": [flats[1]], "cosine_scope": "global"}], lr=1e-2)
    sources = [ShardedSource(flats[0], "flat", [Fragment(0, 8, 0), Fragment(8, 5, 1), Fragment(13, 7, 1)],
                             ["a", "b"]),
               ShardedSource(flats[1], "flat", [Fragment(0, 6, 0), Fragment(6, 6, 1)], ["c", "d"])]
    stats_layer = ShardedStats(opt, sources)
    rows = [torch.rand(3, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)]
    stats_layer._enter()
    separate = [stats_layer(rows[0]), stats_layer(rows[1])]
    stats_layer._enter()
    merged = stats_layer(torch.cat(rows))
    stats_layer._exit()
    torch.testing.assert_close(merged, torch.cat(separate))
    torch.testing.assert_close(separate[0][1], rows[0][1] + rows[0][2])  # b's two fragments see b's total
    torch.testing.assert_close(separate[1][0], rows[1].sum(0))  # global: the group total in the first row
    assert separate[1][1].abs().sum() == 0


def test_a_rank_without_fragments_still_steps_and_leaves_its_padding_alone():
    """A ZeRO rank whose partition holds only padding must still reach the all-reduce (a placeholder)."""
    flat = torch.randn(6, requires_grad=True)
    before = flat.detach().clone()
    flat.grad = torch.randn(6)
    opt = AdaTAM([flat], lr=1e-2)
    ShardedStats(opt, [ShardedSource(flat, "flat", [], ["x", "y"])])
    opt.step()
    assert torch.equal(flat.detach(), before)
    assert list(opt.state) == [flat] and opt.param_groups[0]["params"] == [flat]


def test_offloaded_statistics_travel_to_the_gpu_for_nccl(monkeypatch):
    """ZeRO-Offload on GPUs: the optimizer runs on the CPU, the data-parallel group is NCCL (which cannot reduce
    CPU tensors), so the statistics are moved for the all-reduce. (The GPU run itself is not tested here.)"""
    import tam_hf.optim.sharded as sharded

    monkeypatch.setattr(sharded.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(sharded.torch.cuda, "current_device", lambda: 0)
    assert sharded._comm_device(None, torch.device("cpu")) == torch.device("cuda", 0)
    monkeypatch.setattr(sharded.dist, "get_backend", lambda group=None: "gloo")
    assert sharded._comm_device(None, torch.device("cpu")) == torch.device("cpu")
