"""The optimizer core against the literal float64 reference, plus invariants of state, resume and safety."""

import math

import pytest
import torch

from tam_hf.optim import fused, registry
from tam_hf.optim.reference import ReferenceTorque
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW, _default_impl, adatam, tam

SHAPES = [(), (7,), (5, 3), (2, 3, 4), (11, 6)]
KINDS = ["tam", "adatam", "adatamw"]
IMPLS = ["single", "foreach", "fused"]
STEPS = 24


def make_optimizer(kind, params, impl, **kw):
    paths = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    cls = {"tam": TAM, "adatam": AdaTAM, "adatamw": AdaTAMW}[kind]
    defaults = {"tam": dict(lr=0.05, momentum=0.9), "adatam": dict(lr=0.01), "adatamw": dict(lr=0.01)}[kind]
    return cls(params, **defaults, **paths[impl], **kw)


def make_reference(kind, params, **kw):
    lr = 0.05 if kind == "tam" else 0.01
    wd = kw.pop("weight_decay", 0.01 if kind == "adatamw" else 0.0)
    return ReferenceTorque(params, adaptive=kind != "tam", lr=lr, beta1=0.9, weight_decay=wd,
                           decoupled=kind == "adatamw", **kw)


def gradient_stream(shapes, steps, seed=0):
    """Correlated gradients (a drifting direction plus noise, sometimes reversed) so cosines span [-1, 1];
    tensor 1 has a zero gradient at step 3, tensor 2 has no gradient on steps 0-1 and 7."""
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for t in range(steps):
        grads = []
        for i, (s, d) in enumerate(zip(shapes, direction)):
            sign = -1.0 if 10 <= t < 18 else 1.0
            grads.append(sign * d + 0.7 * torch.randn(s, generator=gen, dtype=torch.float64))
        grads[1] = torch.zeros(shapes[1], dtype=torch.float64) if t == 3 else grads[1]
        if t in (0, 1, 7):
            grads[2] = None
        yield grads


def assert_matches(opt, ref, params, kind):
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), ref.params[i], rtol=1e-10, atol=1e-10)
        state = opt.state[p]
        if ref.m[i] is None:
            assert not state, "a tensor that never had a gradient must have no state"
            continue
        m_key = "momentum_buffer" if kind == "tam" else "exp_avg"
        torch.testing.assert_close(state[m_key], ref.m[i], rtol=1e-10, atol=1e-12)
        if kind != "tam":
            torch.testing.assert_close(state["exp_avg_sq"], ref.v[i], rtol=1e-10, atol=1e-14)
        assert state["s"].item() == pytest.approx(ref.s[i], abs=1e-12)


def run_against_reference(kind, impl, steps, seed, **kw):
    """Steps the optimizer and the reference side by side on float64 tensors of SHAPES, checking params and
    every state tensor after each step; returns both and the set of damping values seen."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    opt = make_optimizer(kind, params, impl, **kw)
    ref = make_reference(kind, params, **kw)
    seen = set()
    for grads in gradient_stream(SHAPES, steps, seed=seed + 1):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        assert_matches(opt, ref, params, kind)
        seen.update(round(x, 3) for x in opt.damping()["d"].tolist())
    return opt, ref, seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_literal_reference_float64(kind, impl, scope, weight_decay):
    opt, ref, seen = run_against_reference(kind, impl, STEPS, seed=1, cosine_scope=scope, weight_decay=weight_decay)
    ref_d = [d for d in ref.damping() if d is not None]
    torch.testing.assert_close(opt.damping()["d"].double(), torch.tensor(ref_d, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    assert min(seen) < 0.5 < max(seen), "the gradient stream should produce both damped and undamped steps"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_fixed_damping_control_matches_reference(kind, impl, scope):
    """The control arm: d held at 0.5, no angle measured."""
    opt, _, seen = run_against_reference(kind, impl, 10, seed=11, fixed_damping=0.5, cosine_scope=scope)
    assert seen == {0.5}


@pytest.mark.parametrize("kind", ["adatam", "adatamw"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_bias_correction_option_matches_reference(kind, impl, scope):
    """The optional Adam-style correction; tensor 2 misses steps, so tensors differ in their step counts."""
    opt, ref, _ = run_against_reference(kind, impl, 12, seed=15, bias_correction=True, cosine_scope=scope)
    assert ref.t[0] == 12 and ref.t[2] == 9


def test_bias_correction_keeps_the_first_step_at_adamw_size():
    """At the transfer-rule lr (AdamW's lr 1.0 x (1 - beta1) / 0.5 = 0.2) the corrected first step equals
    AdamW's (lr x sign(g) = 1); the paper's form takes 0.2 x 0.5 / sqrt(1 - beta2) = 3.16 instead."""
    for correct, expected in [(False, 0.2 * 0.5 / math.sqrt(0.001)), (True, 1.0)]:
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = AdaTAM([p], lr=0.2, bias_correction=correct)
        p.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        assert -p.detach()[0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_maximize_matches_reference(impl):
    run_against_reference("adatam", impl, 10, seed=2, maximize=True, weight_decay=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_paths_agree_in_float32(kind):
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) for s in [(64, 32), (32,), (300,)]]
    runs = {}
    for impl in IMPLS:
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make_optimizer(kind, params, impl)
        for grads in gradient_stream([x.shape for x in init], 15, seed=5):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.float()
            opt.step()
        runs[impl] = [p.detach() for p in params]
    for impl in ("foreach", "fused"):
        for a, b in zip(runs["single"], runs[impl]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 rounding, amplified by 1/sqrt(v)


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())


@pytest.mark.parametrize("kind,keys,ratio", [
    ("tam", {"momentum_buffer", "s"}, 1.0),
    ("adatam", {"exp_avg", "exp_avg_sq", "s", "step"}, 2.0),
    ("adatamw", {"exp_avg", "exp_avg_sq", "s", "step"}, 2.0),
])
def test_state_keys_and_memory(kind, keys, ratio):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(128, 64), (64,), (3, 5, 7)]]
    opt = make_optimizer(kind, params, "fused")
    assert not opt.state, "state is created lazily in step()"
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert state_bytes(opt) <= ratio * param_bytes + 64 * len(params)
    for p in params:
        assert set(opt.state[p]) == keys
        assert opt.state[p]["s"].shape == () and opt.state[p]["s"].dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_param_without_grad_is_skipped(impl):
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    opt = make_optimizer("adatam", [a, b], impl)
    a.grad = torch.randn(4, 4)
    before = b.detach().clone()
    opt.step()
    assert b not in opt.state and torch.equal(b, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_save_load_continue_is_exact(kind, impl):
    shapes = [(16, 8), (8,), (5, 2, 3)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(6)) for s in shapes]
    grads = [[g if g is None else g.float() for g in gs] for gs in gradient_stream(shapes, 20, seed=7)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()

    straight = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_optimizer(kind, straight, impl)
    run(straight, opt, grads)

    first = [torch.nn.Parameter(x.clone()) for x in init]
    opt1 = make_optimizer(kind, first, impl)
    run(first, opt1, grads[:10])
    saved = opt1.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = make_optimizer(kind, resumed, impl)
    opt2.load_state_dict(saved)
    run(resumed, opt2, grads[10:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt.damping()["s"], opt2.damping()["s"])


def test_load_keeps_s_in_float32_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(32, 8, dtype=torch.bfloat16))
    opt = AdaTAM([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    s = opt.state[p]["s"].clone()
    opt2 = AdaTAM([p], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["s"].dtype == torch.float32 and torch.equal(opt2.state[p]["s"], s)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_bf16_and_fp32_parameters(impl):
    if impl == "fused":
        impl_kw = {}  # fused=True refuses bf16 parameters; the default fused path sends them to the eager loop
    else:
        impl_kw = dict(foreach=impl == "foreach", fused=False)
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(64, 16), (16,), (40,)]]
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16]
    params = [torch.nn.Parameter(x.to(dt)) for x, dt in zip(init, dtypes)]
    opt = AdaTAM(params, lr=1e-2, **impl_kw)
    ref = ReferenceTorque(params, adaptive=True, lr=1e-2, beta1=0.9)
    for grads in gradient_stream([x.shape for x in init], 12, seed=9):
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, dtypes)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
    for i, p in enumerate(params):
        st = opt.state[p]
        assert st["exp_avg"].dtype == p.dtype and st["s"].dtype == torch.float32
        assert all(torch.isfinite(t).all() for t in st.values())
        # bf16 storage rounds m and v each step; the float32 statistics keep the damping on the reference's
        assert st["s"].item() == pytest.approx(ref.s[i], abs=2e-2)
        torch.testing.assert_close(p.detach().double(), ref.params[i], rtol=3e-2, atol=3e-2)


def test_fused_true_rejects_unsupported_parameters():
    with pytest.raises(ValueError, match="fused=True supports CPU float32/float64"):
        AdaTAM([torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))], fused=True)


@pytest.mark.parametrize("cls", [TAM, AdaTAM, AdaTAMW])
def test_default_path_is_fused_on_cpu(cls):
    p = torch.nn.Parameter(torch.randn(3))
    assert _default_impl([p], None, None) == ("fused" if fused.available() else "single")
    assert _default_impl([p], True, None) == "foreach" and _default_impl([p], False, False) == "single"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_aligned_gradients_are_not_damped_and_opposing_ones_are(kind, impl):
    p = torch.nn.Parameter(torch.zeros(50, 20))
    opt = make_optimizer(kind, [p], impl)
    g = torch.randn(50, 20, generator=torch.Generator().manual_seed(10))
    for _ in range(30):
        p.grad = g.clone()
        opt.step()
    # the first cosine is 0 (m_0 = 0), the next 29 are exactly 1 (pytorch_optimizer 4.1 stays at ~0.50 here)
    s_aligned = 1.0 - 0.9 ** 29
    assert opt.damping()["d"].item() == pytest.approx((1.0 + s_aligned) / 2.0, abs=1e-6)
    p.grad = -g
    opt.step()
    assert opt.damping()["s"].item() == pytest.approx(0.9 * s_aligned - 0.1, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_without_smoothing_damping_is_the_angle(kind, impl):
    """decay_rate=0 makes d = (1 + cos)/2 of this step: opposing -> 0, orthogonal -> 0.5, aligned -> 1."""
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = make_optimizer(kind, [p], impl, decay_rate=0.0)
    m_key = "momentum_buffer" if kind == "tam" else "exp_avg"
    e1 = torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    e2 = torch.tensor([[0, 1.0, 0], [0, 0, 0]], dtype=torch.float64)
    expected = [(e1, 0.5), (e1, 1.0), (-e1, 0.0), (e2, 0.5)]
    for g, d in expected:
        m_before = opt.state[p][m_key].clone() if opt.state else torch.zeros_like(p)
        p.grad = g
        opt.step()
        assert opt.damping()["d"].item() == pytest.approx(d, abs=1e-12)
        assert opt.damping_summary()["frac_below_half"] == (1.0 if d < 0.5 else 0.0)
        torch.testing.assert_close(opt.state[p][m_key], 0.9 * m_before + (d + 1e-8) * g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_nan_or_inf_after_zero_huge_gradients(kind, impl):
    params = [torch.nn.Parameter(torch.zeros(400, 10)), torch.nn.Parameter(torch.randn(30))]
    opt = make_optimizer(kind, params, impl)
    big = torch.full((400, 10), 1e18)  # |g|^2 = 4e39 overflows float32
    sequence = [torch.zeros(400, 10), big, big, -big, torch.zeros(400, 10), torch.randn(400, 10)]
    for g in sequence:
        params[0].grad = g.clone()
        params[1].grad = torch.zeros(30)
        opt.step()
        for p in params:
            for name, t in opt.state[p].items():
                assert torch.isfinite(t).all(), f"{name} became non-finite"
            if kind != "tam":  # TAM's step is lr * m itself, finite but huge here
                assert torch.isfinite(p).all()
        s = opt.damping()["s"]
        assert torch.isfinite(s).all() and (s.abs() <= 1).all()


def test_huge_gradient_cosine_is_exact_on_fused_path():
    if not fused.available():
        pytest.skip("fused kernels unavailable")
    p = torch.nn.Parameter(torch.zeros(400, 10))
    opt = AdaTAM([p], lr=1e-3, fused=True)
    for _ in range(2):
        p.grad = torch.full((400, 10), 1e18)
        opt.step()
    # step 1: cosine 0; step 2: m and g parallel, cosine exactly 1 even though |g|^2 overflows float32
    assert opt.state[p]["s"].item() == pytest.approx(0.1, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_small_model_loss_falls(kind):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.1 * x[:, :1]
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = make_optimizer(kind, model.parameters(), "fused")
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("make,message", [
    (lambda p: AdaTAM(p, lr=-1.0), "Invalid learning rate: -1.0"),
    (lambda p: AdaTAM(p, betas=(1.2, 0.999)), "Invalid beta parameter at index 0: 1.2"),
    (lambda p: AdaTAM(p, betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (lambda p: AdaTAM(p, eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (lambda p: AdaTAMW(p, weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (lambda p: TAM(p, lr=0.1, momentum=1.0), "Invalid momentum value: 1.0"),
    (lambda p: TAM(p, lr=0.1, decay_rate=1.5), "Invalid decay_rate value: 1.5"),
    (lambda p: TAM(p, lr=0.1, damping_eps=-1.0), "Invalid damping_eps value: -1.0"),
    (lambda p: TAM(p, lr=0.1, cosine_scope="layer"), "Invalid cosine_scope value: 'layer'"),
    (lambda p: AdaTAM(p, foreach=True, fused=True), "foreach and fused cannot both be True"),
    (lambda p: AdaTAMW(p, fixed_damping=1.5), "Invalid fixed_damping value: 1.5"),
])
def test_invalid_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make([torch.nn.Parameter(torch.zeros(2))])


_NON_FINITE_MESSAGES = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value",
                        "damping_eps": "Invalid damping_eps value", "decay_rate": "Invalid decay_rate value",
                        "weight_decay": "Invalid weight_decay value", "momentum": "Invalid momentum value",
                        "fixed_damping": "Invalid fixed_damping value"}


@pytest.mark.parametrize("name", registry.torque_names())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_hyperparameters_are_refused(name, value):
    """inf passed the range checks once (damping_eps=inf gave NaN weights two steps later): every TAM constructor,
    and the registry's check that recipe validation runs, refuse any non-finite value with the same message."""
    spec = registry.get(name)
    if name.endswith("_8bit"):
        pytest.importorskip("bitsandbytes")
    accepted = spec.accepted_keys()
    cases = [({key: value}, f"{message}: {value}") for key, message in _NON_FINITE_MESSAGES.items() if key in accepted]
    if "betas" in accepted:
        cases += [({"betas": (value, 0.999)}, f"Invalid beta parameter at index 0: {value}"),
                  ({"betas": (0.9, value)}, f"Invalid beta parameter at index 1: {value}")]
    assert len(cases) >= 6
    for bad, message in cases:
        kwargs = {"lr": 1e-3, **bad}
        with pytest.raises(ValueError) as from_constructor:
            spec.cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        with pytest.raises(ValueError) as from_registry:
            spec.check(kwargs)
        assert str(from_constructor.value) == str(from_registry.value) == message


@pytest.mark.parametrize("cls", [TAM, AdaTAM, AdaTAMW])
def test_unknown_keyword_is_a_type_error(cls):
    with pytest.raises(TypeError):
        cls([torch.nn.Parameter(torch.zeros(2))], lr=0.1, gamma=0.9)


def test_adatamw_decays_decoupled_and_adatam_couples():
    for cls, expect_decoupled in [(AdaTAMW, True), (AdaTAM, False)]:
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = cls([p], lr=0.1, weight_decay=0.5, fused=False, foreach=False)
        p.grad = torch.zeros(3, dtype=torch.float64)
        opt.step()
        if expect_decoupled:  # zero gradient: only the decay moves p
            assert torch.allclose(p, torch.full((3,), 0.95, dtype=torch.float64))
        else:  # coupled: g = 0.5 * p enters m and v, so p moves by lr * d * g / sqrt((1 - beta2) g^2), d = 0.5
            assert p.detach()[0].item() == pytest.approx(1 - 0.1 * 0.5 / math.sqrt(0.001), rel=1e-5)  # up to eps


def test_without_a_compiler_the_default_falls_back_to_eager(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_error", None)
    monkeypatch.setattr(fused, "_warned", False)
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("TAM_HF_CACHE", str(tmp_path))
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="/bin/false failed"):
        AdaTAM([p], fused=True)
    opt = AdaTAM([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="using the eager single-tensor path"):
        opt.step()
    assert _default_impl([p], None, None) == "single" and torch.isfinite(p).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_stats_reducer_is_called_once_per_step_for_all_groups(impl, scope):
    """The distributed hook: every group's statistics go through ONE reducer call; an identity reducer
    changes nothing."""
    def build():
        gen = torch.Generator().manual_seed(13)
        decay = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES[:3]]
        no_decay = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES[3:]]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return decay + no_decay, make_optimizer("adatamw", groups, impl, cosine_scope=scope)

    calls = []

    def identity(stats):
        calls.append(stats.shape)
        return stats.clone()

    plain_params, plain = build()
    hooked_params, hooked = build()
    hooked.stats_reducer = identity
    for grads in gradient_stream(SHAPES, 6, seed=14):
        for params, opt in ((plain_params, plain), (hooked_params, hooked)):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    assert len(calls) == 6
    assert calls[-1] == (len(SHAPES), 3)  # rows of both groups in one call
    for a, b in zip(plain_params, hooked_params):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_fused_statistics_are_the_same_bits_for_any_thread_count():
    """DDP replicas and resumed runs must agree exactly: chunked sums, not an OpenMP reduction in arrival order."""
    if not fused.available():
        pytest.skip("fused kernels unavailable")
    gen = torch.Generator().manual_seed(17)
    m, g = torch.randn(1_000_003, generator=gen), torch.randn(1_000_003, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fused.statistics([m], [g], [m], sign=1.0, weight_decay=0.0)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    expected = torch.stack([torch.dot(m.double(), g.double()), m.double().square().sum(), g.double().square().sum()])
    torch.testing.assert_close(results[0], expected, rtol=1e-12, atol=0)


def test_a_compiler_without_openmp_still_gets_serial_kernels(monkeypatch, tmp_path):
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "no -fopenmp" >&2; exit 1; }; done\n'
                  'exec "${REAL_CC:-cc}" "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_error", None)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("TAM_HF_CACHE", str(tmp_path / "cache"))
    assert fused.available()
    p = torch.nn.Parameter(torch.randn(40, 3, dtype=torch.float64))
    opt, ref = AdaTAM([p], lr=1e-2, fused=True), ReferenceTorque([p], adaptive=True, lr=1e-2, beta1=0.9)
    for _ in range(3):
        g = torch.randn(40, 3, dtype=torch.float64)
        p.grad = g
        opt.step()
        ref.step([g])
    torch.testing.assert_close(p.detach(), ref.params[0], rtol=1e-10, atol=1e-10)


def functional_run(kind, init, grad_steps, impl_kw, **kw):
    """Steps the functional API with state it keeps itself, as a caller would (tensors without a gradient
    skipped); returns the parameters and state."""
    params = [x.clone() for x in init]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    s = [torch.zeros((), dtype=torch.float32) for _ in params]
    t = [0] * len(params)
    for grads in grad_steps:
        idx = [i for i, g in enumerate(grads) if g is not None]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        for i in idx:
            t[i] += 1
        if kind == "tam":
            tam(pick(params), pick(grads), pick(m), pick(s), lr=0.05, momentum=0.9, decay_rate=0.9, damping_eps=1e-8,
                weight_decay=kw.get("weight_decay", 0.0), **impl_kw)
        else:
            adatam(pick(params), pick(grads), pick(m), pick(v), pick(s), lr=0.01, beta1=0.9, beta2=0.999,
                   decay_rate=0.9, damping_eps=1e-8, eps=1e-8,
                   weight_decay=kw.get("weight_decay", 0.01 if kind == "adatamw" else 0.0),
                   decoupled_weight_decay=kind == "adatamw", bias_correction=kw.get("bias_correction", False),
                   steps=[float(x) for x in pick(t)], **impl_kw)
    return params, m, v, s


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", [None] + IMPLS)
@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.1}, {"bias_correction": True}], ids=["plain", "wd", "bc"])
def test_functional_and_class_agree_bit_for_bit(kind, impl, extra):
    """Same path chosen (the default included), same flow: the same bits after every step."""
    if kind == "tam" and "bias_correction" in extra:
        pytest.skip("TAM has no bias correction")
    impl_kw = {None: {}, "single": dict(foreach=False, fused=False), "foreach": dict(foreach=True),
               "fused": dict(fused=True)}[impl]
    shapes = [(16, 8), (8,), (5, 2, 3), ()]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)) for i, s in enumerate(shapes)]
    grad_steps = [[None if g is None else g.float() for g in gs] for gs in gradient_stream(shapes, 8, seed=21)]
    cls_params = [torch.nn.Parameter(x.clone()) for x in init]
    cls = {"tam": TAM, "adatam": AdaTAM, "adatamw": AdaTAMW}[kind]
    opt = cls(cls_params, lr=0.05 if kind == "tam" else 0.01, **impl_kw, **extra)
    for n in range(1, len(grad_steps) + 1):
        for p, g in zip(cls_params, grad_steps[n - 1]):
            p.grad = g
        opt.step()
        params, m, v, s = functional_run(kind, init, grad_steps[:n], impl_kw, **extra)
        for i, p in enumerate(cls_params):
            assert torch.equal(p.detach(), params[i]), f"step {n}, tensor {i}"
            st = opt.state.get(p)
            if not st:
                continue
            assert torch.equal(st[opt.state_buffers[0]], m[i]) and torch.equal(st["s"], s[i])
            if kind != "tam":
                assert torch.equal(st["exp_avg_sq"], v[i])
