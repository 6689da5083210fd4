"""torchrun on the CPU (gloo, 2 processes spawned by the tests): the distributed losses and gradients equal the
single-process ones on the concatenated batch, the ranks split each global batch and its augmentation exactly as
one process draws them, and every method file trains under torchrun with rank 0 alone writing."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, make_arrays
from test_train import SMALL_HEADS

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")

LOSS_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import common, simclr, dclw, byol, simsiam, barlow, vicreg
rank, world, _ = common.init_distributed()
torch.manual_seed(0)  # the same full batch on every rank
B, d = 6, 8
full = [torch.randn(B * world, d, dtype=torch.float64) for _ in range(2)]
mine = common.rank_slice(B * world)
# (loss over the global batch, whether the method gathers): BYOL and SimSiam average per-sample losses instead
losses = {"simclr": (lambda a, b: simclr.loss_fn(a, b, 0.2), True),
          "dclw": (lambda a, b: dclw.loss_fn(a, b, 0.1, 0.5), True),
          "barlow": (lambda a, b: barlow.loss_fn(a, b, 5.1e-3), True),
          "vicreg": (lambda a, b: vicreg.loss_fn(a, b), True),
          "byol": (lambda a, b: byol.loss_fn(a, b), False),
          "simsiam": (lambda a, b: simsiam.loss_fn(a, b), False)}
failed = []
for name, (fn, gathers) in losses.items():
    ref_in = [t.clone().requires_grad_() for t in full]
    ref = fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, materialize_grads=True)  # SimSiam: none for its stopped z
    local = [t[mine].clone().requires_grad_() for t in full]
    loss = fn(*(common.gather(t) for t in local)) if gathers else fn(*local)
    grads = torch.autograd.grad(loss, local, materialize_grads=True)
    # what the ranks apply: the mean over ranks of loss and gradients (common.average_gradients, as DDP)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    for g, r in zip(grads, ref_grads):
        if not torch.allclose(g / world, r[mine], atol=1e-10, rtol=1e-8):
            failed.append(f"{name}: gradient differs by {(g / world - r[mine]).abs().max().item()}")
    if not torch.allclose(mean_loss, ref.detach(), atol=1e-12):
        failed.append(f"{name}: loss {mean_loss.item()} vs {ref.item()}")
print(f"rank {rank}: " + ("; ".join(failed) or "all equal"))
dist.destroy_process_group()
sys.exit(1 if failed else 0)
"""


def torchrun(args, **kw):
    return subprocess.run(TORCHRUN + args, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600, **kw)


def test_distributed_losses_and_gradients_equal_single_process():
    r = torchrun(["--no-python", sys.executable, "-c", LOSS_SCRIPT, ROOT])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("all equal") == 2


def test_rank_slices_cover_the_batch_and_carry_the_same_params():
    B, H = 12, 28
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(100, generator=g)[:B]
    params = common.sample_params(B, H, H, 1, g, views=(common.ViewProbs(),) * 2)
    for world in (1, 2, 3, 4):
        parts = [common.rank_slice(B, r, world) for r in range(world)]
        assert torch.equal(torch.cat([perm[s] for s in parts]), perm)  # the union, in order, is the 1-rank batch
        assert torch.equal(torch.cat([params[:, s] for s in parts], 1), params)
    with pytest.raises(SystemExit, match="--batch-size 10 is the global batch: it must divide evenly over 4 ranks"):
        common.rank_slice(10, 0, 4)


@pytest.fixture
def tiny_dir(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(32, 16, 16)))
    return tmp_path


def method_args(script, data_dir, out, *extra):
    return [os.path.join(ROOT, script), "--data", "pneumonia", "--batch-size", "16", "--epochs", "1",
            "--eval-every", "1", *SMALL_HEADS[script], "--data-dir", str(data_dir), "--out", str(out), *extra]


# a rank-0-writes check that also records every rank's final weights: each rank saves its model in save_state
WRAP = r"""
import os, runpy, sys, torch
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import common, runs
save = runs.save_state
def save_state(path, args, method, data_id, epoch, model, *rest):
    save(path, args, method, data_id, epoch, model, *rest)
    torch.save(model.state_dict(), os.path.join(os.path.dirname(path), f"weights-rank{common.RANK}.pt.dbg"))
runs.save_state = save_state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", list(SMALL_HEADS))
def test_each_method_under_torchrun_two_ranks(script, tiny_dir, tmp_path):
    out = tmp_path / "run"
    r = torchrun(["--no-python", sys.executable, "-c", WRAP, *method_args(script, tiny_dir, out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(out)) == [".lock", "backbone.pt", "checkpoint.pt", "metrics.jsonl", "results.json",
                                       "weights-rank0.pt.dbg", "weights-rank1.pt.dbg"]  # rank 0 alone writes
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "step" in r]
    assert [r["step"] for r in train_rows] == [0, 1]  # 32 images / global batch 16, logged once (rank 0)
    assert all(np.isfinite(r["train/loss"]) and r["train/z_std"] > 0 for r in train_rows)
    assert len([r for r in rows if "val/knn_acc" in r]) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == script[:-3] and res["data"] == "pneumonia" and res["size"] == 28 and res["epochs"] == 1
    for proto in ("knn", "linear", "linear_1pct", "linear_10pct"):
        assert set(res[proto]) >= {"acc", "auc", "f1_weighted", "balanced_acc"} and 0 <= res[proto]["acc"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["epochs"] == 1 and "optimizer" in ckpt
    w0, w1 = (torch.load(out / f"weights-rank{k}.pt.dbg", weights_only=True) for k in (0, 1))
    for k in w0:  # parameters and (broadcast) BN statistics identical on both ranks; BYOL's target too
        assert torch.equal(w0[k], w1[k]), k


def test_torchrun_kill_and_resume_completes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = method_args("simclr.py", tiny_dir, out, "--epochs", "3")
    p = subprocess.Popen(TORCHRUN + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.1)
    # SIGKILL the launcher and both ranks at once (the ranks may run in process groups of their own)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    p.wait()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 1
    r = torchrun(args + ["--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and json.loads((out / "results.json").read_text())["epochs"] == 3
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps == list(range(6)), steps
