"""The Triton kernels (``tam_hf/optim/triton_kernels.py``, ``fused=True`` on CUDA/ROCm) against the float64 reference.

Without a GPU they run on CPU tensors under the Triton interpreter: the fixture below sets ``TRITON_INTERPRET=1``
(before the kernels' first use) and ``TAM_HF_TRITON_ON_CPU=1``, which sends ``fused=True`` to them instead of the
C kernels. With ``TAM_HF_TEST_DEVICE=cuda`` (``bench/gpu_check.sh``) the same tests run compiled on a GPU.
The interpreter is slow: few steps, small tensors (chunks of 128 elements there, so they still span chunks).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from tam_hf.optim import triton_kernels  # noqa: E402
from tam_hf.optim.reference import ReferenceTorque  # noqa: E402
from tam_hf.optim.tam import TAM, AdaTAM, AdaTAMW  # noqa: E402
from tam_hf.optim.triton_devices import FORCE_ON_CPU  # noqa: E402

DEVICE = torch.device(os.environ.get("TAM_HF_TEST_DEVICE", "cpu"))
# 0-d to 4-d; the (9, 40) one spans three chunks; the last is channels_last while its gradients are not
SHAPES = [(), (7,), (5, 3), (2, 3, 4), (9, 40), (2, 3, 2, 2)]
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def triton_on_this_device():
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE.type == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
            mp.setenv(FORCE_ON_CPU, "1")
        yield


@pytest.fixture
def launches(monkeypatch):
    """Counts the host functions' calls: proof that a step took the Triton kernels."""
    triton_kernels.load(DEVICE)  # the availability probe runs a step: not one of the test's
    counts = {"step": 0, "statistics": 0}
    for name, key in (("_step_impl", "step"), ("_statistics_impl", "statistics")):
        def counted(*args, _fn=getattr(triton_kernels, name), _key=key):
            counts[_key] += 1
            return _fn(*args)
        monkeypatch.setattr(triton_kernels, name, counted)
    return counts


def make(kind, params, **kw):
    cls = {"tam": TAM, "adatam": AdaTAM, "adatamw": AdaTAMW}[kind]
    lr = 0.05 if kind == "tam" else 0.01
    kw.setdefault("weight_decay", 0.01 if kind == "adatamw" else 0.0)
    return cls(params, lr=lr, fused=True, **kw)


def reference(kind, params, **kw):
    kw.setdefault("weight_decay", 0.01 if kind == "adatamw" else 0.0)
    return ReferenceTorque(params, adaptive=kind != "tam", lr=0.05 if kind == "tam" else 0.01, beta1=0.9,
                           decoupled=kind == "adatamw", **kw)


def init_params(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in zip(SHAPES, dtypes):
        x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(x))
    return params


def gradients(steps, dtypes, seed=1):
    """A drifting direction plus noise, reversed for a while (cosines of both signs); tensor 1 gets a zero
    gradient at step 3, tensor 2 none at steps 0-1 and 4."""
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(s, generator=gen) for s in SHAPES]
    for t in range(steps):
        sign = -1.0 if t in (3, 4) else 1.0
        grads = [(sign * d + 0.7 * torch.randn(d.shape, generator=gen)).to(DEVICE, dt)
                 for d, dt in zip(direction, dtypes)]
        grads[1] = torch.zeros_like(grads[1]) if t == 3 else grads[1]
        if t in (0, 1, 4):
            grads[2] = None
        yield grads


def moment_names(kind):
    return ("momentum_buffer",) if kind == "tam" else ("exp_avg", "exp_avg_sq")


def assert_close_fp32(got, want):
    """1e-5 relative to the tensor's magnitude: an element whose terms cancel (m = 0.9 m + d g near 0) keeps the
    float32 rounding of the terms, so a purely elementwise relative bound would be meaningless there."""
    got = got.detach().double().cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-12)


def check_against(opt, ref, params, kind):
    for i, p in enumerate(params):
        assert_close_fp32(p, ref.params[i])
        if ref.m[i] is None:
            assert not opt.state.get(p), "a tensor that never had a gradient has no state"
            continue
        for name, expected in zip(moment_names(kind), (ref.m[i], ref.v[i])):
            assert_close_fp32(opt.state[p][name], expected)
        assert opt.state[p]["s"].item() == pytest.approx(ref.s[i], abs=1e-6)


def run(kind, dtypes, steps=STEPS, **kw):
    params = init_params(dtypes)
    opt = make(kind, params, **kw)
    ref = reference(kind, params, **{k: v for k, v in kw.items()})
    return params, opt, ref


@pytest.mark.parametrize("kind,options", [
    ("tam", dict(weight_decay=0.1)),  # coupled weight decay inside the statistics and the update
    ("tam", dict(cosine_scope="global", maximize=True)),
    ("adatam", dict(maximize=True, weight_decay=0.05)),
    ("adatamw", dict(bias_correction=True)),  # tensor 2 misses steps: its own step count
    ("adatamw", dict(cosine_scope="global", weight_decay=0.1)),
    ("adatam", dict(fixed_damping=0.5, bias_correction=True)),
])
def test_float32_matches_the_reference(kind, options, monkeypatch, launches):
    dtypes = [torch.float32] * len(SHAPES)
    params, opt, ref = run(kind, dtypes, **options)
    for grads in gradients(STEPS, dtypes):
        for p, g in zip(params, grads):
            p.grad = g
        with monkeypatch.context() as m:  # no host synchronisation inside step(), bias correction included
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("step() called .item()"))
            m.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("step() called .tolist()"))
            opt.step()
        ref.step([None if g is None else g.double().cpu() for g in grads])
        check_against(opt, ref, params, kind)
    assert launches["step"] == STEPS
    phased = options.get("cosine_scope") == "global" and not options.get("fixed_damping")
    assert launches["statistics"] == (STEPS if phased else 0)  # else statistics and update in one call


def test_sharded_statistics_path_uses_the_same_kernels(launches):
    """statistics kernel -> the optimizer's stats_reducer (ONE call per step, every group) -> update kernel."""
    dtypes = [torch.float32] * len(SHAPES)
    params = init_params(dtypes)
    groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}]
    opt = AdaTAM(groups, lr=0.01, fused=True)
    ref_a = ReferenceTorque(params[:3], adaptive=True, lr=0.01, beta1=0.9, weight_decay=0.1)
    ref_b = ReferenceTorque(params[3:], adaptive=True, lr=0.01, beta1=0.9)
    calls = []
    opt.stats_reducer = lambda stats: calls.append(stats.shape) or stats.clone()
    for grads in gradients(4, dtypes):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        host = [None if g is None else g.double().cpu() for g in grads]
        ref_a.step(host[:3])
        ref_b.step(host[3:])
        active = sum(g is not None for g in grads)
        assert calls[-1] == (active, 3)
    assert len(calls) == 4 and launches == {"step": 8, "statistics": 8}  # per group: statistics, then update
    for p, expected in zip(params, ref_a.params + ref_b.params):
        assert_close_fp32(p, expected)


def ulps(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of ``x`` (float64)."""
    info = torch.finfo(dtype)
    return info.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny))))


def test_16_bit_parameters_within_one_ulp_per_step():
    """bfloat16 / float16 / float32 tensors in ONE group (one launch), float32 moments, math in float32.

    Tolerance: each step stores p once. The exact float64 value differs from the stored one by less than 1 ulp
    of the parameter's dtype when the store truncates (the interpreter's float32 -> bfloat16), by at most half an
    ulp when it rounds to nearest (GPUs, and float16 everywhere); float32 arithmetic adds ~1e-6 relative. So after
    re-syncing the reference to the stored parameters, every step must land within 1 ulp + 1e-6 relative."""
    mixed = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]
    params = init_params(mixed)
    opt = make("adatamw", params, weight_decay=0.1)
    ref = reference("adatamw", params, weight_decay=0.1)
    for grads in gradients(4, mixed):
        for p, g in zip(params, grads):
            p.grad = g
        before = [p.detach().double().cpu() for p in params]
        opt.step()
        ref.step([None if g is None else g.double().cpu() for g in grads])
        for i, (p, dtype) in enumerate(zip(params, mixed)):
            got, want = p.detach().double().cpu(), ref.params[i]
            tol = ulps(want, dtype) + 1e-6 * want.abs() if dtype != torch.float32 else 1e-6 * (1 + want.abs())
            assert ((got - want).abs() <= tol).all(), f"tensor {i} ({dtype}) off by more than 1 ulp"
            if opt.state.get(p):
                assert opt.state[p]["exp_avg"].dtype == torch.float32
                assert not torch.equal(got, before[i]), "the step moved the parameter"
            ref.params[i] = got.clone()  # re-sync: the bound is per step


def test_resume_keeps_float32_moments(tmp_path):
    """torch's load_state_dict casts state to the parameter's dtype; the float32 moments of 16-bit parameters
    must come back as saved, and the resumed run continue bit for bit."""
    dtypes = [torch.bfloat16] * len(SHAPES)
    streams = list(gradients(4, dtypes))
    straight = init_params(dtypes)
    opt = make("adatam", straight)
    resumed = init_params(dtypes)
    first = make("adatam", resumed)
    for k, grads in enumerate(streams):
        for p, q, g in zip(straight, resumed, grads):
            p.grad = q.grad = g
        opt.step()
        if k < 2:
            first.step()
        if k == 1:
            torch.save(first.state_dict(), tmp_path / "opt.pt")
            first = make("adatam", resumed)
            first.load_state_dict(torch.load(tmp_path / "opt.pt"))
            assert all(st["exp_avg"].dtype == torch.float32 for st in first.state.values())
        elif k > 1:
            first.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_reruns_give_the_same_bits():
    dtypes = [torch.float32, torch.bfloat16] * 3
    results = []
    for _ in range(2):
        params = init_params(dtypes)
        opt = make("adatamw", params, bias_correction=True)
        for grads in gradients(3, dtypes):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        results.append([p.detach().clone() for p in params] + [t.clone() for st in opt.state.values()
                                                                 for t in st.values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_functional_api_with_step_counts_as_numbers(launches):
    """adatam(..., fused=True) takes the same kernels; Python step counts (the 8-bit optimizer passes them) give
    the same bits as the class's device counts."""
    from tam_hf.optim.tam import adatam

    dtypes = [torch.float32] * len(SHAPES)
    a, b = init_params(dtypes), init_params(dtypes)
    opt = AdaTAM(a, lr=0.01, fused=True, bias_correction=True)
    ms, vs = [torch.zeros_like(p) for p in b], [torch.zeros_like(p) for p in b]
    s = [torch.zeros((), device=DEVICE) for _ in b]
    for k in range(2):
        grads = [torch.full_like(p, 0.1 * (k + 1)) for p in a]
        for p, g in zip(a, grads):
            p.grad = g
        opt.step()
        adatam(b, grads, ms, vs, s, lr=0.01, beta1=0.9, beta2=0.999, decay_rate=0.9, damping_eps=1e-8, eps=1e-8,
               weight_decay=0.0, fused=True, bias_correction=True, steps=[k + 1.0] * len(b))
    assert launches["step"] == 4
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ------------------------------------------------------------------------------------------- refusals


def test_fused_true_refuses_what_the_kernels_cannot_take():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="parameter 0 of param group 0 is torch.float64"):
        AdaTAM([p], fused=True)
    a, b = torch.nn.Parameter(torch.randn(3, device=DEVICE)), torch.nn.Parameter(torch.randn(2, device="meta"))
    with pytest.raises(ValueError, match="one device per param group: parameter 1 of param group 0 is "
                                         "torch.float32 on meta"):
        AdaTAM([a, b], fused=True)
    with pytest.raises(ValueError, match="complex"):
        AdaTAM([torch.nn.Parameter(torch.randn(2, dtype=torch.complex64, device=DEVICE))], fused=True)


def test_a_sparse_gradient_is_refused_before_any_state_changes():
    a, b = torch.nn.Parameter(torch.randn(4, device=DEVICE)), torch.nn.Parameter(torch.randn(5, device=DEVICE))
    opt = AdaTAM([a, b], fused=True)
    a.grad = torch.randn(4, device=DEVICE)
    b.grad = torch.randn(5, device=DEVICE).to_sparse()
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match="sparse gradients: param group 0, parameter 1"):
        opt.step()
    assert not opt.state and torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_fused_true_never_falls_back_silently(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_reason", lambda device: "triton is not importable (ImportError: test)")
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    with pytest.raises(RuntimeError, match="Triton kernels unavailable on .*triton is not importable"):
        AdaTAM([p], fused=True)
    monkeypatch.setattr(triton_kernels, "_warned", False)
    opt = AdaTAM([p], lr=1e-3)  # the default path takes another path, and says so once
    p.grad = torch.randn(3, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="Triton kernels unavailable"):
        opt.step()
    assert torch.isfinite(p).all()


def test_the_interpreter_is_required_for_cpu_tensors(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_built", False)  # as if the kernels had been built for a GPU
    monkeypatch.setattr(triton_kernels, "_probed", {})
    with pytest.raises(RuntimeError, match="CPU tensors need the Triton interpreter"):
        triton_kernels.load("cpu")


# -------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("path", ["triton", "triton-default", "fused", "single"])
def test_torch_compile_of_a_step(path, monkeypatch):
    """A compiled function calling optimizer.step() runs and matches the eager optimizer. On the Triton path the
    whole step is one graph (the kernels are custom ops, the availability probe a constant): fullgraph=True."""
    if not path.startswith("triton"):
        monkeypatch.delenv(FORCE_ON_CPU, raising=False)
        if DEVICE.type != "cpu":
            pytest.skip("CPU paths")
    options = {"triton": dict(fused=True), "triton-default": dict(bias_correction=True), "fused": dict(fused=True),
               "single": dict(fused=False, foreach=False)}
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(3)).to(DEVICE))
                  for s in [(4, 3), (5,)]]
        opt = AdaTAMW(params, lr=1e-2, **options[path])
        fullgraph = path.startswith("triton")
        fn = torch.compile(opt.step, backend="aot_eager", fullgraph=fullgraph) if compiled else opt.step
        for k in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (k + 1))
            fn()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------- the kernels on real GPUs


def test_every_kernel_variant_lowers_for_nvidia_and_amd_gpus():
    """The interpreter runs the kernels as Python: code that a GPU build rejects would pass there. Lower every
    variant to PTX (sm_90) and AMDGCN (gfx942) -- no GPU needed -- and check that full blocks use vector accesses."""
    pytest.importorskip("triton.backends.nvidia")
    triton_kernels._build()  # binds triton.language in the kernels' module
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    def lower(fn, signature, constexprs, target, last_stage):
        src = ASTSource(JITFunction(fn), signature, constexprs)
        backend = make_backend(target)
        options = backend.parse_options({"num_warps": 4, "enable_fp_fusion": True})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                             context)
        stages, metadata = {}, {"target": target, **options.__dict__}
        backend.add_stages(stages, options, src.language)
        for name, stage in stages.items():
            module = stage(module, metadata)
            if name == last_stage:
                return module
        raise AssertionError(f"no {last_stage} stage")

    device_fns = {**triton_kernels._DEVICE_FNS, **triton_kernels._COMBINE_FNS}
    jit_globals = {name: JITFunction(fn) for name, fn in device_fns.items()}
    common = {"table": "*i64", "n": "i32", "n_chunks": "i32"}
    stats = (triton_kernels._KERNELS["_stats_kernel"],
             {**common, "partial": "*fp64", "sign": "fp32", "wd": "fp32", **dict.fromkeys(
                 ["HAS_WD", "ALIGNED", "CHUNK", "BLOCK"], "constexpr")},
             {"HAS_WD": True, "ALIGNED": True, "CHUNK": 65536, "BLOCK": 1024})
    advance = [(triton_kernels._KERNELS["_advance_kernel"],
                {**common, "partial": "*fp64" if mode < 2 else "*fp32",  # as _step_on_device passes them
                 **dict.fromkeys(["stats", "given", "coef"], "*fp64" if mode == 0 else "*fp32"),
                 **dict.fromkeys(["decay_rate", "one_minus_decay", "damping_eps", "lr", "eps", "log_beta1",
                                  "log_beta2"], "fp32"),
                 **dict.fromkeys(["MODE", "BIAS_CORRECTION", "RBLOCK"], "constexpr")},
                {"MODE": mode, "BIAS_CORRECTION": True, "RBLOCK": 256}) for mode in range(3)]
    updates = [(triton_kernels._KERNELS["_update_kernel"],
                {**common, "coef": "*fp32", **dict.fromkeys(["sign", "wd", "beta1", "beta2", "one_minus_beta2",
                                                              "decay"], "fp32"),
                 **dict.fromkeys(["ADAPTIVE", "HAS_WD", "DECOUPLED", "ALIGNED", "CHUNK", "BLOCK"], "constexpr")},
                {"ADAPTIVE": adaptive, "HAS_WD": True, "DECOUPLED": True, "ALIGNED": aligned, "CHUNK": 65536,
                 "BLOCK": 1024}) for adaptive, aligned in [(True, True), (False, False)]]
    saved = {name: getattr(triton_kernels, name) for name in jit_globals}
    try:  # the kernels call the device functions by their module-level names: give them the jitted ones
        for name, fn in jit_globals.items():
            setattr(triton_kernels, name, fn)
        for fn, sig, constexprs in [stats, *advance, *updates]:
            ptx = lower(fn, sig, constexprs, GPUTarget("cuda", 90, 32), "ptx")
            if fn.__name__ != "_advance_kernel" and constexprs.get("ALIGNED"):
                assert "ld.global.v4" in ptx, f"{fn.__name__}: full blocks should load 16 bytes at a time"
        for fn, sig, constexprs in [stats, updates[0]]:
            lower(fn, sig, constexprs, GPUTarget("hip", "gfx942", 64), "amdgcn")
    finally:
        for name, fn in saved.items():
            setattr(triton_kernels, name, fn)


# ------------------------------------------------------------------------------- the GPU check, here


def test_gpu_check_script_parses_and_its_benchmark_runs(capsys):
    """bench/gpu_check.sh needs a GPU to run; here its shell must parse and the step benchmark must produce its
    table, Triton rows included, on the tiny set (CPU tensors under the interpreter)."""
    import importlib.util
    import shutil
    import subprocess
    from pathlib import Path

    bench = Path(__file__).parent.parent / "bench"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(bench / "gpu_check.sh")], check=True)
    spec = importlib.util.spec_from_file_location("optim_step_gpu", bench / "optim_step_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.lora_shapes()) == 448
    (fp32, bf16) = module.main(["--device", str(DEVICE), "--set", "tiny", "--rounds", "1", "--steps", "1",
                                "--only", "AdamW (fused),AdaTAM (triton"])
    table = capsys.readouterr().out
    for dtype, row in (("float32", fp32), ("bfloat16", bf16)):
        assert row["dtype"] == dtype and row["adatam_vs_adamw"] > 0
    # state bytes / param bytes: AdaTAM keeps two moments, in float32 for bf16 parameters unless asked otherwise
    # (plus a few scalars per tensor: 0.02 on tensors this small)
    ratios = [float(line.rsplit("|", 2)[1]) for line in table.splitlines()
              if line.startswith("| tam_hf AdaTAM (triton) |")]
    assert ratios == pytest.approx([2.0, 4.0], abs=0.05)
    assert "| tam_hf AdaTAM (triton, 16-bit moments) |" in table


@pytest.mark.parametrize("path", ["single", "foreach", "triton"])
@pytest.mark.parametrize("mode", ["auto", "float32", "param"])
def test_moment_dtype_option_sets_the_state_dtype_of_16_bit_parameters_on_every_path(path, mode):
    """moment_dtype: "auto" is float32 on the fused GPU path and the parameter's dtype elsewhere (as torch.optim),
    "float32" is float32 everywhere, "param" is the parameter's dtype everywhere (the documented precision cost)."""
    dtypes = [torch.bfloat16] * len(SHAPES)
    params = init_params(dtypes)
    kw = {"triton": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[path]
    opt = AdaTAMW(params, lr=0.01, moment_dtype=mode, **kw)
    tam = TAM(init_params(dtypes), lr=0.05, moment_dtype=mode, **kw)
    for grads in gradients(2, dtypes):
        for p, q, g in zip(params, tam.param_groups[0]["params"], grads):
            p.grad = q.grad = g
        opt.step()
        tam.step()
    want = torch.float32 if mode == "float32" or (mode == "auto" and path == "triton") else torch.bfloat16
    for o, names in ((opt, ("exp_avg", "exp_avg_sq")), (tam, ("momentum_buffer",))):
        for st in o.state.values():
            assert all(st[n].dtype == want for n in names)
            assert st["s"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("path", ["single", "foreach"])
def test_float32_moments_keep_bf16_parameters_within_one_ulp_per_step_on_the_eager_paths(path):
    """With moment_dtype="float32" the eager paths keep the moments in float32 and round p once per step: within
    1 ulp + 1e-6 relative of the float64 reference per step, as the kernels. (No weight decay: the eager paths,
    like torch's Adam/AdamW, apply it in the parameter's dtype, a bf16 rounding of its own.)"""
    dtypes = [torch.bfloat16] * len(SHAPES)
    params = init_params(dtypes)
    opt = AdaTAM(params, lr=0.01, moment_dtype="float32", foreach=path == "foreach")
    ref = reference("adatam", params)
    for grads in gradients(4, dtypes):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([None if g is None else g.double().cpu() for g in grads])
        for i, p in enumerate(params):
            got, want = p.detach().double().cpu(), ref.params[i]
            assert ((got - want).abs() <= ulps(want, torch.bfloat16) + 1e-6 * want.abs()).all(), f"tensor {i}"
            ref.params[i] = got.clone()
