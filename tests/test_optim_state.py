"""Faults at the optimizer's edges: state dicts that do not fit, inputs the fused kernels must refuse, complex
parameters, sparse gradients and tensors on the wrong device. Each case raises a clear error naming the tensor
and leaves the optimizer as it was; none may crash the process or train on misfit state."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tam_hf.optim import fused
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, TorqueOptimizer, adatam, tam
from tam_hf.optim.sharded import Fragment, ShardedSource, ShardedStats

needs_kernels = pytest.mark.skipif(not fused.available(), reason="fused kernels unavailable")


def stepped(cls, shapes, steps=2, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = cls(params, **({"lr": 1e-2} | kw))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def snapshot(opt):
    """Everything load_state_dict could change: hyperparameters and every state tensor, cloned."""
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


def assert_unchanged(opt, before):
    groups, state = snapshot(opt)
    assert groups == before[0]
    assert state.keys() == before[1].keys()
    for pid, st in state.items():
        assert st.keys() == before[1][pid].keys()
        for k, v in st.items():
            old = before[1][pid][k]
            assert v.device == old.device and v.shape == old.shape, k
            assert v.is_meta or torch.equal(v, old), k


# ------------------------------------------------------------------------------------------ crash probes

CRASH_PROBES = textwrap.dedent("""
    import sys, torch
    from tam_hf.optim.tam import AdaTAM

    def step(p, opt):
        p.grad = torch.randn_like(p)
        opt.step()

    case = sys.argv[1]
    small = torch.nn.Parameter(torch.randn(4))
    small_opt = AdaTAM([small], lr=1e-3)
    step(small, small_opt)
    big = torch.nn.Parameter(torch.randn(4_000_000))
    big_opt = AdaTAM([big], lr=1e-3)
    try:
        if case == "load":  # a state saved for 4 elements, stepped over 4 million
            big_opt.load_state_dict(small_opt.state_dict())
        else:  # state replaced behind the optimizer's back: the kernels must still refuse it
            step(big, big_opt)
            big_opt.state[big]["exp_avg_sq"] = torch.zeros(4)
        step(big, big_opt)
    except ValueError as exc:
        print("refused:", exc)
        sys.exit(0)
    print("stepped")
    sys.exit(3)
""")


@needs_kernels
@pytest.mark.parametrize("case,message", [
    ("load", "exp_avg has shape (4,), the parameter (4000000,)"),
    ("tampered", "exp_avg_sq 0 is 4 elements, expected 4000000"),
])
def test_misfit_state_is_refused_instead_of_read_past(case, message):
    """Before the checks the fused kernel walked 4 million elements of a 4-element buffer: SIGSEGV."""
    proc = subprocess.run([sys.executable, "-c", CRASH_PROBES, case], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    assert "refused:" in proc.stdout and message in proc.stdout


# ---------------------------------------------------------------------------------- state dict validation


def test_state_of_larger_tensors_is_refused_not_trained_on():
    _, big = stepped(AdaTAM, [(40,), (3,)])
    params, opt = stepped(AdaTAM, [(4,), (3,)], seed=1)
    before = snapshot(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(big.state_dict())
    message = str(err.value)
    assert "param group 0, parameter 0" in message and "exp_avg has shape (40,), the parameter (4,)" in message
    assert_unchanged(opt, before)


@pytest.mark.parametrize("make_other,kind", [
    (lambda p: torch.optim.AdamW(p), "an AdamW (or Adam) state"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "an SGD state"),
    (lambda p: TAM(p, lr=0.1), "a TAM state"),
])
def test_another_optimizers_state_is_named_in_adatam(make_other, kind):
    p = torch.nn.Parameter(torch.randn(5))
    other = make_other([p])
    p.grad = torch.randn(5)
    other.step()
    params, opt = stepped(AdaTAMW, [(5,)])
    before = snapshot(opt)
    with pytest.raises(ValueError, match=re.escape(f"it looks like {kind}")) as err:
        opt.load_state_dict(other.state_dict())
    assert "param group 0, parameter 0" in str(err.value)
    assert_unchanged(opt, before)


def test_adamw_state_message_lists_what_it_has_and_lacks():
    """Before validation this failed at the next step with KeyError: 's'."""
    p = torch.nn.Parameter(torch.randn(5))
    adamw = torch.optim.AdamW([p])
    p.grad = torch.randn(5)
    adamw.step()
    opt = AdaTAM([p])
    with pytest.raises(ValueError, match="state has exp_avg, exp_avg_sq, step but no 's': it looks like an AdamW"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


def test_adatam_state_into_tam_is_named():
    _, ada = stepped(AdaTAM, [(5,)])
    _, opt = stepped(TAM, [(5,)])
    with pytest.raises(ValueError, match="it looks like an AdaTAM/AdaTAMW state"):
        opt.load_state_dict(ada.state_dict())


@pytest.mark.parametrize("corrupt,message", [
    (lambda st: st.update(s=torch.zeros(3)), "s must be a 0-dim floating-point tensor, found shape (3,)"),
    (lambda st: st.update(s=torch.tensor(1)), "s must be a 0-dim floating-point tensor, found torch.int64"),
    (lambda st: st.update(exp_avg=st["exp_avg"].long()), "exp_avg is torch.int64, expected floating point"),
    (lambda st: st.update(step=torch.ones(2)), "step must be a 0-dim tensor, found shape (2,)"),
    (lambda st: st.pop("exp_avg_sq"), "state has exp_avg, s, step but no 'exp_avg_sq'"),
    (lambda st: st.update(extra=torch.zeros(1)), "unexpected 'extra'"),
    (lambda st: st.update(exp_avg=[0.0] * 6), "exp_avg is a list, expected a tensor"),
])
def test_corrupt_entries_are_named(corrupt, message):
    _, source = stepped(AdaTAM, [(6,), (2, 3)])
    saved = source.state_dict()
    corrupt(saved["state"][1])
    params, opt = stepped(AdaTAM, [(6,), (2, 3)], seed=3)
    before = snapshot(opt)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(saved)
    assert "param group 0, parameter 1" in str(err.value) and message in str(err.value)
    assert_unchanged(opt, before)


def test_the_first_misfit_is_named_across_groups():
    def build(shapes_by_group):
        params = [[torch.nn.Parameter(torch.randn(s)) for s in shapes] for shapes in shapes_by_group]
        opt = AdaTAM([{"params": ps} for ps in params], lr=1e-2)
        for p in sum(params, []):
            p.grad = torch.randn_like(p)
        opt.step()
        return opt

    saved = build([[(3,), (4,)], [(5,), (6,)]]).state_dict()
    target = build([[(3,), (4,)], [(5,), (7,)]])
    with pytest.raises(ValueError, match=r"param group 1, parameter 1 \(shape \(7,\), torch.float32\)"):
        target.load_state_dict(saved)


def test_a_state_of_tensors_that_never_stepped_loads():
    """Entries may be absent or empty (never stepped); those are not misfits."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = AdaTAM([a, b], lr=1e-2)
    a.grad = torch.randn(3)
    opt.step()
    opt.damping()
    saved = opt.state_dict()
    saved["state"][1] = {}
    fresh = AdaTAM([torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())], lr=1e-2)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.damping()["s"], opt.damping()["s"])


def flat_with_fragments(n=17):
    torch.manual_seed(0)
    flat = torch.randn(n, requires_grad=True)
    opt = AdaTAM([flat], lr=1e-2)
    frags = [Fragment(0, 5, 0), Fragment(5, n - 5, 1)]
    layer = ShardedStats(opt, [ShardedSource(flat, "flat", frags, ["a", "b"])])
    flat.grad = torch.randn(n)
    opt.step()
    return flat, opt, layer


def test_a_sharded_flat_partition_state_loads_and_a_misfit_one_does_not():
    """DeepSpeed reloads a ZeRO partition's state (flat buffers + per-fragment tam_s / tam_step vectors) into the
    client optimizer before the statistics layer is installed: that layout is valid, a wrongly sized one is not."""
    flat, opt, layer = flat_with_fragments()
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"exp_avg", "exp_avg_sq", "tam_s", "tam_step"}
    twin = torch.nn.Parameter(flat.detach().clone())
    loaded = AdaTAM([twin], lr=1e-2)
    loaded.load_state_dict(saved)
    assert torch.equal(loaded.state[twin]["tam_s"], opt.state[flat]["tam_s"])
    short = AdaTAM([torch.nn.Parameter(torch.randn(16))], lr=1e-2)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(17,\), the parameter \(16,\)"):
        short.load_state_dict(saved)
    saved["state"][0]["tam_step"] = torch.zeros(3)
    with pytest.raises(ValueError, match="tam_step holds 3 entries, tam_s 2"):
        AdaTAM([torch.nn.Parameter(torch.randn(17))], lr=1e-2).load_state_dict(saved)


def test_load_keeps_s_float32_for_bf16_flat_and_whole_tensors():
    params, opt = stepped(AdaTAM, [(8,)])
    saved = opt.state_dict()
    p16 = torch.nn.Parameter(params[0].detach().to(torch.bfloat16))
    opt16 = AdaTAM([p16], lr=1e-2)
    opt16.load_state_dict(saved)
    assert opt16.state[p16]["s"].dtype == torch.float32
    assert torch.equal(opt16.state[p16]["s"], opt.state[params[0]]["s"])


# ------------------------------------------------------------------------------------ the fused kernels


@needs_kernels
@pytest.mark.parametrize("spoil,message", [
    (lambda t: t["m"].__setitem__(1, torch.zeros(3)), "exp_avg 1 is 3 elements, expected 12"),
    (lambda t: t["v"].__setitem__(0, torch.zeros(10, 2).t()), "exp_avg_sq 0 is not contiguous"),
    (lambda t: t["g"].__setitem__(0, torch.zeros(20, dtype=torch.float64)), "grad 0 is torch.float64, expected "
                                                                             "torch.float32"),
    (lambda t: t["g"].__setitem__(1, torch.zeros(12, device="meta")), "grad 1 is on meta"),
    (lambda t: t["g"].__setitem__(1, torch.zeros(12).to_sparse()), "grad 1 is torch.sparse_coo"),
    (lambda t: t["s"].__setitem__(1, torch.zeros(2)), "s 1 is 2 elements, expected 1"),
    (lambda t: t["s"].pop(), "1 s tensors for 2 param tensors"),
])
def test_fused_kernels_check_every_input_before_touching_memory(spoil, message):
    t = {"p": [torch.randn(20), torch.randn(12)], "g": [torch.randn(20), torch.randn(12)],
         "m": [torch.randn(20), torch.randn(12)], "v": [torch.rand(20), torch.rand(12)],
         "s": [torch.zeros(()), torch.zeros(())]}
    spoil(t)
    before = {k: [x.clone() for x in v] for k, v in t.items() if k != "g"}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fused.adatam_step(t["p"], t["g"], t["m"], t["v"], t["s"], sign=1.0, weight_decay=0.0, beta1=0.9, beta2=0.999,
                          lr=1e-3, eps=1e-8, decay=1.0, decay_rate=0.9, damping_eps=1e-8)
    for k, v in before.items():  # nothing was written
        assert all(torch.equal(a, b) for a, b in zip(v, t[k]))


@needs_kernels
def test_every_fused_entry_point_checks_sizes():
    p, g, m, v = torch.randn(8), torch.randn(8), torch.randn(7), torch.rand(8)
    a = [torch.tensor(0.5)]
    common = dict(sign=1.0, weight_decay=0.0)
    calls = {
        "statistics": lambda: fused.statistics([p], [g], [m], **common),
        "tam_update": lambda: fused.tam_update([p], [g], [m], a, momentum=0.9, lr=0.1, **common),
        "adatam_update": lambda: fused.adatam_update([p], [g], [m], [v], a, beta1=0.9, beta2=0.999, lr=0.1, eps=1e-8,
                                                     decay=1.0, **common),
        "tam_step": lambda: fused.tam_step([p], [g], [m], [torch.zeros(())], momentum=0.9, lr=0.1, decay_rate=0.9,
                                           damping_eps=1e-8, **common),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"fused {name}: .* 0 is 7 elements, expected 8"):
            call()


# ------------------------------------------------------------------------- complex, sparse, devices


@pytest.mark.parametrize("cls", [TAM, AdaTAM, AdaTAMW])
def test_complex_parameters_are_refused_at_construction(cls):
    """Before: accepted, and the cosine silently dropped the imaginary part (a torch UserWarning)."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has dtype torch.complex64"):
        cls(params, lr=0.1)
    opt = cls([params[0]], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 has dtype torch.complex64"):
        opt.add_param_group({"params": [params[1]]})
    assert len(opt.param_groups) == 1


def test_functional_refuses_complex_tensors():
    p = torch.randn(3, dtype=torch.complex128)
    with pytest.raises(RuntimeError, match=r"tensor 0 \(shape \(3,\), torch.complex128\)"):
        tam([p], [torch.randn_like(p)], [torch.zeros_like(p)], [torch.zeros(())], lr=0.1, momentum=0.9,
            decay_rate=0.9, damping_eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False)])
def test_sparse_gradient_is_refused_before_any_state_changes(impl):
    if impl.get("fused") and not fused.available():
        pytest.skip("fused kernels unavailable")
    dense, other = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    opt = AdaTAM([{"params": [dense]}, {"params": [other]}], lr=1e-2, **impl)
    dense.grad, other.grad = torch.randn(4), torch.randn(5)
    opt.step()
    before, p_before = snapshot(opt), [dense.detach().clone(), other.detach().clone()]
    dense.grad, other.grad = torch.randn(4), torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients: param group 1, parameter 0 \(shape \(5,\)"):
        opt.step()
    assert_unchanged(opt, before)  # group 0's step count and buffers included
    assert torch.equal(dense, p_before[0]) and torch.equal(other, p_before[1])


@needs_kernels
def test_fused_true_refuses_state_on_another_device_before_any_state_changes():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(6))
    opt = AdaTAM([{"params": [a]}, {"params": [b]}], lr=1e-2, fused=True)
    a.grad, b.grad = torch.randn(4), torch.randn(6)
    opt.step()
    opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].to("meta")
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"fused=True.*param group 1, parameter 0 \(shape \(6,\).*exp_avg is on "
                                           r"meta"):
        opt.step()
    assert_unchanged(opt, before)


@needs_kernels
def test_fused_true_refuses_a_later_param_group_it_cannot_run():
    opt = AdaTAM([torch.nn.Parameter(torch.randn(3))], lr=1e-2, fused=True)
    with pytest.raises(ValueError, match="fused=True supports CPU float32/float64 parameters only.*parameter 0 of "
                                         "param group 1.*meta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, device="meta"))]})
    assert len(opt.param_groups) == 1


@needs_kernels
def test_functional_fused_refuses_a_gradient_on_another_device_before_writing():
    p, m, v, s = torch.randn(5), torch.randn(5), torch.rand(5), torch.zeros(())
    before = [x.clone() for x in (p, m, v, s)]
    with pytest.raises(RuntimeError, match=r"fused=True.*tensor 0 \(shape \(5,\).*gradient is on meta"):
        adatam([p], [torch.randn(5, device="meta")], [m], [v], [s], lr=1e-2, beta1=0.9, beta2=0.999, decay_rate=0.9,
               damping_eps=1e-8, eps=1e-8, weight_decay=0.0, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (p, m, v, s)))


def test_public_base_class_and_state_names():
    for cls, buffers, scalars in [(TAM, ("momentum_buffer",), ("s",)),
                                  (AdaTAM, ("exp_avg", "exp_avg_sq"), ("s", "step")),
                                  (AdaTAMW, ("exp_avg", "exp_avg_sq"), ("s", "step"))]:
        assert issubclass(cls, TorqueOptimizer)
        assert cls.state_buffers == buffers and cls.state_scalars == scalars
        params, opt = stepped(cls, [(3, 2)])
        assert set(opt.state[params[0]]) == set(buffers) | set(scalars)


def test_an_8bit_state_refused_by_the_32bit_optimizer_names_the_conversion():
    pytest.importorskip("bitsandbytes")
    import tam_hf

    p = [torch.nn.Parameter(torch.randn(5000))]
    eight = tam_hf.AdaTAMW8bit(p, lr=1e-3)
    p[0].grad = torch.randn(5000)
    eight.step()
    full = tam_hf.AdaTAMW([torch.nn.Parameter(torch.randn(5000))], lr=1e-3)
    with pytest.raises(ValueError, match="8-bit AdaTAM.*dequantize_state_dict"):
        full.load_state_dict(eight.state_dict())
    from tam_hf.optim.tam8bit import dequantize_state_dict

    full.load_state_dict(dequantize_state_dict(eight.state_dict()))
    assert full.state[full.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
