"""The recipe search: pilots of each method's recipe at the cpu study's budget, scored on the val split only.

A pilot is one method file run with the cpu preset's budget for its dataset (PneumoniaMNIST-28: 10 epochs of batch
256 = 180 steps; BreastMNIST-28: 100 epochs of batch 64 = 800 steps) and the recipe flags given in PILOTS. Its record,
results/recipes/<name>.json, keeps the command, the val-split scores (linear probe AUC with all and with 10% of the
train labels, kNN AUC), the loss and collapse monitor (z_std) over training, wall time, machine and date; the test
split's scores are left out on purpose, so nothing is chosen on test. results/RECIPES.md is generated from the
records, beside the same val scores of the committed cpu study (the old recipes and the untrained backbone).

Run:
    python recipes.py barlow-sgd            # run these pilots (one after another), then rebuild RECIPES.md
    python recipes.py --table-only          # RECIPES.md from the committed records
    python recipes.py --agreement           # how alike the two views are at initialization, per augmentation
A pilot whose record is committed with the same command and recipe (records.resolve: every argument, defaults
included) is never rerun; an interrupted one resumes (--resume).
"""
import argparse
import datetime
import glob
import importlib
import json
import os
import sys

import torch

import common
import dataset
import records
import reproduce
import runs

ROOT = os.path.dirname(os.path.abspath(__file__))

# the cpu study's compute per run (reproduce.PRESETS["cpu"]); a pilot's flags may replace any of these
BUDGET = {"pneumonia": ["--epochs", "10", "--batch-size", "256", "--eval-every", "5", "--warmup-epochs", "1"],
          "breast": ["--epochs", "100", "--batch-size", "64", "--eval-every", "25", "--warmup-epochs", "10"]}
# lightly's CIFAR-10 benchmark recipe: SGD 0.06 x batch/128 (0.12 here, since medssl scales by batch/256), momentum
# 0.9, weight decay 5e-4, cosine with no warmup; brightness/contrast 0.4, crops from 8% of the area, no blur
PLAIN = ["--optimizer", "sgd", "--lr", "0.12", "--weight-decay", "5e-4", "--warmup-epochs", "0",
         "--jitter", "0.4", "--min-scale", "0.08", "--blur", "0"]
# name -> (method, data, flags): what each pilot changes against the method file's defaults
PILOTS = {
    "barlow-sgd": ("barlow", "pneumonia", PLAIN + ["--scale-loss", "1", "--lambd", "5e-3"]),
    "vicreg-sgd": ("vicreg", "pneumonia", PLAIN),
    "byol-sgd": ("byol", "pneumonia", PLAIN),
    "simsiam-sgd": ("simsiam", "pneumonia", PLAIN),
    # batch-norm statistics per view, as the official Barlow Twins / SimSiam / VICReg / fixed-BYOL code: one lever
    # at a time against barlow-sgd and the committed study's runs (same command but --bn)
    "barlow-sgd-pv": ("barlow", "pneumonia", PLAIN + ["--scale-loss", "1", "--lambd", "5e-3", "--bn", "per-view"]),
    "byol-pv": ("byol", "pneumonia", ["--bn", "per-view"]),
    "simsiam-pv": ("simsiam", "pneumonia", ["--bn", "per-view"]),
    "vicreg-pv": ("vicreg", "pneumonia", ["--bn", "per-view"]),
    # VICReg diverged at step 12 with one warmup epoch (18 steps) at LARS 0.3; the BreastMNIST run, with 80 warmup
    # steps, did not: the study's recipe with five warmup epochs (90 steps, half the run)
    "vicreg-w5": ("vicreg", "pneumonia", ["--warmup-epochs", "5"]),
    # the candidate byol-pv with the published brightness / contrast strength 0.4 instead of SimCLR's 0.8
    "byol-pv-j4": ("byol", "pneumonia", ["--bn", "per-view", "--jitter", "0.4"]),
    # vicreg-w5 held at LARS LR <= 0.2 and diverged above it (step 63, LR 0.22), its loss flat at ~24 (the variance
    # hinge: std(z) ~0.04) all the while: a peak LR of 0.1, and plain SGD at a quarter of lightly's LR (0.12 blew
    # up at step 4)
    "vicreg-lr01": ("vicreg", "pneumonia", ["--lr", "0.1"]),
    "vicreg-sgd-lr03": ("vicreg", "pneumonia", PLAIN + ["--lr", "0.03", "--warmup-epochs", "1"]),
    # VICReg's covariance term grows with the expander width D (17.4 of the loss at D = 2048, 2.7 at 512, 0.7 at 128,
    # at initialization); 36-step probes of the study's recipe at D = 512 and 128 passed the peak LR where D = 2048
    # diverged (reading-recipes.md): the full budget at those widths
    "vicreg-d512": ("vicreg", "pneumonia", ["--proj-dim", "512"]),
    "vicreg-d128": ("vicreg", "pneumonia", ["--proj-dim", "128"]),
    # byol-pv-j4's lever (jitter 0.4 instead of SimCLR's 0.8) on SimSiam, against simsiam-pv
    "simsiam-pv-j4": ("simsiam", "pneumonia", ["--bn", "per-view", "--jitter", "0.4"]),
    # the jitter lever (0.4 instead of 0.8) on the three methods not yet given it: VICReg at its stable width 512,
    # Barlow Twins and DCLW at the study's recipe (one lever each against the study's runs and vicreg-d512)
    "vicreg-d512-j4": ("vicreg", "pneumonia", ["--proj-dim", "512", "--jitter", "0.4"]),
    "barlow-j4": ("barlow", "pneumonia", ["--jitter", "0.4"]),
    "dclw-j4": ("dclw", "pneumonia", ["--jitter", "0.4"]),
    # the views' agreement at initialization triples from jitter 0.8 to 0.2 (recipes.py --agreement): a quarter of
    # the study's jitter on the two candidates, against byol-pv-j4 and simsiam-pv-j4
    "byol-pv-j2": ("byol", "pneumonia", ["--bn", "per-view", "--jitter", "0.2"]),
    "simsiam-pv-j2": ("simsiam", "pneumonia", ["--bn", "per-view", "--jitter", "0.2"]),
    # barlow-j4 scored as the study's Barlow Twins (the jitter is not what holds it back): the projection width D,
    # as VICReg's (a 2048-wide cross-correlation from 256 images is rank <= 255, its off-diagonal term cannot vanish)
    "barlow-d512-j4": ("barlow", "pneumonia", ["--proj-dim", "512", "--jitter", "0.4"]),
    "vicreg-d512-j2": ("vicreg", "pneumonia", ["--proj-dim", "512", "--jitter", "0.2"]),
    # barlow-d512-j4 beat barlow-j4 on every val score (the width is Barlow Twins' lever at 256 images a batch)
    "barlow-d128-j4": ("barlow", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4"]),
    # BYOL's target follows the online network slowly: at tau_base 0.99 (cosine to 1) 40% of the target's weights
    # at step 180 are still its initial ones (the product of the tau_k); at 0.95, 1%. One lever against byol-pv-j4
    "byol-pv-j4-ema95": ("byol", "pneumonia", ["--bn", "per-view", "--jitter", "0.4", "--ema-decay", "0.95"]),
    # dclw-j4 beat the study's DCLW and SimCLR on every val score: SimCLR's own jitter 0.8 came from a 3-epoch ablation
    # on a 1000-image subset (results/ABLATION.md), so the same lever at this budget, against the study's SimCLR
    "simclr-j4": ("simclr", "pneumonia", ["--jitter", "0.4"]),
    # BreastMNIST's val split is not saturated as PneumoniaMNIST's is: the candidates there, against the study's runs
    "simsiam-pv-j4-breast": ("simsiam", "breast", ["--bn", "per-view", "--jitter", "0.4"]),
    "byol-pv-j4-breast": ("byol", "breast", ["--bn", "per-view", "--jitter", "0.4"]),
    "dclw-j4-breast": ("dclw", "breast", ["--jitter", "0.4"]),
    # Barlow Twins' adopted recipe where the first study's Barlow Twins did worst (BreastMNIST val linear 0.74): at
    # batch 64 even D = 128 is wider than the batch
    "barlow-d128-j4-breast": ("barlow", "breast", ["--proj-dim", "128", "--jitter", "0.4"]),
    # VICReg at width 128 with the jitter it gained from at 512 (vicreg-d512-j4), against vicreg-d512-j4
    "vicreg-d128-j4": ("vicreg", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4"]),
    # both still below the untrained backbone on val (kNN by ~0.03). Barlow Twins gained on every val score at each
    # narrowing of D so far (2048 -> 512 -> 128): the trend's next step. VICReg's loss sits on the variance hinge at
    # every width; every reference runs each view through the network alone (the official code, solo-learn's
    # training_step, lightly), and vicreg-pv diverged only at D = 2048, where the covariance term was 25x D = 128's
    "barlow-d64-j4": ("barlow", "pneumonia", ["--proj-dim", "64", "--jitter", "0.4"]),
    "vicreg-d128-j4-pv": ("vicreg", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--bn", "per-view"]),
    # vicreg-d128-j4-pv beat joint BN on every val score (adopted): the same recipe where val is not saturated, and
    # the same lever on Barlow Twins at its adopted width (per-view BN was tried on it only with SGD at D = 2048)
    "vicreg-d128-j4-pv-breast": ("vicreg", "breast", ["--proj-dim", "128", "--jitter", "0.4", "--bn", "per-view"]),
    "barlow-d128-j4-pv": ("barlow", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--bn", "per-view"]),
    # per-view BN lowered Barlow Twins (barlow-d128-j4-pv). Its redundancy term is weak at D = 128: with
    # c_ij ~ 1/sqrt(B) from the finite batch alone, its floor is lambda D^2 / B against D for the invariance term, a
    # ratio of lambda D / B = 0.0026 at the paper's lambda (0.0051), D = 128, B = 256, against the paper's 0.0204
    # (D = 8192, B = 2048); lambda 0.04 restores that ratio
    "barlow-d128-j4-l04": ("barlow", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--lambd", "0.04"]),
    # under clipped LARS each of Barlow Twins' weight tensors steps by eta = 2% of its norm at LR 0.3 or 0.1 (its
    # ||g|| / ||w|| at init: 0.34-7.7); the LR only caps that step (lr ||g||): at 0.01, 17 of its 23 tensors take
    # plain SGD's smaller step (0.3-2%). The step size, one lever against barlow-d128-j4 (reading-recipes.md)
    "barlow-d128-j4-lr01": ("barlow", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--lr", "0.01"]),
    # barlow-d128-j4-lr01 beat LR 0.3 on every val score, above the untrained backbone (adopted for PneumoniaMNIST):
    # the same LR where the batch is 64 and the steps 800, and the same lever on VICReg's identical LARS recipe, at
    # the LR that gives its layers Barlow Twins' steps at 0.01 (its ||g|| / ||w|| at init is a third of Barlow's:
    # median 0.39 vs 1.3; at 0.03, 16 of its 23 weight tensors take plain SGD's step, 0.4-2% of their norm)
    "barlow-d128-j4-lr01-breast": ("barlow", "breast", ["--proj-dim", "128", "--jitter", "0.4", "--lr", "0.01"]),
    "vicreg-d128-j4-pv-lr03": ("vicreg", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--bn", "per-view",
                                                       "--lr", "0.03"]),
    # vicreg-d128-j4-pv-lr03 was adopted for PneumoniaMNIST: the same LR where the batch is 64 and the steps 800,
    # against vicreg-d128-j4-pv-breast (LR 0.3, VICReg's default there)
    "vicreg-d128-j4-pv-lr03-breast": ("vicreg", "breast", ["--proj-dim", "128", "--jitter", "0.4", "--bn", "per-view",
                                                           "--lr", "0.03"]),
    # BYOL missed +0.02 on test (+0.016 +- 0.007) with its loss still falling: at its LR 1.0, 21 of its 24 weight
    # tensors step eta = 2% of their norm (||g|| / ||w|| at init, median 0.036), as Barlow Twins' did at 0.3; at 0.3,
    # 20 of 24 take plain SGD's step (~1%). The step size, one lever against byol-pv-j4-ema95
    "byol-pv-j4-ema95-lr03": ("byol", "pneumonia", ["--bn", "per-view", "--jitter", "0.4", "--ema-decay", "0.95",
                                                    "--lr", "0.3"]),
    # more steps for the same compute: batch 128 for 360 steps sees the budget's 180 x 256 images. BYOL at LR 1.0 x
    # 128/256 = 0.5 still steps about eta's 2% of each weight tensor's norm (0.5 x the median ||g|| / ||w|| at init,
    # 0.036 at batch 256: 1.8%), now twice as often; Barlow Twins at --lr 0.02 x 128/256 = 0.01 per step keeps the
    # adopted recipe's per-step LR and its plain-SGD step size, twice as often
    "byol-pv-j4-ema95-b128": ("byol", "pneumonia", ["--bn", "per-view", "--jitter", "0.4", "--ema-decay", "0.95",
                                                    "--batch-size", "128"]),
    "barlow-d128-j4-lr01-b128": ("barlow", "pneumonia", ["--proj-dim", "128", "--jitter", "0.4", "--lr", "0.02",
                                                         "--batch-size", "128"]),
}
# byol-pv-j4-ema95 again, unchanged (the same entry, so the same command), on the other VM type (Intel, AVX-512; it
# ran on an AMD, AVX2 only): how far floating-point order alone moves a pilot's val scores
PILOTS["byol-pv-j4-ema95-xvm"] = PILOTS["byol-pv-j4-ema95"]
SCORES = [("linear", "linear"), ("linear_10pct", "linear 10%"), ("knn", "kNN")]  # results.json key -> column
# the first cpu study's records (its recipes, before this search adopted any), relative to the output folder: the
# pilots' yardstick in the table
STUDY = os.path.join("history", "cpu-2026-12-03", "runs")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def command(name):
    method, data, flags = PILOTS[name]
    cmd = [f"{method}.py", "--data", data, "--size", "28", "--seed", "0", "--finetune-epochs", "0", *BUDGET[data]]
    return reproduce.with_flags(cmd, flags)


def summary(results, curves):
    """The val-split scores of results.json and the training curves' ends; never a test score. eta_share: LARS's
    share of weight tensors whose step eta set, epoch 1 and last (0 for plain SGD; empty for older runs)."""
    val = {k: round(results[k]["val_auc"], 4) for k, _ in SCORES}
    z = [v for v in curves["z_std"] if v is not None]
    eta = [round(v, 3) for v in curves.get("eta_share", []) if v is not None]
    return {"val": val, "loss": [curves["loss"][0], curves["loss"][-1]] if curves["loss"] else [],
            "z_std": [z[0], min(z), z[-1]] if z else [], "eta_share": [eta[0], eta[-1]] if eta else [],
            "val_knn_curve": curves["knn_auc"]}


def run(name, out, runs_dir=os.path.join("runs", "recipes")):
    """Run one pilot in runs_dir/<name>/ (resumed if interrupted) and write its record to out/recipes/<name>.json;
    skipped when that record holds the same command and recipe (records.same_recipe)."""
    cmd = command(name)
    path = os.path.join(out, "recipes", f"{name}.json")
    try:  # every argument, defaults included: a default changed since reruns the pilot
        recipe = records.resolve(cmd)
    except SystemExit:  # a bad flag (its line printed): the run fails on it too, and its record says why
        recipe = None
    if os.path.exists(path):
        old = read_json(path)
        why = "ran another command" if old.get("command") != " ".join(cmd) else records.same_recipe(old, recipe)
        if not why:
            print(f"[skip] {name}: committed in {path}", flush=True)
            return
        print(f"[old ] {name}: {path} {why}; running it again", flush=True)
    folder = os.path.join(runs_dir, name)
    os.makedirs(folder, exist_ok=True)
    print(f"[run ] {name}: {' '.join(cmd)}", flush=True)
    script = os.path.join(ROOT, cmd[0])  # the method file beside this one, whatever the working folder
    rc, wall = runs.run_child([sys.executable, "-u", script, *cmd[1:], "--out", folder, "--resume"], folder)
    rec = {"name": name, "method": PILOTS[name][0], "data": PILOTS[name][1], "flags": PILOTS[name][2],
           "command": " ".join(cmd), "recipe": recipe, "wall_s": round(wall, 1),
           "date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": runs.machine()}
    done = os.path.join(folder, "results.json")
    if rc != 0 or not os.path.exists(done):
        rec.update(status="failed", reason=runs.failure_reason(folder, rc))
    else:
        rec.update(status="ok", **summary(read_json(done), runs.curves(os.path.join(folder, "metrics.jsonl"))))
    runs.write_json(path, rec)
    print(f"[{'done' if rec['status'] == 'ok' else 'fail'}] {name} in {rec['wall_s'] / 60:.1f} min: "
          f"{rec.get('val', rec.get('reason'))}", flush=True)


# --agreement: (jitter strength, smallest crop) settings, for the views of a method of each kind (BYOL's asymmetric
# views: byol, barlow, vicreg; SimCLR's: simclr, simsiam, dclw)
AGREEMENT = {"methods": ["barlow", "simsiam"], "settings": [(0.8, 0.2), (0.4, 0.2), (0.2, 0.2), (0.0, 0.2),
                                                            (0.4, 0.08), (0.4, 0.5)]}


def feature_correlation(h1, h2):
    """Mean over features of the correlation across the batch between the two views' features: Barlow Twins' c_ii
    on (B, d) features, averaged. 1: every feature of one view predicts the other's; ~0: the views are unrelated."""
    z1 = (h1 - h1.mean(0)) / (h1.std(0, unbiased=False) + 1e-8)
    z2 = (h2 - h2.mean(0)) / (h2.std(0, unbiased=False) + 1e-8)
    return (z1 * z2).mean(0).mean().item()


def agreement(method, data="pneumonia", size=28, seed=0, batches=4, B=256, data_dir=None):
    """How alike the two views of one image are to the untrained backbone (seed-initialized, batch-norm in training
    mode as the first step sees it), for each AGREEMENT setting with `method`'s views: the feature correlation of
    feature_correlation, averaged over `batches` batches of B train images. No training; seconds per setting."""
    views = importlib.import_module(method).VIEWS
    images = dataset.load(data, size, data_dir, seed)["train"][0]
    N, C, H, W = images.shape
    mean, std = dataset.channel_stats(images)
    out = []
    for jitter, min_scale in AGREEMENT["settings"]:
        torch.manual_seed(seed)  # the same initialization and the same batches for every setting
        gen = torch.Generator().manual_seed(seed)
        backbone = common.make_backbone("resnet18", C, size)[0].train()
        aug = common.augmentation(size, views, min_scale, jitter)
        r = []
        with torch.no_grad():
            for _ in range(batches):
                idx = torch.randperm(N, generator=gen)[:min(B, N)]
                x1, x2 = common.augment(images[idx], common.sample_params(len(idx), H, W, C, gen, **aug), size,
                                        mean, std)
                r.append(feature_correlation(*backbone(torch.cat([x1, x2])).chunk(2)))  # h: (2B, 512) -> 2 x (B, 512)
        out.append({"jitter": jitter, "min_scale": min_scale, "correlation": round(sum(r) / len(r), 4)})
        print(f"{method}: jitter {jitter}, crops from {min_scale:.0%}: feature correlation {out[-1]['correlation']}",
              flush=True)
    return out


def write_agreement(out, data_dir=None):
    """out/recipes-agreement.json: agreement() for each AGREEMENT method, with the command, machine and date."""
    rec = {"command": "python recipes.py --agreement", "data": "pneumonia", "size": 28, "batches": 4, "B": 256,
           "date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": runs.machine(),
           "views": {m: agreement(m, data_dir=data_dir) for m in AGREEMENT["methods"]}}
    runs.write_json(os.path.join(out, "recipes-agreement.json"), rec)


def agreement_lines(out):
    """RECIPES.md's section on out/recipes-agreement.json, when it exists."""
    path = os.path.join(out, "recipes-agreement.json")
    if not os.path.exists(path):
        return []
    rec = read_json(path)
    methods = list(rec["views"])
    lines = ["## How alike the two views are at initialization", "",
             f"`{rec['command']}` ({rec['date'][:10]}, {rec['machine']}): the untrained ResNet-18 (seed 0, batch norm "
             f"in training mode) on {rec['batches']} batches of {rec['B']} {rec['data']} train images at "
             f"{rec['size']} px; per feature, the correlation across the batch between the two views' features h "
             "(Barlow Twins' c_ii on h), averaged: 1 when each view's features predict the other's, ~0 unrelated.", "",
             "| jitter strength | smallest crop | " + " | ".join(f"{m}'s views" for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for i, s in enumerate(rec["views"][methods[0]]):
        lines.append(f"| {s['jitter']} | {s['min_scale']:.0%} | "
                     + " | ".join(f"{rec['views'][m][i]['correlation']:.3f}" for m in methods) + " |")
    return lines + [""]


def table(out):
    """RECIPES.md: every pilot's val scores beside those of the first cpu study's runs (STUDY) of the same data."""
    recs = [read_json(p) for p in sorted(glob.glob(os.path.join(out, "recipes", "*.json")))]
    lines = ["# Recipe search (val split only)", "",
             "Generated by `python recipes.py --table-only` from results/recipes/*.json; each pilot ran with "
             "the command shown, on the machine and date shown. Scores are AUCs on the **val** split: the linear "
             "probe (L2 chosen on val) with all and with 10% of the train labels, and weighted kNN (k chosen on "
             "val). z_std: the collapse monitor (start / min / end; 1/sqrt(d) when spread out, 0 collapsed). η-set: "
             "the share of weight tensors whose LARS step η (not the LR) set, epoch 1 → last (pilots run since "
             "2026-12-06; 0 for plain SGD, blank for older records). A "
             "pilot's flags change the method file's defaults of its day (before the search's choices were adopted "
             "on 2026-12-05: jitter 0.8 at <= 64 px, joint batch norm, D = 2048 for Barlow Twins and VICReg); its "
             "record's `recipe` holds every setting it ran with.", ""]
    reading = os.path.join(out, "reading-recipes.md")  # the hand-written reading of the pilots, when there is one
    if os.path.exists(reading):
        with open(reading) as f:
            lines += ["## Reading (hand-written, reading-recipes.md; the tables below are generated)", "",
                      f.read().strip(), ""]
    lines += agreement_lines(out)
    for data in BUDGET:
        mine = [r for r in recs if r["data"] == data]
        if not mine:
            continue
        lines += [f"## {data} (28 px, {' '.join(BUDGET[data])})", "",
                  "| run | " + " | ".join(c for _, c in SCORES)
                  + " | loss, epoch 1 → last | z_std | η-set | wall (min) | recipe |",
                  "|---|" + "---|" * (len(SCORES) + 5)]
        for p in sorted(glob.glob(os.path.join(out, STUDY, f"cpu-*-{data}-28-s*.json"))):
            r = read_json(p)
            if r.get("status") == "ok":
                what = {"random": "untrained backbone", "supervised": "supervised from scratch"}.get(
                    r["model"], "the study's recipe (the method file's defaults)")
                lines.append(f"| cpu study: {r['model']} s{r['seed']} | "
                             + " | ".join(f"{r['results'][k]['val_auc']:.4f}" for k, _ in SCORES)
                             + f" | | | | | {what} |")
        for r in mine:
            if r["status"] != "ok":
                lines.append(f"| **{r['name']}** | failed: {r['reason']} | | | | | | | `{' '.join(r['flags'])}` |")
                continue
            loss = " → ".join(f"{v:.4g}" for v in r["loss"])
            z = " / ".join(f"{v:.4f}" for v in r["z_std"])
            eta = " → ".join(f"{v:.2f}" for v in r.get("eta_share", []))
            lines.append(f"| **{r['name']}** | " + " | ".join(f"{r['val'][k]:.4f}" for k, _ in SCORES)
                         + f" | {loss} | {z} | {eta} | {r['wall_s'] / 60:.0f} | `{' '.join(r['flags'])}` |")
        lines += ["", "Pilots ran on: " + "; ".join(sorted({f"{r['date'][:10]} {r['machine']}" for r in mine})), ""]
    runs.write_text(os.path.join(out, "RECIPES.md"), "\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help=f"pilots to run, of: {', '.join(PILOTS)}")
    p.add_argument("--table-only", action="store_true", help="only rebuild RECIPES.md from the committed records")
    p.add_argument("--agreement", action="store_true", help="measure how alike the two views are at "
                   "initialization for each AGREEMENT setting (recipes-agreement.json), then rebuild RECIPES.md")
    p.add_argument("--out", default="results", help="where recipes/*.json and RECIPES.md go")
    cli = p.parse_args(argv)
    unknown = [n for n in cli.names if n not in PILOTS]
    if unknown:
        p.error(f"unknown pilot(s) {', '.join(unknown)}: expected some of {', '.join(PILOTS)}")
    if cli.agreement:
        try:
            write_agreement(cli.out)
        except (ValueError, OSError) as e:  # the data missing or unreadable: one line naming the file
            raise SystemExit(f"recipes --agreement: {dataset.one_line(e)}") from None
    for name in [] if cli.table_only else cli.names:
        run(name, cli.out)
    table(cli.out)


if __name__ == "__main__":
    main()
