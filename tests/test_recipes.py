"""recipes.py, the recipe search's pilot runner: a pilot's record holds the val-split scores of its run and no test
score, a committed pilot is not rerun, a failed one says why, and RECIPES.md shows what the records hold."""
import json
import os

import numpy as np
import pytest
import torch

import common
import recipes


@pytest.fixture
def tiny_pilots(monkeypatch, npz_dir):
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(npz_dir))
    monkeypatch.setattr(recipes, "PILOTS", {
        "tiny": ("simclr", "pneumonia", ["--epochs", "2", "--batch-size", "32", "--eval-every", "1",
                                         "--optimizer", "sgd", "--lr", "0.05"]),
        "broken": ("barlow", "pneumonia", ["--epochs", "1", "--lambd", "-1"])})


def test_a_pilot_records_val_scores_only_and_is_not_rerun(tiny_pilots, tmp_path, monkeypatch):
    out, runs_dir = tmp_path / "results", tmp_path / "runs"
    recipes.run("tiny", str(out), str(runs_dir))
    rec = json.load(open(out / "recipes" / "tiny.json"))
    res = json.load(open(runs_dir / "tiny" / "results.json"))  # the run's own output, read independently
    assert rec["status"] == "ok"
    assert "--optimizer sgd --lr 0.05" in rec["command"] and "--epochs 2 --batch-size 32" in rec["command"]
    for key in ("linear", "linear_10pct", "knn"):
        assert rec["val"][key] == round(res[key]["val_auc"], 4)
    # nothing from the test split: neither its keys nor its numbers
    assert "auc" not in json.dumps({k: v for k, v in rec.items() if k != "val"}).replace("val_knn", "")
    test_aucs = {f"{res[k]['auc']:.4f}" for k in ("linear", "knn")} - {f"{v:.4f}" for v in rec["val"].values()}
    assert not any(a in json.dumps(rec) for a in test_aucs)
    # the curves' ends come from metrics.jsonl: 2 epochs, so two per-epoch loss means, first and last
    rows = [json.loads(ln) for ln in open(runs_dir / "tiny" / "metrics.jsonl")]
    first = [r["train/loss"] for r in rows if r.get("epoch") == 0 and "train/loss" in r]
    assert rec["loss"][0] == pytest.approx(sum(first) / len(first))
    assert rec["val_knn_curve"] == [r["val/knn_auc"] for r in rows if "val/knn_auc" in r]
    assert len(rec["val_knn_curve"]) == 2
    # a second call with the same command skips it: the record is not touched
    mtime = os.path.getmtime(out / "recipes" / "tiny.json")
    recipes.run("tiny", str(out), str(runs_dir))
    assert os.path.getmtime(out / "recipes" / "tiny.json") == mtime
    # the same command under a changed default (the small-image jitter) is another recipe: it runs again
    s = common.AUGMENT["small"]["jitter"]
    assert rec["recipe"]["jitter_strength"] == [s, s, s, s / 4] and rec["recipe"]["lr"] == 0.05
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", s / 2)
    ran = []
    monkeypatch.setattr(recipes.runs, "run_child", lambda cmd, folder: ran.append(cmd) or (1, 0.0))
    recipes.run("tiny", str(out), str(runs_dir / "again"))
    assert len(ran) == 1 and json.load(open(out / "recipes" / "tiny.json"))["recipe"]["jitter_strength"][0] == s / 2
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", s)
    # a record from before recipes were kept: what it ran with is unknown, so it runs again (planted: the old rule)
    json.dump({k: v for k, v in rec.items() if k != "recipe"}, open(out / "recipes" / "tiny.json", "w"))
    recipes.run("tiny", str(out), str(runs_dir / "again"))
    assert len(ran) == 2
    monkeypatch.undo()
    json.dump(rec, open(out / "recipes" / "tiny.json", "w"))  # the first run's record, for the table below

    # the table shows the pilot's val scores, as the record has them, and no test score
    recipes.table(str(out))
    md = (out / "RECIPES.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| **tiny**"))
    assert [f"{rec['val'][k]:.4f}" for k in ("linear", "linear_10pct", "knn")] == row.split(" | ")[1:4]
    assert not any(a in md for a in test_aucs)


def test_a_failed_pilot_says_why(tiny_pilots, tmp_path):
    recipes.run("broken", str(tmp_path / "results"), str(tmp_path / "runs"))
    rec = json.load(open(tmp_path / "results" / "recipes" / "broken.json"))
    assert rec["status"] == "failed" and "--lambd" in rec["reason"] and "val" not in rec
    recipes.table(str(tmp_path / "results"))
    assert "| **broken** | failed: " in (tmp_path / "results" / "RECIPES.md").read_text()


def test_the_table_lists_the_committed_study_by_its_val_scores(tmp_path):
    """The study's committed records hold test scores too: the table must take their val_auc, never their auc."""
    (tmp_path / recipes.STUDY).mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    res = {k: {"auc": 0.1111, "val_auc": v} for k, v in (("linear", 0.9876), ("linear_10pct", 0.9543),
                                                         ("knn", 0.9321))}
    json.dump({"model": "random", "seed": 2, "status": "ok", "results": res},
              open(tmp_path / recipes.STUDY / "cpu-random-pneumonia-28-s2.json", "w"))
    json.dump({"name": "p", "method": "barlow", "data": "pneumonia", "flags": ["--lr", "1"], "status": "ok",
               "val": {"linear": 0.5, "linear_10pct": 0.6, "knn": 0.7}, "loss": [3.0, 2.0],
               "z_std": [0.02, 0.01, 0.015], "wall_s": 60, "date": "2026-12-05T07:00", "machine": "m"},
              open(tmp_path / "recipes" / "p.json", "w"))
    json.dump({"name": "q", "method": "byol", "data": "pneumonia", "flags": [], "status": "ok",
               "val": {"linear": 0.5, "linear_10pct": 0.6, "knn": 0.7}, "loss": [3.0, 2.0], "z_std": [0.02, 0.01, 0.015],
               "eta_share": [1.0, 0.35], "wall_s": 60, "date": "2026-12-06T07:00", "machine": "m"},
              open(tmp_path / "recipes" / "q.json", "w"))
    recipes.table(str(tmp_path))
    md = (tmp_path / "RECIPES.md").read_text()
    assert "0.1111" not in md
    assert "| **p** | 0.5000 | 0.6000 | 0.7000 | 3 → 2 | 0.0200 / 0.0100 / 0.0150 |  | 1 | `--lr 1` |" in md
    assert "| **q** | 0.5000 | 0.6000 | 0.7000 | 3 → 2 | 0.0200 / 0.0100 / 0.0150 | 1.00 → 0.35 | 1 | `` |" in md
    assert "| cpu study: random s2 | 0.9876 | 0.9543 | 0.9321 | | | | | untrained backbone |" in md


def test_unknown_pilot_is_refused_with_the_known_names(capsys):
    with pytest.raises(SystemExit) as e:
        recipes.main(["no-such-pilot"])
    assert e.value.code == 2 and "no-such-pilot" in capsys.readouterr().err


def test_make_optimizer_sgd_is_plain_momentum_sgd_and_lars_is_lars():
    w = torch.nn.Parameter(torch.ones(3, 3))
    w.grad = torch.full((3, 3), 0.5)
    opt = common.make_optimizer("sgd", [w], lr=0.1, weight_decay=0.01)
    opt.step()  # first step: buf = g + wd w; w -= lr buf (momentum acts from the second step)
    assert torch.allclose(w.detach(), torch.full((3, 3), 1 - 0.1 * (0.5 + 0.01)))
    opt.step()  # buf = 0.9 buf + g + wd w
    buf = 0.9 * 0.51 + 0.5 + 0.01 * (1 - 0.1 * 0.51)
    assert torch.allclose(w.detach(), torch.full((3, 3), 1 - 0.1 * 0.51 - 0.1 * buf))
    assert isinstance(common.make_optimizer("lars", [w], 0.1, 0.0), common.LARS)
    with pytest.raises(ValueError, match="--optimizer 'adam'"):
        common.make_optimizer("adam", [w], 0.1, 0.0)
    assert common.RULES["optimizer"][0]("sgd") and not common.RULES["optimizer"][0]("adam")


def test_feature_correlation_is_the_mean_per_feature_pearson_r():
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(64, 5, generator=g)
    h2 = 0.5 * h1 + torch.randn(64, 5, generator=g)
    naive = [float(np.corrcoef(h1[:, j].numpy(), h2[:, j].numpy())[0, 1]) for j in range(5)]  # the reference
    assert recipes.feature_correlation(h1, h2) == pytest.approx(sum(naive) / 5, abs=1e-5)
    assert recipes.feature_correlation(h1, 3 * h1 + 1) == pytest.approx(1.0, abs=1e-5)  # scale and shift free
    assert recipes.feature_correlation(h1, -h1) == pytest.approx(-1.0, abs=1e-5)


def test_view_agreement_pairs_each_image_s_two_views(npz_dir, monkeypatch, tmp_path):
    """With the second view made equal to the first, the agreement is 1 (the views are paired row by row); with
    the real augmentation it is below that; the record and RECIPES.md's section hold what was measured."""
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(npz_dir))
    monkeypatch.setattr(recipes, "AGREEMENT", {"methods": ["barlow"], "settings": [(0.8, 0.2), (0.0, 0.2)]})
    real = recipes.agreement("barlow", batches=1, B=32)
    assert [(s["jitter"], s["min_scale"]) for s in real] == [(0.8, 0.2), (0.0, 0.2)]
    assert all(-1 < s["correlation"] < 0.99 for s in real)
    augment = common.augment
    monkeypatch.setattr(common, "augment", lambda *a, **k: (augment(*a, **k)[0],) * 2)  # view 2 := view 1
    assert all(s["correlation"] == pytest.approx(1.0, abs=1e-3) for s in recipes.agreement("barlow", batches=1, B=32))
    monkeypatch.setattr(common, "augment", augment)
    recipes.write_agreement(str(tmp_path))
    rec = json.load(open(tmp_path / "recipes-agreement.json"))
    (tmp_path / "recipes").mkdir()
    recipes.table(str(tmp_path))
    row = f"| 0.8 | 20% | {rec['views']['barlow'][0]['correlation']:.3f} |"
    assert row in (tmp_path / "RECIPES.md").read_text()


def test_agreement_without_its_data_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes.dataset, "ZENODO", "file:///nonexistent-medssl/{file}")  # no download either
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as e:
        recipes.main(["--agreement", "--out", str(tmp_path / "out")])
    assert str(e.value).startswith("recipes --agreement: pneumoniamnist.npz is not in")
    assert not (tmp_path / "out").exists()


def test_every_defined_pilot_is_a_valid_command_of_its_method():
    """A pilot with a misspelt or out-of-range flag would fail only when its turn in a background queue comes."""
    import importlib
    for name, (method, data, flags) in recipes.PILOTS.items():
        cmd = recipes.command(name)
        assert cmd[0] == f"{method}.py" and cmd[cmd.index("--data") + 1] == data, name
        args = common.parse_args(importlib.import_module(method).Args, cmd[1:])  # exits on a bad flag
        for opt, value in zip(flags[::2], flags[1::2]):  # each flag reaches the run, the last one of a kind wins
            last = max(i for i, a in enumerate(cmd) if a == opt)
            assert cmd[last + 1] == value or opt in flags[flags.index(opt) + 2::2], (name, opt)
            got = getattr(args, opt[2:].replace("-", "_"))
            assert got == type(got)(cmd[last + 1]), (name, opt)


def test_summary_keeps_val_scores_and_the_curves_ends():
    res = {k: {"auc": 0.5, "val_auc": 0.98765} for k, _ in recipes.SCORES}
    curves = {"loss": [3.0, 2.0, 1.5], "z_std": [0.05, 0.02, 0.04], "knn_auc": [0.9], "eta_share": [1.0, 0.5, 0.2504]}
    s = recipes.summary(res, curves)
    assert s == {"val": {k: 0.9877 for k, _ in recipes.SCORES}, "loss": [3.0, 1.5], "z_std": [0.05, 0.02, 0.04],
                 "eta_share": [1.0, 0.25], "val_knn_curve": [0.9]}  # epoch 1 and last; no test score
    del curves["eta_share"]  # a run from before LARS logged it
    assert recipes.summary(res, curves)["eta_share"] == []
    curves["eta_share"] = [0.0, 0.0, 0.0]  # plain SGD: no step set by eta, said as 0, not left blank
    assert recipes.summary(res, curves)["eta_share"] == [0.0, 0.0]
