"""The fake-quant model (reference.fakequant.FakeQuantModel): one model for every program, its
options on ViT and Swin programs, the options it refuses, and the registry's fake-quant sections."""
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from calib import CalibConfig, calibrate
from intsim import ops
from intsim.engine import Engine
from intsim.program.program import Program
from reference.fakequant import FakeQuantContext, FakeQuantModel

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.2)
ATTENTION_TYPES = {"attention": 4, "window_attention": 5}     # op type -> rank of its post-softmax values


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 1, 1))
    return np.clip(base + rng.normal(0, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)


def make_program(arch):
    torch.manual_seed(0)
    if arch == "vit":
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    else:   # 16x16 then 8x8 token grids, window 4: shifted windows with masks in both stages
        model = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                                window_size=4, num_classes=5)
    return calibrate(model.eval(), images(8, seed=1), MEAN, STD, CalibConfig(wbits=4, abits=4), progress=False)


@pytest.fixture(scope="module", params=["vit", "swin"])
def prog(request):
    return make_program(request.param)


def test_every_op_module_has_a_fake_quant_forward():
    for name, module in ops.MODULES.items():
        params = list(inspect.signature(module.fq_forward).parameters)
        assert params[:2] == ["ctx", "op"], name
        assert len(params) - 2 == module.INPUTS, name
        prepare = getattr(module, "fq_prepare", None)
        assert prepare is None or list(inspect.signature(prepare).parameters) == ["ctx", "op"], name


def test_registry_imports_neither_torch_nor_reference():
    """The fake-quant sections get torch and the float functions through ``ctx``: loading a program
    (and the engine) stays free of torch."""
    code = ("import sys, intsim.ops, intsim.program.format, intsim.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'reference')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_model_runs_every_op_and_quantizes_codes(prog):
    x = images(5, seed=2)
    batches = {}
    out = FakeQuantModel(prog).forward(x, tap=lambda n, t: batches.setdefault(n, []).append(t), batch_size=2)
    assert out.dtype == torch.float32 and out.shape == (5, prog.model["num_classes"])
    assert list(batches) == [op["output"] for op in prog.ops]
    seen = {n: torch.cat(ts) for n, ts in batches.items()}
    assert torch.equal(seen[prog.output].reshape(5, -1), out)
    for name, t in seen.items():
        v = prog.values[name]
        if v["kind"] == "codes":       # on the value's grid, inside its code range
            q = t.double() / float(v["scale"]) + int(v["zero_point"])
            assert torch.allclose(q, q.round(), atol=1e-3), name
            assert q.min() >= -1e-3 and q.max() <= (1 << int(v["bits"])) - 1 + 1e-3, name


def test_fake_quant_tracks_the_engine(prog):
    x = images(6, seed=3)
    e = Engine(prog).run(x)
    f = FakeQuantModel(prog)(x).double().numpy()
    el = e.logits * e.scale
    cos = (el * f).sum(1) / (np.linalg.norm(el, axis=1) * np.linalg.norm(f, axis=1))
    assert cos.min() > 0.9


def test_float64_and_int_grid(prog):
    x = images(4, seed=4)
    base = FakeQuantModel(prog)(x)
    f64 = FakeQuantModel(prog, dtype=torch.float64)(x)
    grid = FakeQuantModel(prog, int_grid=True)(x)
    assert f64.dtype == torch.float64 and grid.dtype == torch.float32
    assert torch.allclose(f64.float(), base, rtol=1e-2, atol=1e-2 * float(base.abs().max()))
    # the output ("int" logits) of the int-grid sibling lies on the program's logit grid; every int value too
    v = prog.values[prog.output]
    assert v["kind"] == "int"
    q = grid.double() / float(v["scale"])
    assert torch.allclose(q, q.round(), atol=1e-4)
    seen = {}
    FakeQuantModel(prog, int_grid=True, dtype=torch.float64).forward(x[:2], tap=lambda n, t: seen.__setitem__(n, t))
    ints = [n for n, v in prog.values.items() if v["kind"] == "int"]
    assert ints
    for n in ints:
        assert seen[n].dtype == torch.float64
        q = seen[n] / float(prog.values[n]["scale"])
        assert torch.allclose(q, q.round(), atol=1e-6), n
        assert q.abs().max() <= 1 << (int(prog.values[n]["bits"]) - 1)


def test_probs_transform_sees_every_attention_op(prog):
    x = images(3, seed=5)
    calls = []

    def record(name, p):
        calls.append((name, p.shape))
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)     # float post-softmax rows
        return p

    attn = [op for op in prog.ops if op["type"] in ATTENTION_TYPES]
    assert attn
    same = FakeQuantModel(prog, probs_transform=record)(x)
    assert [n for n, _ in calls] == [op["name"] for op in attn]
    for (_, shape), op in zip(calls, attn):
        assert len(shape) == ATTENTION_TYPES[op["type"]] and shape[0] == 3
    assert torch.equal(same, FakeQuantModel(prog)(x))          # the identity edit changes nothing
    def first_key(name, p):             # all of each row's mass on its first key
        q = torch.zeros_like(p)
        q[..., 0] = 1.0
        return q

    assert not torch.equal(FakeQuantModel(prog, probs_transform=first_key)(x), same)


def test_forwards_replace_one_op_type(prog):
    x = images(3, seed=6)
    gelu = ops.get("gelu")
    calls = []

    def counted(ctx, op, x):
        calls.append(op["name"])
        return gelu.fq_forward(ctx, op, x)

    ref = FakeQuantModel(prog)(x)
    assert torch.equal(FakeQuantModel(prog, forwards={"gelu": counted})(x), ref)
    assert calls == [op["name"] for op in prog.ops if op["type"] == "gelu"]
    zero = FakeQuantModel(prog, forwards={"gelu": lambda ctx, op, x: torch.zeros_like(x)})(x)
    assert not torch.equal(zero, ref)


def test_hybrid_with_every_integer_op_equals_the_engine(prog):
    """The sensitivity study's hybrid (every op run by the engine through ``forwards``) is the engine,
    on Swin programs as on ViT ones."""
    from intsim.studies.sensitivity import hybrid_fakequant
    x = images(3, seed=7)
    got = hybrid_fakequant(prog, {op["type"] for op in prog.ops})(x).double().numpy()
    eng = Engine(prog).run(x)
    np.testing.assert_array_equal(np.round(got / eng.scale).astype(np.int64), eng.logits)


def test_refused_options(prog):
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        FakeQuantModel(prog, dtype=torch.float16)
    absent = "attention" if prog.model.get("arch") == "swin" else "window_attention"
    with pytest.raises(ValueError, match=f"op types this program does not have: {absent}"):
        FakeQuantModel(prog, forwards={absent: lambda ctx, op, *xs: xs[0]})
    first = next(i for i, op in enumerate(prog.ops) if op["type"] in ATTENTION_TYPES)
    no_softmax = Program({**prog.header, "ops": prog.ops[:first]}, prog.tensors)
    with pytest.raises(ValueError, match="probs_transform: this program has no op with a post-softmax quantizer"):
        FakeQuantModel(no_softmax, probs_transform=lambda n, p: p)


def test_context_parameters_are_float32_values_in_the_model_dtype(prog):
    ctx = FakeQuantContext(prog, torch.float64)
    t = ctx.tensor(np.array([1 / 3], dtype=np.float64))
    assert t.dtype == torch.float64 and t.item() == float(np.float32(1 / 3))
    assert ctx.eps == float(prog.model.get("ln_eps", 1e-6))
    m = FakeQuantModel(prog, dtype=torch.float64)
    for name, params in m.ctx.params.items():
        for key, v in params.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float64, (name, key)
                assert torch.equal(v, v.float().double()), (name, key)
