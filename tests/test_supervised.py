"""supervised.py, the supervised-from-scratch baseline as a training script: it learns a visible class and exports
its backbone, reports the test metrics of the best-val epoch (scripted val scores against a hand-picked answer),
resumes a killed run to the uninterrupted one (weights, best epoch, results), and refuses what it cannot resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import runs
import supervised
from conftest import ROOT, kill_during_epoch, make_arrays


@pytest.fixture
def data_dir(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(96, 24, 48), seed=3))
    return tmp_path


def args(data_dir, out, **kw):
    return supervised.Args(**{"data": "pneumonia", "data_dir": str(data_dir), "batch_size": 32, "epochs": 4,
                              "out": str(out), **kw})


def test_supervised_learns_the_visible_class_and_exports_its_backbone(data_dir, tmp_path):
    res = supervised.main(args(data_dir, tmp_path / "run", lr=0.4))
    assert res["method"] == "supervised" and res["epochs"] == 4 and res["supervised"]["acc"] > 0.9
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["supervised"] == res["supervised"] and len(saved["embedding"]["xy"]) == 48
    assert 0 <= res["supervised"]["epoch"] <= 4 and res["supervised"]["epochs"] == 4
    net, info = runs.load_backbone(str(tmp_path / "run" / "backbone.pt"))  # like a method's (hubconf.py)
    assert info["method"] == "supervised" and info["size"] == 28 and info["in_channels"] == 1
    rows = runs.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert len([r for r in rows if "train/loss" in r]) == 4 * 3  # 96 images / batch 32 = 3 steps per epoch
    assert [r["epoch"] for r in rows if "val/auc" in r] == [0, 1, 2, 3]  # the val split scored after every epoch


def test_the_best_val_epoch_is_reported_ties_keep_the_earlier(tmp_path, monkeypatch):
    """Scripted val scores for epochs 0..4: the best is epoch 2 (AUC 0.9, balanced accuracy 0.8; epoch 4 ties it
    and is later; epoch 3 has the same AUC, a worse balanced accuracy). Each epoch's test probabilities say which
    epoch they came from, so the reported metrics must be epoch 2's (planted: the last epoch -> epoch 4's)."""
    data_dir = tmp_path  # 32 train images: one step per epoch, the scores are scripted
    np.savez(data_dir / "pneumoniamnist.npz", **make_arrays(n=(32, 24, 48), seed=3))
    y_test = supervised.dataset.load("pneumonia", 28, str(data_dir), 0)["test"][1]
    vals = [(0.5, 0.5), (0.8, 0.9), (0.9, 0.8), (0.9, 0.7), (0.9, 0.8)]
    probs = []
    for e in range(5):  # epoch e gets e test images wrong: every epoch's accuracy differs
        p = torch.nn.functional.one_hot(y_test, 2).float()
        p[:e] = 1 - p[:e]
        probs.append(p)
    calls = []

    def score(backbone, head, ds, mean, std):
        calls.append(1)
        return vals[len(calls) - 1], probs[len(calls) - 1]
    monkeypatch.setattr(supervised, "score", score)
    res = supervised.main(args(data_dir, tmp_path / "run"))
    want = evaluate.metrics(y_test, probs[2])
    assert res["supervised"]["epoch"] == 2 and res["supervised"]["val_auc"] == 0.9
    assert res["supervised"]["acc"] == pytest.approx(want["acc"]) and want["acc"] != evaluate.metrics(
        y_test, probs[4])["acc"]


def command(data_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, "supervised.py"), "--data", "pneumonia", "--data-dir", str(data_dir),
            "--batch-size", "32", "--epochs", "2", "--out", str(out), *extra]


def test_kill_and_resume_matches_uninterrupted(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(command(data_dir, full), check=True, capture_output=True, cwd=ROOT, env=env, timeout=600)
    kill_during_epoch(command(data_dir, part), part, 1, env)  # SIGKILL while it trains epoch 2
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1
    r = subprocess.run(command(data_dir, part, "--resume"), capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (full, part))
    assert a["epoch"] == b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    best_a, best_b = (torch.load(d / "best.pt", weights_only=True) for d in (full, part))
    assert best_a["epoch"] == best_b["epoch"] and torch.equal(best_a["probs"], best_b["probs"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert ra == rb
    # a checkpoint without its best.pt cannot be resumed exactly: refused with one line
    os.remove(part / "best.pt")
    (part / "results.json").unlink()
    r = subprocess.run(command(data_dir, part, "--resume"), capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode != 0 and "best.pt (the best-val epoch so far) is missing" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_points_the_supervised_baseline_to_its_script(data_dir):
    with pytest.raises(SystemExit, match="python supervised.py"):
        evaluate.main(["--data", "pneumonia", "--data-dir", str(data_dir), "--init", "supervised"])
