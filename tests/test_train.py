"""The method scripts end to end as subprocesses on tiny synthetic data: outputs, resume, NaN guard, evaluate.py."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, kill_during_epoch, make_arrays

TINY = ["--data", "pneumonia", "--batch-size", "16", "--epochs", "2", "--eval-every", "1"]
SMALL_HEADS = {"simclr.py": ["--proj-hidden", "64"], "byol.py": ["--proj-hidden", "64", "--proj-dim", "32"],
               "simsiam.py": ["--proj-dim", "64", "--pred-hidden", "16"], "barlow.py": ["--proj-dim", "64"],
               "dclw.py": ["--proj-hidden", "64"], "vicreg.py": ["--proj-dim", "64"]}
METHODS = list(SMALL_HEADS)


def command(script, data_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, script), *TINY, *SMALL_HEADS[script], "--data-dir", str(data_dir),
            "--out", str(out), *extra]


def run(script, data_dir, out, *extra, check=True):
    cmd = command(script, data_dir, out, *extra)
    env = dict(os.environ, MEDSSL_OP=os.environ.get("MEDSSL_OP", "1"), OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture
def tiny_dir(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(48, 16, 16)))
    return tmp_path


# SimSiam and Barlow Twins here; BYOL in the kill-and-resume test, SimCLR in evaluate.py's; all six under torchrun
# (tests/test_distributed.py, with the same output checks) and in-process (tests/test_wiring.py)
@pytest.mark.parametrize("script", ["simsiam.py", "barlow.py"])
def test_two_epochs_write_checkpoint_metrics_results(script, tiny_dir, tmp_path):
    out = tmp_path / "run"
    run(script, tiny_dir, out)
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == script[:-3] and res["data"] == "pneumonia" and res["size"] == 28 and res["epochs"] == 2
    for proto in ("knn", "linear", "linear_1pct", "linear_10pct"):  # label fractions: at least 1 label per class
        assert set(res[proto]) >= {"acc", "auc", "f1_weighted", "balanced_acc"}
        assert 0 <= res[proto]["acc"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 * 3  # 48 images / batch 16 = 3 steps per epoch
    assert all(np.isfinite(r["train/loss"]) and r["train/z_std"] > 0 for r in train_rows)
    # LARS's share of weight tensors whose step eta set (Barlow Twins), 0 for plain SGD (SimSiam)
    shares = [r["train/eta_share"] for r in train_rows]
    assert all(0 <= v <= 1 for v in shares) and (max(shares) > 0) == (script == "barlow.py"), shares
    assert len([r for r in rows if "val/knn_acc" in r]) == 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2 and "optimizer" in ckpt
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# BYOL alone: its state is every method's (weights, optimizer, generator, schedule, log) plus its target and EMA
# step; SimCLR's resume runs under torchrun in test_distributed.py. Two epochs: killed in the last one
@pytest.mark.parametrize("script", ["byol.py"])
def test_kill_and_resume_matches_uninterrupted(script, tiny_dir, tmp_path):
    extra = ["--epochs", "2"]
    full = tmp_path / "full"
    run(script, tiny_dir, full, *extra)
    # the same run, killed (SIGKILL) while it trains epoch 2, then resumed
    part = tmp_path / "part"
    cmd = command(script, tiny_dir, part, *extra)
    kill_during_epoch(cmd, part, 1, dict(os.environ, OMP_NUM_THREADS="2"))
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1  # killed mid-epoch 2
    run(script, tiny_dir, part, *extra, "--resume")
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    if script == "byol.py":
        assert any(k.startswith("target.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = lambda d: [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines() if "step" in x]
    assert steps(part) == steps(full) == list(range(6))  # no duplicated or missing steps in the resumed log


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import simclr
    calls = []

    def loss_fn(z1, z2, temperature):  # the real loss for two epochs (3 steps each), then NaN
        calls.append(1)
        return simclr_loss(z1, z2, temperature) * (float("nan") if len(calls) > 6 else 1.0)
    simclr_loss = simclr.loss_fn
    monkeypatch.setattr(simclr, "loss_fn", loss_fn)
    out = tmp_path / "nan"
    args = simclr.Args(data="pneumonia", data_dir=str(tiny_dir), batch_size=16, epochs=3, eval_every=5,
                       proj_hidden=64, out=str(out))
    with pytest.raises(SystemExit, match=r"loss is nan at epoch 3 step 1; stopped, the last good checkpoint "
                                         r"\(epoch 2\) is"):
        simclr.main(args)
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 2 and not (out / "results.json").exists()


def test_evaluate_script_checkpoint_and_random(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run("simclr.py", tiny_dir, out, "--epochs", "1")
    moved = tmp_path / "moved"  # the data moved after training: --data-dir must win over the checkpoint's
    moved.mkdir()
    os.rename(tiny_dir / "pneumoniamnist.npz", moved / "pneumoniamnist.npz")
    env = dict(os.environ, MEDSSL_DATA_DIR=str(moved))
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir",
                        str(moved)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "linear" in r.stdout and json.loads((out / "eval.json").read_text())["method"] == "simclr"
    rnd = tmp_path / "random.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--data", "pneumonia", "--init", "random", "--out", str(rnd),
                        "--finetune-epochs", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(rnd.read_text())
    assert res["method"] == "random" and res["linear"]["auc"] > 0.9  # the synthetic classes differ in brightness
    assert res["finetune"]["epochs"] == 1 and 0 <= res["finetune"]["acc"] <= 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(bad)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode != 0 and "bad.pt: not a readable medssl checkpoint" in r.stderr


def test_a_collapsing_projection_is_said(tiny_dir, tmp_path, monkeypatch, capsys):
    """z_std under a tenth of 1/sqrt(D) at a monitor epoch prints a line (issue 32: --lr 1e6 trained on silently
    while z_std fell 0.05 -> 0.003); a healthy run prints none. Collapse planted: a projector whose output is one
    point for every image (z_std 0)."""
    import simclr

    class OnePoint(simclr.Projector):
        def forward(self, h):
            return self.net(h) * 0 + 1  # every image at the same point, still differentiable
    args = simclr.Args(data="pneumonia", data_dir=str(tiny_dir), batch_size=16, epochs=1, eval_every=1,
                       proj_hidden=64, out=str(tmp_path / "healthy"))
    simclr.main(args)
    assert "projections are collapsing" not in capsys.readouterr().out
    monkeypatch.setattr(simclr, "Projector", OnePoint)
    simclr.main(dataclasses.replace(args, out=str(tmp_path / "collapsed")))
    assert "epoch 1: z_std 0.0000 < 0.1/sqrt(D): the projections are collapsing" in capsys.readouterr().out
