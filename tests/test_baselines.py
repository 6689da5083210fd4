"""Issue 5's baselines and reproduce: ImageNet weights (file, hub cache, offline error, bad files), the 1-channel
conv1 against torchvision on an RGB copy, the supervised baseline, and reproduce.py end to end on tiny data."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
import dataset
import evaluate
import reproduce
from conftest import ROOT, make_arrays


@pytest.fixture
def weights_file(tmp_path):
    """A torchvision resnet18 state dict (seeded random values stand in for the ImageNet ones) saved like theirs."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():  # non-trivial BN statistics, so a wrongly loaded buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18-test.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_gray_backbone_equals_torchvision_on_an_rgb_copy(weights_file):
    path, ref = weights_file
    net, dim = evaluate.imagenet_backbone("resnet18", 1, 64, evaluate.imagenet_weights("resnet18", str(path)))
    ref.fc = torch.nn.Identity()
    net.eval(), ref.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # conv1 summed over RGB on a gray image == the RGB conv1 on three equal channels
        want = ref(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1))
        got = net(x)
    assert dim == 512 and got.shape == (3, 512)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    rgb, _ = evaluate.imagenet_backbone("resnet18", 3, 64, evaluate.imagenet_weights("resnet18", str(path)))
    assert torch.equal(rgb[1].conv1.weight, ref.conv1.weight)


def test_weights_from_the_hub_cache_and_the_offline_error(weights_file, tmp_path, monkeypatch):
    path, ref = weights_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    with pytest.raises(FileNotFoundError, match="--weights PATH") as e:
        evaluate.imagenet_weights("resnet18", download=False)
    assert url in str(e.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded .*no network.*--weights PATH"):
        evaluate.imagenet_weights("resnet18")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    w = evaluate.imagenet_weights("resnet18")  # found in the cache: no download asked for
    assert torch.equal(w["layer4.1.bn2.running_var"], ref.state_dict()["layer4.1.bn2.running_var"])
    assert not any(k.startswith("fc.") for k in w)


def test_bad_weights_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt.pth: could not load"):
        evaluate.imagenet_weights("resnet18", str(corrupt))
    other = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), other)
    with pytest.raises(ValueError, match="r50.pth: not torchvision resnet18 weights"):
        evaluate.imagenet_weights("resnet18", str(other))
    with pytest.raises(ValueError, match="ImageNet weights take 1 or 3 channels"):
        evaluate.imagenet_backbone("resnet50", 2, 64, evaluate.imagenet_weights("resnet50", str(other)))


def test_evaluate_script_imagenet_and_supervised(weights_file, tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(96, 24, 48), seed=3))
    path, _ = weights_file
    res = evaluate.main(["--data", "pneumonia", "--data-dir", str(tmp_path), "--init", "imagenet", "--weights",
                         str(path), "--imagenet-size", "32", "--out", str(tmp_path / "imn.json")])
    assert res["method"] == "imagenet" and res["linear"]["auc"] > 0.9  # brightness classes: easy for any features
    sup = evaluate.main(["--data", "pneumonia", "--data-dir", str(tmp_path), "--init", "supervised", "--epochs", "4",
                         "--lr", "0.4", "--batch-size", "32", "--out", str(tmp_path / "sup.json")])
    assert sup["epochs"] == 4 and sup["supervised"]["acc"] > 0.9  # the head it trained with the labels
    saved = json.loads((tmp_path / "sup.json").read_text())
    assert saved["supervised"] == sup["supervised"] and len(saved["embedding"]["xy"]) == 48
    # the supervised baseline's backbone is exported like a method's, beside its results (hubconf.py loads it)
    import runs
    net, info = runs.load_backbone(str(tmp_path / "backbone.pt"))
    assert info["method"] == "supervised" and info["size"] == 28 and info["in_channels"] == 1
    with pytest.raises(SystemExit, match="--init imagenet: .*missing.pth: could not load"):
        evaluate.main(["--data", "pneumonia", "--data-dir", str(tmp_path), "--init", "imagenet", "--weights",
                       str(tmp_path / "missing.pth")])


def test_embedding_is_the_top_two_principal_components():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 5, generator=g) * torch.tensor([5.0, 0.1, 3.0, 0.1, 0.1])  # variance along dims 0 and 2
    e = evaluate.embed_2d(f, torch.arange(200) % 2, n=150)
    xy = torch.tensor(e["xy"], dtype=torch.float64)
    assert xy.shape == (150, 2) and len(e["y"]) == 150
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:150].sort().values
    centred = f[idx].double() - f[idx].double().mean(0)
    for col, dim in ((0, 0), (1, 2)):  # up to sign, PC1 ~ feature 0 and PC2 ~ feature 2
        corr = torch.corrcoef(torch.stack([xy[:, col], centred[:, dim]]))[0, 1]
        assert abs(corr) > 0.99


def test_mean_std_and_curves(tmp_path):
    assert reproduce.mean_std([0.5]) == "0.500"
    vals = [0.9, 0.95, 0.97]
    assert reproduce.mean_std(vals + [float("nan")]) == f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    assert reproduce.mean_std([]) == "–"
    log = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 0, "train/loss": 4.0, "train/z_std": 0.5}, {"epoch": 0, "train/loss": 2.0, "train/z_std": 0.25},
            {"epoch": 0, "val/knn_auc": 0.7}, {"epoch": 1, "train/loss": 1.0}]  # epoch 2 without z_std (older log)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = reproduce.curves(str(log))
    assert c == {"epoch": [1, 2], "loss": [3.0, 1.0], "z_std": [0.375, None], "knn_epoch": [1], "knn_auc": [0.7]}


def test_training_table():
    """Each SSL run's training row: loss first -> last with its minimum, val kNN first -> best -> last, z_std
    against 1/sqrt(D) with D from --proj-dim or the method file's default; runs without curves give no row."""
    barlow = {"model": "barlow", "data": "d", "seed": 0, "config": "barlow.py --data d",
              "curves": {"epoch": [1, 2, 3], "loss": [5.0, 3.0, 4.0], "z_std": [0.01, 0.02, 0.03],
                         "knn_epoch": [1, 2, 3], "knn_auc": [0.6, 0.9, 0.8]}}
    simclr = {"model": "simclr", "data": "d", "seed": 1, "config": "simclr.py --proj-dim 64",
              "curves": {"epoch": [1], "loss": [2.0], "z_std": [None], "knn_epoch": [], "knn_auc": []}}
    rand = {"model": "random", "data": "d", "seed": 0, "config": "evaluate.py", "curves": {"epoch": [], "loss": []}}
    rows = [ln for ln in reproduce.training([barlow, simclr, rand], "d") if ln.startswith("| ") and "seed" not in ln]
    assert rows == ["| SimCLR | 1 | 2.000 → 2.000 (min 2.000, ep 1) | – | not recorded |",
                    "| Barlow Twins | 0 | 5.000 → 4.000 (min 3.000, ep 2) | 0.600 (ep 1) → best 0.900 (ep 2) → 0.800 "
                    f"(ep 3); last − best -0.100 | 0.0100 → 0.0300 (1/√D = {2048 ** -0.5:.4f}) |"]
    assert reproduce.proj_dim(simclr) == 64 and reproduce.proj_dim({**simclr, "config": "simclr.py"}) == 256
    assert reproduce.training([rand], "d") == [] and reproduce.training([barlow], "other") == []


def test_failure_reason_is_the_message_not_the_progress_bar():
    """A run that stops itself (NaN loss) prints its message between tqdm frames written with \\r and no newline;
    the reason recorded is that message. Built with tqdm itself, as a method file's log is."""
    import io
    from tqdm import tqdm
    log = io.StringIO()
    bar = tqdm(total=180, desc="vicreg", unit="step", file=log, mininterval=0, ascii=False)
    for _ in range(9):
        bar.set_postfix(loss="4236260.000", epoch=1)
        bar.update()
    msg = "vicreg: loss is nan at epoch 1 step 10; stopped, no checkpoint yet. Try a lower --lr."
    log.write(msg + "\n")  # SystemExit's message, on the line of the last frame
    bar.close()  # interpreter exit closes the bar: one more frame after the message
    assert "\r" in log.getvalue() and log.getvalue().rstrip().splitlines()[-1] != msg  # what hid it
    assert reproduce.failure_reason(log.getvalue(), 1) == msg
    assert reproduce.failure_reason("Traceback (most recent call last):\nValueError: bad --lr\n", 1) == \
        "ValueError: bad --lr"
    assert reproduce.failure_reason("", 3) == reproduce.failure_reason("\r\n", 3) == "exit code 3"


def run_keys(stdout, tag):
    """'[run ] simclr-pneumonia-28-s0: ...' lines of a reproduce run -> {'simclr-pneumonia-28-s0'}."""
    return set(re.findall(rf"^\[{tag}\s*\] (\S+):", stdout, re.M))


def test_reproduce_parts_on_two_machines_make_one_study(tmp_path):
    """Two parts run in separate run folders ("machines"); the second sees only the first part's committed
    results/runs/*.json, never reruns those runs, and its table is the whole study; --table-only rebuilds it from
    the committed JSON alone, training nothing; another setting is another run."""
    import shutil
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "pneumoniamnist.npz", **make_arrays(n=(40, 16, 32), seed=5))
    cmd = [sys.executable, "reproduce.py", "--preset", "cpu", "--data", "pneumonia", "--methods", "simclr",
           "--baselines", "random", "imagenet", "--seeds", "0", "--epochs", "1", "--finetune-epochs", "1",
           "--data-dir", str(data), "--weights", str(tmp_path / "no-weights.pth")]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    machine = lambda name, *extra: subprocess.run(
        cmd + ["--runs", str(tmp_path / name / "runs"), "--out", str(tmp_path / name / "results"), *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    study = {"random-pneumonia-28-s0", "simclr-pneumonia-28-s0", "imagenet-pneumonia-28-s0"}
    a = machine("A", "--part", "1/2")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]  # only ImageNet may fail: tolerated, reported
    ran_a = run_keys(a.stdout, "run")
    assert ran_a and ran_a < study
    table = (tmp_path / "A" / "results" / "RESULTS.md").read_text()
    assert f"Not yet run ({len(study - ran_a)} of 3; another --part, or in progress): " in table
    # the "clone": machine B gets A's committed JSON, none of A's run folders
    (tmp_path / "B" / "results" / "runs").mkdir(parents=True)
    for f in (tmp_path / "A" / "results" / "runs").glob("*.json"):
        shutil.copy(f, tmp_path / "B" / "results" / "runs")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{reproduce.README_BEGIN}\nstale\n{reproduce.README_END}\n\n## after\n")
    (tmp_path / "B" / "results" / "reading-cpu.md").write_text("SimCLR wins here, by luck.\n")  # the hand-written part
    b = machine("B", "--part", "2/2", "--readme", str(readme))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    block = readme.read_text()
    assert block.startswith("# title\n\n") and block.endswith(f"{reproduce.README_END}\n\n## after\n")
    assert "stale" not in block and "from 3 of 3 runs (2 finished" in block
    # 20 train images per class: 1% rounds to 0 per class, raised to one each; 10% is 2 each
    assert "| pneumonia-28 | kNN | linear 1% (2 labels) | linear 10% (4 labels) | linear 100% |" in block
    assert re.search(r"^\| SimCLR \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \| [+-]\d\.\d{3} \|$",
                     block, re.M), block
    assert run_keys(b.stdout, "run") == study - ran_a  # its own share, and nothing of A's
    assert run_keys(b.stdout, "skip") == ran_a  # A's runs: read from the committed JSON, not rerun
    assert "committed in" in b.stdout
    table = (tmp_path / "B" / "results" / "RESULTS.md").read_text()
    assert "Not yet run" not in table and "| linear 100% | random init |" in table and "| fine-tune | SimCLR |" in table
    assert "## Reading (hand-written, reading-cpu.md; the tables below are generated)\n\nSimCLR wins here, by luck.\n" \
        in table and table.index("## Reading") < table.index("## pneumonia-28")
    assert "Failed, no results: imagenet-pneumonia-28-s0" in table and "no-weights.pth" in table  # with the reason
    assert "Failed on pneumonia-28, no results: ImageNet transfer (seed 0: " in block  # the README says so too
    assert "Where the weights exist: `python evaluate.py --init imagenet" in table  # and the command to run it
    knn = next(line for line in table.splitlines() if line.startswith("| kNN | SimCLR |"))
    assert re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", knn) and "k = " in knn  # one seed: CI, chosen k
    one_pct = next(line for line in table.splitlines() if line.startswith("| linear 1% | SimCLR |"))
    assert re.search(r"\| L2 [0-9.e-]+; 2 labels \|$", one_pct), one_pct  # the probe's chosen L2, its label count
    assert re.search(r"^\| SimCLR \| [+-]\d\.\d{3} \(1 seed\) \|", table, re.M)  # the paired difference
    assert re.search(r"^\| 1/2 \| \d \| \d \| \d+ \| \d+\.\d \| \d{4}-\d\d-\d\d, ", table, re.M)  # parts table
    parts = re.findall(r"^\| (\d/2|all) \| (\d) \| (\d) \| \d+ \| (\d+\.\d)", table, re.M)
    assert [p for p, *_ in parts] == ["1/2", "2/2", "all"]  # and the whole study's total: the parts' sum
    assert [int(parts[2][i]) for i in (1, 2)] == [3, 3]
    # every row against the committed records themselves, summed unrounded and rounded once as the table does (the
    # old check, sum of the rounded parts within 0.1 of the rounded total, failed at random: 1.5 vs 1.4)
    recs = [json.loads(f.read_text()) for f in (tmp_path / "B" / "results" / "runs").glob("*.json")]
    for p, *_, shown in parts:
        walls = [r.get("wall_s") or 0 for r in recs if p == "all" or r.get("ran_in_part", r["part"]) == p]
        assert abs(float(shown) - sum(walls) / 60) <= 0.05 + 1e-9, (p, shown, walls)  # one rounding to 0.1
    for png in ("curves.png", "label_efficiency.png", "embedding.png"):
        assert (tmp_path / "B" / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads((tmp_path / "B" / "results" / "runs" / "cpu-simclr-pneumonia-28-s0.json").read_text())
    assert rec["status"] == "ok" and rec["curves"]["epoch"] == [1] and rec["results"]["finetune"]["epochs"] == 1
    assert len(rec["curves"]["z_std"]) == 1 and 0 < rec["curves"]["z_std"][0] < 1  # from the method's own log
    assert re.search(r"^\| SimCLR \| 0 \| \d+\.\d{3} → \d+\.\d{3} .*\| 0\.\d{4} → 0\.\d{4} \(1/√D = 0\.0625\) \|$", table,
                     re.M)  # its training row, D = simclr.py's 256
    # a third machine with the committed JSON only, and no data: --table-only trains nothing, same table
    (tmp_path / "C" / "results" / "runs").mkdir(parents=True)
    for f in (tmp_path / "B" / "results" / "runs").glob("*.json"):
        shutil.copy(f, tmp_path / "C" / "results" / "runs")
    no_data = [str(tmp_path / "empty") if a == str(data) else a for a in cmd]
    c = subprocess.run(no_data + ["--table-only", "--runs", str(tmp_path / "C" / "runs"), "--out",
                                  str(tmp_path / "C" / "results")], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    assert not run_keys(c.stdout, "run") and run_keys(c.stdout, "skip") == study
    assert not (tmp_path / "C" / "runs").exists()
    rows = lambda p: [ln for ln in p.read_text().splitlines() if ln.startswith("| ") and "|---" not in ln]
    assert rows(tmp_path / "C" / "results" / "RESULTS.md") == rows(tmp_path / "B" / "results" / "RESULTS.md")
    # another setting is another run (its own folder), never the finished one under a new label
    r = machine("B", "--epochs", "2", "--baselines", "random")
    assert r.returncode == 0 and run_keys(r.stdout, "run") == {"simclr-pneumonia-28-s0"}
    assert "[skip] random-pneumonia-28-s0" in r.stdout
    rec = json.loads((tmp_path / "B" / "results" / "runs" / "cpu-simclr-pneumonia-28-s0.json").read_text())
    assert rec["curves"]["epoch"] == [1, 2]
    bad = machine("B", "--part", "3/2")
    assert bad.returncode != 0 and "--part 3/2: expected I/N" in bad.stderr
    # which part holds which runs: the preset's minutes in the study's order (random, methods, imagenet) through
    # assign_parts (brute-forced below), part I = share I - 1 (planted: the shares numbered from 0 passed)
    minutes = reproduce.PRESETS["cpu"]["minutes"]["pneumonia"]
    share, _ = reproduce.assign_parts([minutes[m] for m in ("random", "simclr", "imagenet")], 2)
    part_of = {f"{m}-pneumonia-28-s0": f"{q + 1}/2" for m, q in zip(("random", "simclr", "imagenet"), share)}
    assert ran_a == {k for k, p in part_of.items() if p == "1/2"}
    for f in (tmp_path / "A" / "results" / "runs").glob("*.json"):
        r = json.loads(f.read_text())
        assert r["part"] == r["ran_in_part"] == part_of[f"{r['model']}-{r['data']}-s{r['seed']}"] == "1/2"
    # a committed *failed* run (ImageNet, no weights) is retried by its own part, and only by it (planted: a failed
    # record reused like a finished one, never retried)
    own = part_of["imagenet-pneumonia-28-s0"]
    retry = machine("B", "--part", own)
    assert "imagenet-pneumonia-28-s0" in run_keys(retry.stdout, "run"), retry.stdout[-2000:]
    other = machine("B", "--part", "2/2" if own == "1/2" else "1/2")
    assert not run_keys(other.stdout, "run") and "imagenet-pneumonia-28-s0" in run_keys(other.stdout, "skip")
    # --part I alone takes N from the preset (13 parts for cpu), not 1 (planted: read as I/1, refused as 2/1)
    alone = machine("B", "--part", "2")
    assert alone.returncode == 0 and "part 2/13: " in alone.stdout, alone.stdout[-2000:] + alone.stderr[-2000:]


def test_parts_balance_the_measured_minutes():
    """assign_parts (LPT) against a brute force over every assignment: each run in exactly one part, the loads
    add up, and the longest part within 4/3 of the best possible (Graham's bound); equal minutes: run i -> i mod n;
    the cpu preset's parts each fit in 100 minutes by its own estimates."""
    import itertools
    g = np.random.default_rng(0)
    for _ in range(30):
        n, k = int(g.integers(2, 4)), int(g.integers(3, 8))
        minutes = [float(m) for m in g.integers(1, 60, k)]
        part, load = reproduce.assign_parts(minutes, n)
        assert sorted(set(part)) <= list(range(n))
        assert [sum(m for m, p in zip(minutes, part) if p == q) for q in range(n)] == pytest.approx(load)
        best = min(max(sum(m for m, p in zip(minutes, a) if p == q) for q in range(n))
                   for a in itertools.product(range(n), repeat=k))
        assert max(load) <= 4 / 3 * best + 1e-9
    assert reproduce.assign_parts([1.0] * 7, 3)[0] == [0, 1, 2, 0, 1, 2, 0]
    cpu = reproduce.PRESETS["cpu"]
    runs_min = [cpu["minutes"][d][m] for d in cpu["data"] for m in reproduce.BASELINES + reproduce.METHODS
                for _ in (cpu["random_seeds"] if m == "random" else cpu["seeds"])]
    assert max(reproduce.assign_parts(runs_min, cpu["parts"])[1]) <= 100


def test_table_cells_paired_differences_and_specs(tmp_path):
    assert reproduce.auc_cell([{"auc": 0.9123, "auc_ci95": [0.88, 0.94]}]) == "0.912 [0.880, 0.940]"
    assert reproduce.auc_cell([{"auc": 0.9}, {"auc": 0.92}]) == f"0.910 ± {statistics.stdev([0.9, 0.92]):.3f}"
    rec = lambda m, s, auc: {"model": m, "data": "d", "seed": s, "results": {"linear": {"auc": auc}}}
    ok = [rec("random", 0, 0.80), rec("random", 1, 0.90), rec("random", 2, 0.85),
          rec("simclr", 0, 0.85), rec("simclr", 1, 0.93)]  # seed 2 of SimCLR missing: pairs only on seeds 0, 1
    diffs = [0.05, 0.03]
    assert reproduce.paired_delta(ok, "d", "simclr", "linear") == \
        f"+{statistics.mean(diffs):.3f} ± {statistics.stdev(diffs):.3f} (2 seeds)"
    assert reproduce.paired_delta(ok[:1] + ok[3:4], "d", "simclr", "linear") == "+0.050 (1 seed)"
    assert reproduce.paired_delta(ok, "d", "byol", "linear") == "–"
    assert reproduce.parse_spec("breast@64", 28) == ("breast", 64)
    assert reproduce.parse_spec("pneumonia", 28) == ("pneumonia", 28)
    (tmp_path / "site@2").mkdir()
    assert reproduce.parse_spec(str(tmp_path / "site@2"), 28) == (str(tmp_path / "site@2"), 28)  # a folder
    with pytest.raises(SystemExit, match="NAME@SIZE"):
        reproduce.parse_spec("breast@big", 28)
    preset = {"epochs": {"breast": 5, "breast@64": 7}, "batch_size": 32}
    assert reproduce.setting(preset, "epochs", "breast@64") == 7  # the entry's own value
    assert reproduce.setting(preset, "epochs", "breast@128") == 5  # else the flag's
    assert reproduce.setting(preset, "batch_size", "anything") == 32  # one value for every entry
    assert reproduce.setting(reproduce.PRESETS["gpu"], "epochs", "pneumonia") >= 200  # the minimum


def two_dataset_records():
    """Two datasets (2 paired seeds on one, 1 on the other), numbers chosen so that any wrong column, protocol or
    dataset gives a wrong cell: each protocol's AUC differs, ACC = AUC - 0.1, F1 = AUC - 0.2, and the label counts
    of the fractions differ per dataset (47 / 470 and 5 / 55)."""
    def rec(model, d, seed, knn, l1, l10, lin, n):
        m = lambda a, **k: {"auc": a, "acc": a - 0.1, "f1_weighted": a - 0.2, **k}
        return {"model": model, "data": d, "seed": seed, "status": "ok", "date": "2026-12-05T08:00", "part": "1/1",
                "estimate_min": 1, "wall_s": 60, "machine": "m", "epochs": 1, "batch_size": 8, "finetune_epochs": 0,
                "n_train": 10, "train_subset": 0,
                "results": {"knn": m(knn, k=5), "linear_1pct": m(l1, n_labels=n[0], wd=0.1),
                            "linear_10pct": m(l10, n_labels=n[1], wd=0.1),
                            "linear": m(lin, auc_ci95=[lin - 0.09, lin + 0.09], wd=0.1)}}
    P, B = (47, 470), (5, 55)
    return [rec("random", "pneumonia-28", 0, 0.80, 0.70, 0.75, 0.90, P),
            rec("random", "pneumonia-28", 1, 0.82, 0.72, 0.77, 0.92, P),
            rec("simclr", "pneumonia-28", 0, 0.85, 0.71, 0.80, 0.95, P),
            rec("simclr", "pneumonia-28", 1, 0.83, 0.73, 0.84, 0.962, P),
            rec("random", "breast-28", 0, 0.60, 0.50, 0.55, 0.70, B),
            rec("simclr", "breast-28", 0, 0.66, 0.52, 0.61, 0.79, B)]


def test_results_tables_per_dataset_protocol_and_column(tmp_path):
    """RESULTS.md's protocol tables and paired differences on two datasets, every cell checked against numbers
    written out by hand (planted: the per-dataset filter dropped, or the paired difference of the wrong protocol)."""
    cli = argparse.Namespace(preset="cpu", argv=["--table-only"], overrides=[], jobs=1, out=str(tmp_path))
    cfg = {"note": "n", "arch": "resnet18", "seeds": [0, 1], "random_seeds": [0, 1]}
    md = open(reproduce.write_table(two_dataset_records(), ["pneumonia-28", "breast-28"], cfg, cli, 60)).read()
    pneumonia, breast = md.split("## pneumonia-28")[1].split("## breast-28")
    sd2 = lambda a, b: f"{statistics.stdev([a, b]):.3f}"
    assert (f"| linear 100% | SimCLR | 0.856 ± {sd2(.85, .862)} | 0.956 ± {sd2(.95, .962)} | "
            f"0.756 ± {sd2(.75, .762)} | L2 0.1, 0.1 |") in pneumonia
    assert f"| linear 1% | random init | 0.610 ± {sd2(.60, .62)} | 0.710 ± {sd2(.70, .72)} | " in pneumonia
    assert "| L2 0.1, 0.1; 47 labels |" in pneumonia and "| L2 0.1, 0.1; 470 labels |" in pneumonia
    assert f"| SimCLR | +0.030 ± {sd2(.05, .01)} (2 seeds) | +0.010 ± 0.000 (2 seeds) | +0.060 ± {sd2(.05, .07)} " \
           f"(2 seeds) | +0.046 ± {sd2(.05, .042)} (2 seeds) | – |" in pneumonia
    assert "| linear 100% | SimCLR | 0.690 | 0.790 [0.700, 0.880] | 0.590 | L2 0.1 |" in breast
    assert "| L2 0.1; 5 labels |" in breast and "| L2 0.1; 55 labels |" in breast and "47 labels" not in breast
    assert "| SimCLR | +0.060 (1 seed) | +0.020 (1 seed) | +0.060 (1 seed) | +0.090 (1 seed) | – |" in breast


def test_readme_block_per_dataset_columns_and_the_linear_difference():
    """Two datasets, numbers chosen so that every wrong column gives a wrong cell: each protocol's mean in its own
    column, the label counts of *this* dataset in the header (planted: pooled over datasets, "5/47 labels"), and the
    last column the seed-paired difference of the linear probe (planted: of kNN, +0.030 and +0.060 here), all
    written out by hand."""
    records = two_dataset_records()
    cli = argparse.Namespace(preset="cpu", argv=["--table-only"])
    lines = reproduce.readme_summary(records, ["pneumonia-28", "breast-28"], {}, cli)
    sd2 = lambda a, b: f"{statistics.stdev([a, b]):.3f}"
    assert lines[lines.index("| pneumonia-28 | kNN | linear 1% (47 labels) | linear 10% (470 labels) | linear 100% | "
                             "minus untrained, linear 100% |") + 2:][:2] == [
        f"| random init | 0.810 ± {sd2(.80, .82)} | 0.710 ± {sd2(.70, .72)} | 0.760 ± {sd2(.75, .77)} | "
        f"0.910 ± {sd2(.90, .92)} | – |",
        f"| SimCLR | 0.840 ± {sd2(.85, .83)} | 0.720 ± {sd2(.71, .73)} | 0.820 ± {sd2(.80, .84)} | "
        f"0.956 ± {sd2(.95, .962)} | +0.046 ± {sd2(.05, .042)} (2 seeds) |"]
    assert lines[lines.index("| breast-28 | kNN | linear 1% (5 labels) | linear 10% (55 labels) | linear 100% | "
                             "minus untrained, linear 100% |") + 2:][:2] == [
        "| random init | 0.600 | 0.500 | 0.550 | 0.700 [0.610, 0.790] | – |",
        "| SimCLR | 0.660 | 0.520 | 0.610 | 0.790 [0.700, 0.880] | +0.090 |"]


def test_method_flags_change_only_the_named_method():
    import argparse
    cli = argparse.Namespace(preset="cpu", data_dir="", weights=None)
    base = dict(arch="resnet18", finetune_epochs=1, batch_size=256, subset=0, epochs=10, eval_every=5, warmup_epochs=1,
                imagenet_size=224)
    tuned = {**base, "method_flags": {"vicreg": ["--warmup-epochs", "3", "--lr", "0.1"]}}
    for model in ("simclr", "barlow", "random", "supervised"):  # their runs (and committed records) stay valid
        assert reproduce.identity(model, "pneumonia", 28, 0, tuned, cli) == \
            reproduce.identity(model, "pneumonia", 28, 0, base, cli)
    config, digest = reproduce.identity("vicreg", "pneumonia", 28, 0, tuned, cli)
    args = config.split()
    assert args.count("--warmup-epochs") == 1 and args[args.index("--warmup-epochs") + 1] == "3"  # replaced
    assert args[-2:] == ["--lr", "0.1"]  # appended
    assert digest != reproduce.identity("vicreg", "pneumonia", 28, 0, base, cli)[1]  # so the run is redone
    for bad in (["--lr"], ["lr", "0.1"], ["--lr", "0.1", "0.2"]):
        with pytest.raises(ValueError, match="'--option value' pairs"):
            reproduce.with_flags(["x.py"], bad)
    for name, preset in reproduce.PRESETS.items():  # the committed presets pass the check run() makes first
        reproduce.check_method_flags(name, preset)
    good = {"data": ["pneumonia", "breast"], "method_flags": {"vicreg": {"breast": ["--lr", "0.1"]},
                                                              "barlow": ["--warmup-epochs", "3"]}}
    reproduce.check_method_flags("good", good)
    for flags, says in ((["--lr", "0.1"], "expected one of simclr"),                    # no such method
                        ({"chest": ["--lr", "0.1"]}, "data entry 'chest'"),          # no such data entry
                        (["--learning-rate", "0.1"], r"vicreg \(every entry\).*options"),  # not vicreg.py's
                        ({"pneumonia": ["--lr", "-1"]}, r"vicreg \(pneumonia\).*options"),  # out of its range
                        (["--lr"], "options")):                                      # not a pair
        method = "moco" if says.startswith("expected one") else "vicreg"
        with pytest.raises(SystemExit, match=says):
            reproduce.check_method_flags("bad", {"data": ["pneumonia"], "method_flags": {method: flags}})


def test_training_with_labels_stops_on_a_non_finite_loss(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(32, 8, 8), seed=1))
    ds = dataset.load("pneumonia", 28, str(tmp_path))
    mean, std = dataset.channel_stats(ds["train"][0])
    net, _ = common.make_backbone("resnet18", 1, 28)
    with pytest.raises(FloatingPointError, match="cross-entropy loss is (nan|inf).*lower learning rate"):
        evaluate.finetune(net, torch.nn.Linear(512, 2), ds, mean, std, epochs=3, lr=1e30, backbone_lr_scale=1.0,
                          batch_size=16)


def test_ablation_table_reports_val_scores_and_the_best_variant(tmp_path):
    import argparse
    names = list(reproduce.ABLATION)[:3]
    rec = lambda knn, lin: {"status": "ok", "wall_s": 90, "results": {"knn": {"val_auc": knn}, "linear": {"val_auc": lin}}}
    records = [rec(0.91, 0.97), rec(0.93, 0.96), {"status": "failed"}]
    cli = argparse.Namespace(preset="cpu", argv=["--ablate"], out=str(tmp_path))
    text = open(reproduce.write_ablation(records, names, cli)).read()
    assert f"| {names[0]} | `{' '.join(reproduce.ABLATION[names[0]])}` | 0.910 | 0.970 | 1.5 min |" in text
    assert f"| {names[2]} |" in text and "| – | – | failed |" in text
    assert f"Best val kNN AUC: {names[1]}; best val linear AUC: {names[0]}." in text
    assert "test" not in text.replace("the test split is never looked at", "")  # val only
