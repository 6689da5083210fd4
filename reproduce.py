"""Reproduce the paper's study (arXiv 2303.02245): every SSL method x dataset x seed, the three baselines, every
evaluation protocol, then one table (results/RESULTS.md), the per-run JSON and the figures.

Run:
    python reproduce.py --preset cpu                      # <= 45 min on a 2-core CPU: 28 px, few epochs, one seed
    python reproduce.py --preset paper                    # the full GPU study: ResNet-50, 224 px, 200 epochs, 3 seeds
    python reproduce.py --preset cpu --folders ../shared/data/chest_xray_224   # add folder datasets
    make reproduce PRESET=cpu ARGS="--folders ..."        # the same through make (sets up the venv first)
Each run is a subprocess (`python simclr.py ...`, `python evaluate.py --init ...`) writing to
runs/reproduce-<preset>/<model>-<data>-s<seed>/; one whose results.json exists is skipped, one with a checkpoint
is resumed, so an interrupted reproduce continues where it stopped. A failed run (e.g. ImageNet weights missing
offline) is reported in the table and the others go on. Outputs: results/RESULTS.md, results/runs/*.json,
results/{curves,label_efficiency,embedding}.png.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

import common

PRESETS = {
    "cpu": dict(arch="resnet18", size=28, epochs=10, seeds=[0], train_subset=1000, eval_every=2, finetune_epochs=5,
                imagenet_size=224, note="CPU preset: 28 px, ResNet-18, 10 epochs, a seeded 1000-image train subset "
                "(pre-training, probes and fine-tune), one seed. A smoke-scale study that runs in minutes, not the "
                "paper's 200-epoch numbers."),
    "paper": dict(arch="resnet50", size=224, epochs=200, seeds=[0, 1, 2], train_subset=0, eval_every=10,
                  finetune_epochs=20, imagenet_size=224, note="Paper preset: ResNet-50, 224 px, 200 epochs, full "
                  "train splits, 3 seeds (mean +- sample std). Meant for a GPU."),
}
METHODS = ["simclr", "byol", "simsiam", "barlow"]
BASELINES = ["random", "supervised", "imagenet"]
NAMES = {"random": "random init", "supervised": "supervised (scratch)", "imagenet": "ImageNet transfer",
         "simclr": "SimCLR", "byol": "BYOL", "simsiam": "SimSiam", "barlow": "Barlow Twins"}
PROTOCOLS = [("knn", "kNN"), ("linear_1pct", "linear 1%"), ("linear_10pct", "linear 10%"), ("linear", "linear 100%"),
             ("finetune", "fine-tune"), ("supervised", "supervised head")]
FRACTIONS = {"linear_1pct": 1, "linear_10pct": 10, "linear": 100}  # protocol -> % of train labels
CLASSES = {"pneumonia": ["normal", "pneumonia"], "breast": ["malignant", "normal/benign"]}  # MedMNIST's label names


# ------------------------------------------------------------------------------------------------ runs
def data_name(data):
    """'pneumonia' -> 'pneumonia'; '../shared/data/chest_xray_224/' -> 'chest_xray_224' (run keys, table headings)."""
    return os.path.basename(os.path.normpath(data))


def command(model, data, seed, p, run, a):
    """The subprocess that makes runs/.../results.json for one model x dataset x seed."""
    py = [sys.executable, "-u"]
    common_args = ["--data", data, "--size", str(p["size"]), "--arch", p["arch"], "--seed", str(seed),
                   "--finetune-epochs", str(p["finetune_epochs"])]
    if p["subset"]:
        common_args += ["--train-subset", str(p["subset"])]
    if a.data_dir:
        common_args += ["--data-dir", a.data_dir]
    if model in METHODS:
        cmd = py + [f"{model}.py", *common_args, "--epochs", str(p["epochs"]), "--eval-every", str(p["eval_every"]),
                    "--out", run]
        return cmd + (["--resume"] if os.path.exists(os.path.join(run, "checkpoint.pt")) else [])
    cmd = py + ["evaluate.py", "--init", model, *common_args, "--out", os.path.join(run, "results.json")]
    if model == "supervised":
        cmd += ["--epochs", str(p["epochs"])]
    if model == "imagenet":
        cmd += ["--imagenet-size", str(p["imagenet_size"])] + (["--weights", a.weights] if a.weights else [])
    return cmd


def run_one(model, data, seed, p, a):
    """Run (or skip) one model x dataset x seed. Returns its record: results, curves, wall time, or the failure."""
    key = f"{model}-{data_name(data)}-s{seed}"
    run = os.path.join(a.runs, key)
    done, info = os.path.join(run, "results.json"), os.path.join(run, "run.json")
    rec = {"model": model, "data": data_name(data), "seed": seed, "preset": a.preset,
           "train_subset": p["subset"], "n_train": p["n_train"]}
    if os.path.exists(done):
        print(f"[skip] {key}: {done} exists")
        rec["skipped"] = True
    else:
        os.makedirs(run, exist_ok=True)
        cmd = command(model, data, seed, p, run, a)
        print(f"[run ] {key}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(os.path.join(run, "log.txt"), "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
        if rc != 0 or not os.path.exists(done):
            with open(os.path.join(run, "log.txt")) as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {rc}"
            print(f"[fail] {key} after {wall:.0f} s: {reason}", flush=True)
            return {**rec, "status": "failed", "reason": reason, "wall_s": wall}
        common.write_json(info, {"wall_s": wall, "command": " ".join(cmd[2:])})
        print(f"[done] {key} in {wall / 60:.1f} min", flush=True)
    with open(done) as f:
        rec["results"] = json.load(f)
    if os.path.exists(info):
        with open(info) as f:
            rec.update(json.load(f))
    rec["curves"] = curves(os.path.join(run, "metrics.jsonl"))
    return {**rec, "status": "ok"}


def curves(path):
    """metrics.jsonl -> per-epoch mean train loss and the online val kNN AUC (empty for the baselines)."""
    loss, knn = {}, {}
    if os.path.exists(path):
        with open(path) as f:
            for row in map(json.loads, f):
                if "train/loss" in row:
                    loss.setdefault(row["epoch"] + 1, []).append(row["train/loss"])
                if "val/knn_auc" in row:
                    knn[row["epoch"] + 1] = row["val/knn_auc"]
    return {"epoch": sorted(loss), "loss": [sum(v) / len(v) for _, v in sorted(loss.items())],
            "knn_epoch": sorted(knn), "knn_auc": [knn[e] for e in sorted(knn)]}


# ------------------------------------------------------------------------------------------------ table
def mean_std(values):
    """'0.960' for one value, '0.960 ± 0.004' (sample std) for several; '–' for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.3f}"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} CPU threads, {gpu}, torch {torch.__version__}"


def write_table(records, datasets, p, a, wall):
    ok = [r for r in records if r["status"] == "ok"]
    lines = [f"# medssl results: preset `{a.preset}`", "",
             f"**{p['note']}**" + (f" This invocation overrides the preset: {', '.join(a.overrides)}."
                                   if a.overrides else ""), "",
             f"- Command: `python reproduce.py {' '.join(a.argv)}` (`make reproduce PRESET={a.preset}` runs "
             f"`python reproduce.py --preset {a.preset}`)",
             f"- Date: {datetime.date.today().isoformat()}; machine: {machine()}",
             f"- Wall time of this invocation: {wall / 60:.1f} min ({sum(r.get('skipped', False) for r in records)} of "
             f"{len(records)} runs skipped as already done); sum of the runs' own wall times, when they ran: "
             f"{sum(r.get('wall_s') or 0 for r in records) / 60:.1f} min",
             f"- Backbone {p['arch']}, {p['size']} px, {p['epochs']} epochs (SSL and supervised), seeds "
             f"{p['seeds']}, fine-tune {p['finetune_epochs']} epochs; train images per dataset under its heading. "
             f"Metrics on each dataset's test split; mean ± sample std over seeds where there are several.",
             "- Protocols: kNN (k=200, T=0.1, cosine) and linear probe on frozen features; the probe at 1%, 10% and "
             "100% of the train labels; fine-tune end to end; for the supervised baseline also its own head "
             "(its backbone saw every train label, so its frozen-feature rows are not label-efficient).",
             "- Anchors (MedMNIST v2, supervised ResNet-18 at 28 px, full data, 100 epochs): PneumoniaMNIST "
             "ACC 0.854 / AUC 0.944, BreastMNIST ACC 0.863 / AUC 0.901."]
    reasons = {}  # the same failure (ImageNet weights offline) is listed once, with every run it stopped
    for r in records:
        if r["status"] != "ok":
            reasons.setdefault(r["reason"], []).append(f"{r['model']}-{r['data']}-s{r['seed']}")
    lines += [f"- Not run: {', '.join(runs)}. {reason}" for reason, runs in reasons.items()] + [""]
    for d in datasets:
        r0 = next(r for r in records if r["data"] == d)
        used = f"a seeded {r0['train_subset']}-image subset of" if r0["train_subset"] else "all"
        lines += [f"## {d}", "", f"Train images: {used} {r0['n_train']}.", "",
                  "| protocol | model | ACC | AUC | F1 (weighted) |", "|---|---|---:|---:|---:|"]
        for proto, pname in PROTOCOLS:
            for model in BASELINES + METHODS:
                rs = [r["results"][proto] for r in ok if r["data"] == d and r["model"] == model
                      and proto in r["results"]]
                if rs:
                    cells = [mean_std([x[m] for x in rs]) for m in ("acc", "auc", "f1_weighted")]
                    lines.append(f"| {pname} | {NAMES[model]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Figures", "", "![loss and online kNN](curves.png)", "",
              "![label efficiency](label_efficiency.png)", "", "![embedding](embedding.png)", "",
              "## Runs", "", "| run | status | wall (min) |", "|---|---|---:|"]
    for r in records:
        status = "ok" if r["status"] == "ok" else "failed (see above)"
        wall_s = r.get("wall_s")
        lines.append(f"| {r['model']}-{r['data']}-s{r['seed']} | {status} | "
                     f"{'–' if wall_s is None else f'{wall_s / 60:.1f}'} |")
    path = os.path.join(a.out, "RESULTS.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------------ figures
def figures(records, datasets, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if r["status"] == "ok"]
    first = {(r["model"], r["data"]): r for r in sorted(ok, key=lambda r: r["seed"], reverse=True)}  # lowest seed
    colors = dict(zip(METHODS + BASELINES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    # 1. training loss (left axis) and online val kNN AUC (right axis) per epoch, one panel per method x dataset
    fig, axes = plt.subplots(len(datasets), len(METHODS), figsize=(3.2 * len(METHODS), 2.4 * len(datasets)),
                             squeeze=False)
    for i, d in enumerate(datasets):
        for j, m in enumerate(METHODS):
            ax, r = axes[i, j], first.get((m, d))
            ax.set_title(f"{NAMES[m]}, {d}", fontsize=9)
            if r is None:
                continue
            c = r["curves"]
            ax.plot(c["epoch"], c["loss"], color=colors[m])
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel("train loss", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(c["knn_epoch"], c["knn_auc"], "k--o", ms=3)
            ax2.set_ylabel("val kNN AUC (dashed)", fontsize=8)
            for a_ in (ax, ax2):
                a_.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)

    # 2. label efficiency: linear-probe test AUC vs % of train labels, SSL vs the baselines that saw no labels
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for m in METHODS + ["random", "imagenet"]:
            pts = []
            for proto, pct in FRACTIONS.items():
                vals = [r["results"][proto]["auc"] for r in ok if r["model"] == m and r["data"] == d
                        and proto in r["results"]]
                if vals:
                    pts.append((pct, sum(vals) / len(vals)))
            if pts:
                ax.plot(*zip(*pts), "o-" if m in METHODS else "s--", color=colors[m], label=NAMES[m])
        sup = [r["results"]["supervised"]["auc"] for r in ok if r["model"] == "supervised" and r["data"] == d]
        if sup:
            ax.axhline(sum(sup) / len(sup), color="gray", ls=":", label="supervised, all labels")
        ax.set_xscale("log")
        ax.set_xticks([1, 10, 100], ["1%", "10%", "100%"])
        ax.set_xlabel("train labels for the linear probe")
        ax.set_ylabel("test AUC")
        ax.set_title(d)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "label_efficiency.png"), dpi=80)
    plt.close(fig)

    # 3. 2-D embedding (PCA) of the test features, coloured by class, lowest seed of each model
    models = [m for m in BASELINES + METHODS if any((m, d) in first for d in datasets)]
    fig, axes = plt.subplots(len(datasets), len(models), figsize=(2.3 * len(models), 2.3 * len(datasets)),
                             squeeze=False)
    for i, d in enumerate(datasets):
        for j, m in enumerate(models):
            ax, r = axes[i, j], first.get((m, d))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{NAMES[m]}\n{d}", fontsize=8)
            if r is None:
                continue
            e = r["results"]["embedding"]
            xy, y = torch.tensor(e["xy"]), torch.tensor(e["y"])
            for c in y.unique().tolist():
                name = CLASSES[d][c] if d in CLASSES else f"class {c}"
                ax.scatter(*xy[y == c].T, s=3, alpha=0.6, label=name)
            lo, hi = xy.quantile(0.01, dim=0), xy.quantile(0.99, dim=0)  # a few outliers would squash the rest
            pad = (hi - lo) * 0.1
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            if j == 0:
                ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "embedding.png"), dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", nargs="*", default=["pneumonia", "breast"], help="MedMNIST flags (none: folders only)")
    ap.add_argument("--folders", nargs="*", default=[], help="folder datasets in the paper's layout")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES)
    ap.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--finetune-epochs", type=int, help="override the preset's fine-tune epochs")
    ap.add_argument("--weights", default=None, help="ImageNet weights file for --init imagenet (default: hub cache)")
    ap.add_argument("--data-dir", default="", help="passed on to every run (default: $MEDSSL_DATA_DIR or ./data)")
    ap.add_argument("--runs", default="", help="run folders (default: runs/reproduce-<preset>)")
    ap.add_argument("--out", default="results", help="RESULTS.md, runs/*.json and figures go here")
    a = ap.parse_args(argv)
    a.argv = argv
    if not a.data and not a.folders:
        raise SystemExit("nothing to run: give --data flags and/or --folders")
    for folder in a.folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"--folders {folder}: not a directory")
    p = dict(PRESETS[a.preset])
    a.overrides = [f"{k} {getattr(a, k)}" for k in ("seeds", "epochs", "finetune_epochs") if getattr(a, k) is not None]
    a.overrides += [f"{k} {getattr(a, k)}" for k in ("methods", "baselines") if getattr(a, k) != ap.get_default(k)]
    p["seeds"] = a.seeds or p["seeds"]
    p["epochs"] = a.epochs or p["epochs"]
    p["finetune_epochs"] = p["finetune_epochs"] if a.finetune_epochs is None else a.finetune_epochs
    a.runs = a.runs or os.path.join("runs", f"reproduce-{a.preset}")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    t0 = time.time()
    records, datasets = [], []
    order = [m for m in ("random", "supervised") if m in a.baselines] + a.methods + \
        [m for m in ("imagenet",) if m in a.baselines]  # ImageNet last: it may fail offline
    for data in a.data + a.folders:
        # a subset only where the split is larger (BreastMNIST has 546 train images: it is used whole)
        n_train = len(common.load_dataset(data, p["size"], a.data_dir or None, 0)["train"][1])
        p["subset"] = p["train_subset"] if 0 < p["train_subset"] < n_train else 0
        p["n_train"] = n_train
        datasets.append(data_name(data))
        for seed in p["seeds"]:
            for model in order:
                rec = run_one(model, data, seed, p, a)
                records.append(rec)
                common.write_json(os.path.join(a.out, "runs", f"{a.preset}-{model}-{rec['data']}-s{seed}.json"), rec)
    path = write_table(records, datasets, p, a, time.time() - t0)
    figures(records, datasets, a.out)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"wrote {path} and figures in {a.out}/ ({(time.time() - t0) / 60:.1f} min; {len(failed)} failed run(s))")
    return 1 if any(r["model"] != "imagenet" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
