"""The compiled op (csrc/augment.cpp, .cu) against augment_reference, opcheck, bad arguments, and the fallback."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import common
from csrc import augment as aug
from csrc.augment import P, TOP, LEFT, HEIGHT, WIDTH, BRIGHT, CONTRAST, SAT, SIGMA, augment_reference, blur_kernel_size

# max abs difference in normalized units, float32. CUDA builds with --use_fast_math (approximate exp/divide):
# measured 1.4e-4 on an H100 at 224->96 px; 5e-4 is still ~1/40 of one 8-bit grey level after normalizing by std 0.2.
TOL = {"cpu": 1e-4, "cuda": 5e-4}
VIEWS = (common.ViewProbs(), common.ViewProbs(jitter=1, gray=0.5, blur=1, solarize=0.5))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def op():
    return aug.load_op()


def batch(B, C, H, W, seed, views=VIEWS, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    return images.to(device), common.sample_params(B, H, W, C, g, views=views).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("H,W,size", [(28, 28, 28), (33, 33, 33), (64, 64, 64), (31, 45, 27), (224, 224, 96)])
def test_op_matches_reference(op, device, C, H, W, size):
    images, params = batch(24, C, H, W, seed=H * 10 + C, device=device)
    mean, std = [0.45, 0.5, 0.55][:C], [0.2, 0.25, 0.3][:C]
    k = blur_kernel_size(size)
    got = op(images, params, size, mean, std, k)
    want = augment_reference(images.cpu(), params.cpu(), size, mean, std, k)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.device.type == device
    err = (got.cpu() - want).abs().max().item()
    assert err <= TOL[device], f"max abs diff {err}"


@pytest.mark.parametrize("device", DEVICES)
def test_op_edge_cases(op, device):
    """Full-image and 1-pixel crops touching each border, tiny sigma, all flags off, all flags on."""
    C, H = 3, 20
    images = torch.randint(0, 256, (6, C, H, H), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    p = torch.zeros(2, 6, P)
    p[..., BRIGHT] = p[..., CONTRAST] = p[..., SAT] = 1.0
    p[..., SIGMA] = 1.0
    p[:, :, HEIGHT] = p[:, :, WIDTH] = H
    boxes = [(0, 0, H, H), (H - 1, H - 1, 1, 1), (0, 0, 1, 1), (0, H - 5, H, 5), (H - 3, 0, 3, H), (4, 4, 9, 9)]
    for b, box in enumerate(boxes):
        p[0, b, [TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor(box, dtype=torch.float32)
        p[1, b] = torch.tensor([*box, 1, 1, 1.3, 0.6, 1.4, 0.1 - 0.04 * b, 1, 1, 1e-3 if b == 3 else 2.0, 1])
    mean, std = [0.5] * 3, [0.5] * 3
    got = op(images.to(device), p.to(device), H, mean, std, 5).cpu()
    want = augment_reference(images, p, H, mean, std, 5)
    assert (got - want).abs().max() <= TOL[device]
    assert torch.allclose(got[0, 0], (images[0].float() / 255 - 0.5) / 0.5, atol=1e-6)  # identity view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3])
def test_op_bfloat16_output(op, device, C):
    """dtype=bfloat16: the same float32 arithmetic, rounded once at the store (<= 1 bf16 ulp from the reference)."""
    images, params = batch(16, C, 40, 40, seed=5 + C, device=device)
    mean, std = [0.5] * C, [0.2] * C
    got = op(images, params, 40, mean, std, 5, torch.bfloat16)
    want = augment_reference(images.cpu(), params.cpu(), 40, mean, std, 5)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.cpu().float() - want).abs()
    assert (err <= 2 ** -8 * want.abs() + 1e-4).all(), err.max()
    fp32 = op(images, params, 40, mean, std, 5)
    if device == "cpu":
        assert torch.equal(got, fp32.to(torch.bfloat16))  # same float32 result, rounded to nearest even once
    else:  # nvcc may fuse multiply-adds differently in the two instantiations: the float32 values can differ in
        # their last bit, which flips a rounding near a tie (seen on an H100): at most one bf16 ulp apart
        assert ((got.float() - fp32.to(torch.bfloat16).float()).abs() <= 2 ** -8 * fp32.abs().cpu().to(got.device)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(op, device):
    images, params = batch(4, 3, 28, 28, seed=0, device=device)
    torch.library.opcheck(op, (images, params, 28, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 3))
    images, params = batch(3, 1, 33, 33, seed=1, device=device)
    torch.library.opcheck(op, (images, params, 17, [0.5], [0.2], 3))
    torch.library.opcheck(op, (images, params, 17, [0.5], [0.2], 3, torch.bfloat16))


def test_op_draws_no_random_numbers(op):
    images, params = batch(8, 3, 28, 28, seed=2)
    torch.manual_seed(0)
    a = op(images, params, 28, [0.5] * 3, [0.2] * 3, 3)
    state = torch.get_rng_state()
    b = op(images, params, 28, [0.5] * 3, [0.2] * 3, 3)
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_op_rejects_bad_arguments(op):
    images, params = batch(4, 1, 28, 28, seed=0)
    ok = (28, [0.5], [0.2], 3)
    cases = [
        ((images.float(), params, *ok), "images must be uint8"),
        ((images[0], params, *ok), "images must be N x C x H x W"),
        ((torch.zeros(4, 2, 28, 28, dtype=torch.uint8), params, *ok), "1 or 3 channels"),
        ((images[:0], params[:, :0], *ok), "empty batch"),
        ((images.transpose(2, 3), params, *ok), "contiguous"),
        ((images, params.double(), *ok), "params must be float32"),
        ((images, params[:, :2], *ok), r"params must be \(V, 4, 14\)"),
        ((images, params, 0, [0.5], [0.2], 3), "size must be >= 1"),
        ((images, params, 28, [0.5], [0.2], 4), "blur_kernel must be odd"),
        ((images, params, 28, [0.5, 0.5], [0.2, 0.2], 3), "mean and std need 1 entries"),
        ((images, params, 28, [0.5], [0.0], 3), "std must be > 0"),
        ((images, params, 28, [0.5], [0.2], 3, torch.float16), "dtype must be float32 or bfloat16"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_rejects_device_mismatch(op):
    images, params = batch(4, 1, 28, 28, seed=0)
    with pytest.raises(RuntimeError, match="params on"):
        op(images.cuda(), params, 28, [0.5], [0.2], 3)


def test_dispatch_uses_op_and_falls_back_with_one_warning(op, monkeypatch):
    monkeypatch.delenv("MEDSSL_REQUIRE_OP", raising=False)  # make gpu-check sets it; this test wants the fallback
    images, params = batch(4, 1, 28, 28, seed=3)
    args = (images, params, 28, [0.5], [0.2])
    assert torch.allclose(aug.augment(*args), augment_reference(*args), atol=TOL["cpu"])
    monkeypatch.setenv("MEDSSL_OP", "0")  # forced reference: bit-identical to it
    assert torch.equal(aug.augment(*args), augment_reference(*args))
    monkeypatch.setenv("MEDSSL_OP", "1")

    def broken(verbose=False):
        raise RuntimeError("medssl: could not build the augmentation op in csrc/: simulated")
    monkeypatch.setattr(aug, "load_op", broken)
    monkeypatch.setattr(aug, "_warned", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = aug.augment(*args)
        aug.augment(*args)
    assert torch.equal(a, augment_reference(*args))
    assert len([x for x in w if "Falling back" in str(x.message)]) == 1
    monkeypatch.setenv("MEDSSL_REQUIRE_OP", "1")
    with pytest.raises(RuntimeError, match="simulated"):
        aug.augment(*args)


# ------------------------------------------------------------------------------------------------ invalid params
# One crafted params value per validity rule (csrc/augment.py, "Valid params"): (field, value, extra fields).
# On a 28 px image with every step off, image 0 all black and image 1 all white, so a view of image 0 that reads
# anything of image 1 (out-of-bounds memory) shows white pixels.
BAD_PARAMS = [("HEIGHT", float("inf"), {}), ("HEIGHT", 1e6, {}), ("HEIGHT", float("nan"), {}), ("HEIGHT", -5, {}),
              ("HEIGHT", 0, {}), ("WIDTH", 2.5, {}), ("WIDTH", 29, {}), ("TOP", 20, {}), ("TOP", -100000, {}),
              ("LEFT", -1, {"WIDTH": 10}), ("LEFT", 1e30, {}), ("FLIP", 0.5, {}), ("BLUR", 2, {}), ("GRAY", float("nan"), {}),
              ("SOLARIZE", -1, {}), ("SIGMA", 0, {"BLUR": 1}), ("SIGMA", float("nan"), {"BLUR": 1}),
              ("BRIGHT", float("inf"), {"JITTER": 1}), ("BRIGHT", -1, {"JITTER": 1}), ("CONTRAST", -0.5, {}),
              ("SAT", -2, {})]
SAFETY_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from csrc import augment as aug
device, cases = sys.argv[2], json.loads(sys.argv[3])
op = aug.load_op()
images = torch.stack([torch.zeros(1, 28, 28), torch.full((1, 28, 28), 255.0)]).to(torch.uint8)
out = []
for field, value, extra in cases:
    p = torch.zeros(1, 2, aug.P)
    p[..., aug.HEIGHT] = p[..., aug.WIDTH] = 28
    p[..., aug.BRIGHT] = p[..., aug.CONTRAST] = p[..., aug.SAT] = p[..., aug.SIGMA] = 1.0
    for f, v in {**extra, field: value}.items():
        p[0, 0, aug.NAMES.index(f)] = v
    res = {}
    for name, call in (("reference", lambda: aug.augment_reference(images, p, 28, [0.0], [1.0])),
                       ("wrapper", lambda: aug.augment(images, p, 28, [0.0], [1.0])),
                       ("op", lambda: op(images.to(device), p.to(device), 28, [0.0], [1.0], 3))):
        try:
            y = call()
            if device == "cuda":
                torch.cuda.synchronize()
            # values of view 0 of the black image: > 0.5 can only come from the white image's memory
            res[name] = "returned, max %g" % y[0, 0].float().nan_to_num(0.0).max().item()
        except (ValueError, RuntimeError) as e:
            res[name] = "raised: " + str(e).splitlines()[0]
    out.append(res)
print("RESULT " + json.dumps(out))
"""


def run_safety(device, cases):
    r = subprocess.run([sys.executable, "-c", SAFETY_SCRIPT, os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        device, json.dumps(cases)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the op crashed (rc {r.returncode}):\n{r.stderr[-3000:]}"  # e.g. -11: SIGSEGV
    return json.loads(r.stdout.split("RESULT ", 1)[1])


def test_invalid_params_raise_naming_view_sample_and_field(op):
    """Each rule, in a subprocess (a crash fails this test instead of killing pytest): the reference, the wrapper
    and the CPU op raise with the field, view 0 and sample 0 named."""
    for (field, value, _), res in zip(BAD_PARAMS, run_safety("cpu", BAD_PARAMS)):
        for name in ("reference", "wrapper", "op"):
            assert res[name].startswith("raised: augment: params[0, 0, " + field + "]"), (field, value, name, res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_is_memory_safe_for_any_params(op):
    """CUDA params are not read back (no sync): the kernel must clamp the box and never read the next image."""
    for (field, value, _), res in zip(BAD_PARAMS, run_safety("cuda", BAD_PARAMS)):
        if field in ("TOP", "LEFT", "HEIGHT", "WIDTH"):
            assert res["op"] == "returned, max 0", (field, value, res)


def test_valid_params_pass_and_sample_params_checks_its_output():
    g = torch.Generator().manual_seed(0)
    for H, W in ((28, 28), (5, 64), (64, 3)):
        aug.check_params(common.sample_params(64, H, W, 3, g, views=VIEWS), H, W)  # no error
    with pytest.raises(ValueError, match=r"params\[0, 0, BRIGHT\] = nan: expected a finite number"):
        common.sample_params(4, 28, 28, 1, g, views=VIEWS, strength=(float("nan"), 0.4, 0.4, 0.1))


def test_fake_kernel_checks_shapes_and_gives_the_output_shape(op):
    """What torch.compile / FakeTensor tracing sees: the output shape, and the shape errors the kernels raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        images = torch.empty(4, 3, 30, 30, dtype=torch.uint8)
        out = op(images, torch.empty(2, 4, P), 17, [0.5] * 3, [0.2] * 3, 3, torch.bfloat16)
        assert out.shape == (2, 4, 3, 17, 17) and out.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match=r"params must be float32 \(V, 4, 14\)"):
            op(images, torch.empty(2, 5, P), 17, [0.5] * 3, [0.2] * 3, 3)
        with pytest.raises(RuntimeError, match="one mean/std per channel"):
            op(images, torch.empty(2, 4, P), 17, [0.5], [0.2], 3)
