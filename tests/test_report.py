"""report.py: the table cells (mean ± sd, bootstrap interval, seed-paired differences), the training rows, RESULTS.md's
and the README block's tables on two datasets with every cell written out by hand, the ablation table, and the
preset's targets (met, missed or open)."""
import argparse
import statistics

import pytest

import report
import reproduce


def test_mean_sd_text():
    assert report.mean_sd_text([0.5]) == "0.500"
    vals = [0.9, 0.95, 0.97]
    assert report.mean_sd_text(vals + [float("nan")]) == f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    assert report.mean_sd_text([]) == "–"
    assert report.mean_sd([0.9, 0.95, 0.97]) == pytest.approx((statistics.mean(vals), statistics.stdev(vals)))
    assert report.mean_sd([0.5]) == (0.5, None)


def test_training_table():
    """Each SSL run's training row: loss first -> last with its minimum, val kNN first -> best -> last, z_std
    against 1/sqrt(D) with D from the record's recipe, else --proj-dim, else not at all (a record from before
    recipes: its method file's default then may not be today's); runs without curves give no row."""
    barlow = {"model": "barlow", "data": "d", "seed": 0, "config": "barlow.py --data d", "recipe": {"proj_dim": 2048},
              "curves": {"epoch": [1, 2, 3], "loss": [5.0, 3.0, 4.0], "z_std": [0.01, 0.02, 0.03],
                         "eta_share": [1.0, 0.5, 0.25], "knn_epoch": [1, 2, 3], "knn_auc": [0.6, 0.9, 0.8]}}
    simclr = {"model": "simclr", "data": "d", "seed": 1, "config": "simclr.py --proj-dim 64",
              "curves": {"epoch": [1], "loss": [2.0], "z_std": [None], "knn_epoch": [], "knn_auc": []}}
    rand = {"model": "random", "data": "d", "seed": 0, "config": "evaluate.py", "curves": {"epoch": [], "loss": []}}
    rows = [ln for ln in report.training([barlow, simclr, rand], "d") if ln.startswith("| ") and "seed" not in ln]
    assert rows == ["| SimCLR | 1 | 2.000 → 2.000 (min 2.000, ep 1) | – | not recorded | – |",  # (no eta_share)
                    "| Barlow Twins | 0 | 5.000 → 4.000 (min 3.000, ep 2) | 0.600 (ep 1) → best 0.900 (ep 2) → 0.800 "
                    f"(ep 3); last − best -0.100 | 0.0100 → 0.0300 (1/√D = {2048 ** -0.5:.4f}) | 1.00 → 0.25 |"]
    assert report.proj_dim(simclr) == 64 and report.proj_dim({**simclr, "config": "simclr.py"}) is None
    old = {**barlow, "recipe": {}}  # (planted: today's default, 128, drawn for a run of D = 2048)
    assert report.training([old], "d")[-1].endswith("| 0.0100 → 0.0300 (D not recorded) | 1.00 → 0.25 |")
    assert report.proj_dim({**simclr, "recipe": {"proj_dim": 32}}) == 32  # what it ran with, whatever the default
    assert report.training([rand], "d") == [] and report.training([barlow], "other") == []


def test_table_cells_and_paired_differences():
    assert report.auc_cell([{"auc": 0.9123, "auc_ci95": [0.88, 0.94]}]) == "0.912 [0.880, 0.940]"
    assert report.auc_cell([{"auc": 0.9}, {"auc": 0.92}]) == f"0.910 ± {statistics.stdev([0.9, 0.92]):.3f}"
    rec = lambda m, s, auc: {"model": m, "data": "d", "seed": s, "results": {"linear": {"auc": auc}}}
    ok = [rec("random", 0, 0.80), rec("random", 1, 0.90), rec("random", 2, 0.85),
          rec("simclr", 0, 0.85), rec("simclr", 1, 0.93)]  # seed 2 of SimCLR missing: pairs only on seeds 0, 1
    diffs = [0.05, 0.03]
    assert report.paired_delta(ok, "d", "simclr", "linear") == \
        f"+{statistics.mean(diffs):.3f} ± {statistics.stdev(diffs):.3f} (2 seeds)"
    assert report.paired_delta(ok[:1] + ok[3:4], "d", "simclr", "linear") == "+0.050 (1 seed)"
    assert report.paired_delta(ok, "d", "byol", "linear") == "–"


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
    md = open(report.write_results(two_dataset_records(), ["pneumonia-28", "breast-28"], cfg, cli, 60)).read()
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
    lines = report.readme_summary(records, ["pneumonia-28", "breast-28"], cli)
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


def test_readme_block_names_a_failure_once_with_its_seeds():
    """The same failure on three seeds is one entry listing them; another reason, or another dataset, is its own
    (planted: one entry per record, "(seed 0: ...); (seed 1: ...)", as the README read before)."""
    offline = "evaluate.py --init imagenet: ImageNet weights for resnet18 not found at /x; download it"
    bad = lambda m, d, s, why: {"model": m, "data": d, "seed": s, "status": "failed", "reason": why}
    records = two_dataset_records() + [bad("imagenet", "pneumonia-28", s, offline) for s in (0, 1, 2)] + [
        bad("vicreg", "pneumonia-28", 1, "vicreg: loss is nan at epoch 1 step 9; stopped"),
        bad("imagenet", "breast-28", 0, offline)]
    lines = report.readme_summary(records, ["pneumonia-28", "breast-28"], argparse.Namespace(preset="cpu", argv=[], out="results"))
    failed = [line.split(". Why, in full")[0] for line in lines if line.startswith("Failed on")]
    assert failed == ["Failed on pneumonia-28, no results: ImageNet transfer (seeds 0, 1, 2: ImageNet weights for "
                      "resnet18 not found); VICReg (seed 1: vicreg: loss is nan at epoch 1 step 9)",
                      "Failed on breast-28, no results: ImageNet transfer (seed 0: ImageNet weights for resnet18 not "
                      "found)"], failed


def test_ablation_table_reports_val_scores_and_the_best_variant(tmp_path):
    variants = dict(list(reproduce.ABLATION.items())[:3])
    names = list(variants)
    rec = lambda knn, lin: {"status": "ok", "wall_s": 90, "results": {"knn": {"val_auc": knn}, "linear": {"val_auc": lin}}}
    records = [rec(0.91, 0.97), rec(0.93, 0.96), {"status": "failed"}]
    cli = argparse.Namespace(preset="cpu", argv=["--ablate"], out=str(tmp_path))
    text = open(report.write_ablation(records, variants, cli)).read()
    assert f"| {names[0]} | `{' '.join(reproduce.ABLATION[names[0]])}` | 0.910 | 0.970 | 1.5 min |" in text
    assert f"| {names[2]} |" in text and "| – | – | failed |" in text
    assert f"Best val kNN AUC: {names[1]}; best val linear AUC: {names[0]}." in text
    assert "test" not in text.replace("the test split is never looked at", "")  # val only


def test_short_reason_keeps_the_first_clause_for_the_readme():
    """The README block names each failure in one short clause (RESULTS.md keeps the whole message)."""
    nan = "vicreg: loss is nan at epoch 1 step 10; stopped, no checkpoint yet. Try a lower --lr."
    assert report.short_reason(nan) == "vicreg: loss is nan at epoch 1 step 10"
    offline = ("evaluate.py --init imagenet: ImageNet weights for resnet18 not found at /root/.cache/torch/hub/"
               "checkpoints/resnet18-f37072fd.pth and could not be downloaded (URLError: <urlopen error>): download "
               "https://download.pytorch.org/models/resnet18-f37072fd.pth to /root/.cache/...")
    assert report.short_reason(offline) == "ImageNet weights for resnet18 not found"
    assert report.short_reason("exit code 3") == "exit code 3"
    assert report.short_reason("ValueError: bad --lr") == "ValueError: bad --lr"  # not a program's prefix


def test_no_finished_run_leaves_no_embedding_of_other_records(tmp_path):
    """A study whose records all moved away (the cpu rerun's start) must not keep the old runs' embedding.png: the
    figure says that nothing has finished (planted: the early return that left the old file in place)."""
    import matplotlib.image
    rec = {"model": "random", "data": "d", "seed": 0, "status": "ok", "curves": {},
           "results": {"embedding": {"xy": [[0.0, 0.0], [1.0, 1.0], [0.5, 0.2]], "y": [0, 1, 0]}}}
    report.figures([rec], ["d"], str(tmp_path))
    before = matplotlib.image.imread(tmp_path / "embedding.png").shape
    report.figures([{**rec, "status": "pending"}], ["d"], str(tmp_path))
    after = matplotlib.image.imread(tmp_path / "embedding.png").shape
    assert before != after and after[:2] == (80, 320)  # 4 x 1 inches at 80 dpi: the "no finished run" figure


def test_targets_rows_measured_and_met_missed_or_open():
    """Each target's row: the measured value, 'open (k of n runs)' while a run it needs has not run, then met or
    missed; a failed run misses every target that needs it; collapse is the lowest min(z_std) / z_std at epoch 1."""
    def rec(m, s, auc, status="ok", z=(0.05, 0.04)):
        r = {"model": m, "data": "d", "seed": s, "status": status}
        if status == "ok":
            r.update(results={"linear": {"auc": auc}, "linear_1pct": {"auc": auc - 0.1}}, curves={"z_std": list(z)})
        return r
    goal = dict(over_untrained=0.02, best=0.95, best_1pct=0.9, floor={"barlow": 0.9})
    records = [rec("random", 0, 0.90), rec("random", 1, 0.92), rec("simclr", 0, 0.935), rec("simclr", 1, 0.935),
               rec("byol", 0, 0.95), rec("byol", 1, None, "pending"), rec("barlow", 0, None, "failed"),
               rec("barlow", 1, 0.96, z=(0.04, 0.01, 0.03))]
    rows = [ln for ln in report.targets(records, "d", goal) if ln.startswith("| ") and "status" not in ln]
    assert rows == [
        "| SimCLR: linear 100% ≥ the untrained backbone + 0.02 (mean over paired seeds) | +0.025 ± 0.014 (2 seeds) "
        "| met |",
        "| BYOL: linear 100% ≥ the untrained backbone + 0.02 (mean over paired seeds) | +0.050 (1 seed) "
        "| open (3 of 4 runs) |",
        "| Barlow Twins: linear 100% ≥ the untrained backbone + 0.02 (mean over paired seeds) | +0.040 (1 seed) "
        "| missed |",
        "| Barlow Twins: linear 100% ≥ 0.900 | 0.960 | missed |",
        "| best SSL method: linear 100% ≥ 0.950 | Barlow Twins 0.960 | open (5 of 6 runs) |",
        "| best SSL method: linear 1% ≥ 0.900 | Barlow Twins 0.860 | open (5 of 6 runs) |",
        "| no SSL run collapses or diverges: min z_std ≥ ½ × epoch 1's, no failed run | 4 runs checked, lowest "
        "min / epoch 1: Barlow Twins s1 0.250; Barlow Twins s0 failed | open (5 of 6 runs) |"]
    # every run finished, none failed, nothing fell below half its start: the measured values decide
    done = records[:5] + [rec("byol", 1, 0.97), rec("barlow", 0, 0.88), rec("barlow", 1, 0.96, z=(0.04, 0.021))]
    rows = [ln.rsplit(" | ", 1)[1] for ln in report.targets(done, "d", goal)[5:]]
    assert rows == ["met |", "met |", "missed |", "met |", "met |", "missed |", "met |"]
    low = [rec("random", 0, 0.9), rec("simclr", 0, 0.99, z=(0.04, 0.019))]  # below half: a collapse
    assert report.targets(low, "d", {})[-1].endswith("SimCLR s0 0.475 | missed |")
    # just under the line (DCLW's BreastMNIST run: 0.4993; here 0.4996): rounded down, never "0.500" beside "missed"
    edge = [rec("random", 0, 0.9), rec("simclr", 0, 0.99, z=(0.04, 0.019984))]
    assert report.targets(edge, "d", {})[-1].endswith("SimCLR s0 0.499 | missed |")
    plain = report.targets([rec("random", 0, 0.9), rec("simclr", 0, 0.89)], "d", dict(over_untrained=0.0))
    assert "| SimCLR: linear 100% ≥ the untrained backbone (mean over paired seeds) | -0.010 (1 seed) | missed |" in plain


def test_target_within_10pct_takes_the_best_method_by_its_full_label_probe():
    """The 10% target compares the best method's (by linear 100%) mean 10% probe with its own 100% probe: not the
    best 10% score, not another method's gap; open while an SSL run is pending."""
    def rec(m, s, full, tenth, status="ok"):
        return {"model": m, "data": "d", "seed": s, "status": status, "curves": {},
                "results": {"linear": {"auc": full}, "linear_10pct": {"auc": tenth}} if status == "ok" else {}}
    goal = dict(within_10pct=0.01)
    records = [rec("simclr", 0, 0.96, 0.945), rec("simclr", 1, 0.97, 0.955),  # best: 0.965 vs 0.950, -0.015
               rec("byol", 0, 0.95, 0.955)]                                    # the best 10%, a gap of +0.005
    row = report.targets(records, "d", goal)[5]
    assert row == ("| best SSL method: linear 10% within 0.01 of its linear 100% | SimCLR 0.950 vs 0.965 (-0.015) "
                   "| missed |")
    records[1] = rec("simclr", 1, 0.97, 0.97)  # 0.9575 vs 0.965: within 0.0075
    assert report.targets(records, "d", goal)[5].endswith("(-0.007) | met |")
    records.append(rec("byol", 1, None, None, "pending"))
    assert report.targets(records, "d", goal)[5].endswith("| open (3 of 4 runs) |")
