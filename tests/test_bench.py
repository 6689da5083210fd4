"""bench.py runs end to end on a tiny configuration and writes the report the README's table is made from; the
compiled step (--compile) and the op inside torch.compile match eager."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import simclr
from conftest import ROOT


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--sizes", "28", "--channels", "1", "3", "--batch", "8",
                        "--repeats", "1", "--step-batch", "8", "--devices", "cpu", "--e2e", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["threads"] >= 1 and rep["torch"] and rep["copy_GB_per_s"]["cpu"] > 0
    impls = {(a["size"], a["channels"], a["impl"]) for a in rep["augment"]}
    assert impls == {(28, c, i) for c in (1, 3) for i in ("op", "reference", "tv-loop")}
    assert all(a["images_per_s"] > 0 and a["op_speedup"] > 0 for a in rep["augment"])
    assert 0 < rep["step"][0]["augment_share"] < 1
    assert "SimCLR step" in r.stdout and os.path.exists(out)


def test_bench_end_to_end_rows(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--sizes", "28", "--channels", "1", "--batch", "8", "--repeats", "1",
                        "--step-batch", "8", "--devices", "cpu", "--e2e", "pneumonia", "--e2e-batch", "8",
                        "--e2e-steps", "1", "--workers", "0", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["e2e"]
    assert [(x["pipeline"], x["workers"]) for x in rows] == [("medssl", 0), ("dataloader", 0), ("dataloader", 1)]
    assert rows[0]["step_TFLOP"] > 0 and rows[0]["medssl_speedup"] == 1.0
    assert all(x["images_per_s"] > 0 and x["batch"] == 8 for x in rows)
    assert "DataLoader, 1 workers" in r.stdout and "TFLOP/s" in r.stdout


def test_compiled_step_matches_eager():
    """--compile's path: the backbone compiled whole (fullgraph: no graph breaks, which CUDA graphs need) gives the
    eager SimCLR loss and gradients. aot_eager traces forward and backward as inductor would, without the minute of
    C++ code generation on this CPU; inductor itself runs in the GPU script."""
    import simclr
    torch.manual_seed(0)
    backbone, dim = common.make_backbone("resnet18", 1, 28)
    projector = simclr.Projector(dim, 64, 32)
    x = torch.randn(8, 1, 28, 28)

    def loss_and_grads():
        loss = simclr.loss_fn(*projector(backbone(x)).chunk(2), 0.2)
        grads = torch.autograd.grad(loss, list(backbone.parameters()))
        return loss.detach(), grads
    eager = loss_and_grads()
    backbone.compile(backend="aot_eager", fullgraph=True)
    compiled = loss_and_grads()
    assert torch.allclose(eager[0], compiled[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager[1], compiled[1]))


def test_the_op_inside_a_fullgraph_compiled_function():
    """The fake kernel lets torch.compile trace through torch.ops.medssl.augment without a graph break."""
    from csrc import augment as aug
    op = aug.load_op()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    params = common.sample_params(4, 28, 28, 1, g, views=(common.ViewProbs(),) * 2)

    def f(images, params):
        return op(images, params, 28, [0.5], [0.2], 3).mean(dim=(2, 3, 4)) * 2
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(images, params)
    assert torch.allclose(got, f(images, params))



@pytest.mark.parametrize("dtype,loss_rtol,grad_rtol", [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-2)])
def test_channels_last_training_step_matches_contiguous(dtype, loss_rtol, grad_rtol):
    """The method files train in channels_last (NHWC) on the CPU too, because bench.py measures it faster: one
    training step (ResNet-18 + projector, SimCLR's loss) must give the same loss and gradients as the contiguous
    NCHW layout. In float64 they agree to rounding (measured 7e-14); in float32 the summation order of the NHWC
    kernels moves the gradients by up to 0.4% of their norm (measured: the contrastive gradient is a difference of
    near-equal terms), the loss by < 1e-6. A wrong permutation would be off by O(1)."""
    import copy
    torch.manual_seed(0)
    backbone, dim = common.make_backbone("resnet18", 1, 28)
    nchw = torch.nn.ModuleDict({"backbone": backbone, "projector": simclr.Projector(dim, 256, 64)}).to(dtype)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    # (conv1 has one input channel, so its two layouts coincide: check a 64 -> 64 conv)
    assert nhwc.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(dtype)
    losses = []
    for model, fmt in ((nchw, torch.contiguous_format), (nhwc, torch.channels_last)):
        z = model["projector"](model["backbone"](x.contiguous(memory_format=fmt)))
        loss = simclr.loss_fn(*z.chunk(2), 0.2)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=loss_rtol)
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        assert (b.grad - a.grad).norm() <= grad_rtol * a.grad.norm(), name


def test_the_timed_step_is_simclr_py_s_step():
    """bench.py times simclr.py's own step, built from its parts and its Args defaults (planted: the old bench step,
    a 512 -> 128 projector with plain SGD and t = 0.5, fails every line), and feeds it simclr.py's views."""
    import bench
    args = simclr.Args()
    step = bench.simclr_step(torch.device("cpu"), 1, 28, 64)
    proj = step.model["projector"].net
    assert (proj[0].out_features, proj[-1].out_features) == (args.proj_hidden, args.proj_dim)
    assert type(step.optimizer) is type(common.make_optimizer(args.optimizer, [torch.zeros(1)], 1.0, 0.0))
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(args.lr * 64 / 256)
    assert step.optimizer.param_groups[0]["weight_decay"] == args.weight_decay
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    x1, x2 = bench.medssl_views(images, 28, [0.5], [0.25], torch.device("cpu"))(torch.arange(8))
    assert x1.shape == x2.shape == (8, 1, 28, 28) and not torch.equal(x1, x2)
    torch.manual_seed(0)
    want = simclr.loss_fn(*step.model["projector"](step.model["backbone"](torch.cat([x1, x2]))).chunk(2),
                          args.temperature)
    assert step(x1, x2).item() == pytest.approx(want.item(), rel=1e-4)  # its loss: simclr.py's, at its temperature
