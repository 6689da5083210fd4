"""Reproduce the paper's study (arXiv 2303.02245): every SSL method x dataset x seed, the three baselines, every
evaluation protocol; one record per run (results/runs/*.json), then the report (report.py: RESULTS.md, figures).

Run:
    python reproduce.py --preset cpu --part 1/14          # a 2-core CPU: 28 px, full splits, 14 parts of <= 100 min
    python reproduce.py --preset cpu --table-only         # the table from the committed results/runs/*.json
    python reproduce.py --preset paper                    # the full GPU study: ResNet-50, 224 px, 200 epochs, 3 seeds
    python reproduce.py --preset cpu --folders ../shared/data/chest_xray_224   # add folder datasets
    make reproduce PRESET=cpu ARGS="--folders ..."        # the same through make (sets up the venv first)
Each run is a subprocess (`python simclr.py ...`, `python evaluate.py --init ...`) writing to
runs/reproduce-<preset>/<model>-<data>-s<seed>-<hash of its command>/; one whose results.json exists is skipped
(the hash makes that mean "the same configuration"), one with a checkpoint is resumed, so an interrupted reproduce
(Ctrl-C, SIGTERM: the running children are stopped too) continues where it stopped when rerun. A failed run (e.g.
ImageNet weights missing offline) is reported in the table and the others go on. Outputs: results/RESULTS.md,
results/runs/*.json (one record per run: commit them; a committed record of the same configuration is never rerun),
results/{curves,label_efficiency,embedding}.png and the results block of README.md.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import signal
import sys
import threading
import time

import common
import dataset
import records
import report
import runs

# A preset's `data` entries are MedMNIST flags or folders, "@64" picks another image size than the preset's `size`;
# epochs, batch_size, warmup_epochs, eval_every and finetune_epochs are one value or one per data entry.
# method_flags: {method: flags, or {data entry: flags}}, '--option value' pairs that replace or extend one method's
# command (its own --lr or --warmup-epochs, chosen on val); they enter the run's config hash, so only it reruns.
# minutes: each run's estimated wall time on the 2-core CPU (per data entry and model), which --part uses to split
# the study into parts of about equal time; parts: how many (each <= 100 min). Estimated 2026-12-05 for the rerun
# with issue 30's recipes, from what ran on the 2-core VM: the first cpu study's runs (2026-12-02/03, with
# evaluation and fine-tuning: pneumonia SimCLR 33 min, DCLW 33, SimSiam 35, BYOL 61, Barlow 63 on the slower AMD
# VM, supervised 24; breast 37-65, supervised 18) and the recipe pilots (pneumonia, no fine-tuning, the AMD VM:
# Barlow 23-30, VICReg 23-27, DCLW 31, BYOL 38-58, SimSiam 39-50; breast SimSiam 30). The estimates fix the parts.
MINUTES_CPU = {"pneumonia": {"random": 5, "supervised": 30, "imagenet": 0.5, "simclr": 40, "dclw": 40, "byol": 55,
                             "simsiam": 45, "barlow": 40, "vicreg": 40},
               "breast": {"random": 3, "supervised": 25, "imagenet": 0.5, "simclr": 40, "dclw": 45, "byol": 55,
                          "simsiam": 40, "barlow": 45, "vicreg": 45}}
PARTS_CPU = 14  # 18 SSL runs on PneumoniaMNIST (3 seeds) and 6 on BreastMNIST, 40-55 min each: two per part (85 min)
SEEDS_CPU = {"pneumonia": [0, 1, 2], "breast": [0]}  # the untrained backbone: 0, 1, 2 on both (paired by seed)
# What the rerun must show (issue 30; test split, linear probe): every SSL method's mean gain over the untrained
# backbone of its seeds, the best method's AUC and its AUC at 1% of the labels, and the independent plain Barlow Twins
# recipe's 0.945 at the same 180 steps. report.targets checks them (and collapse) against the records.
# Keyed by the dataset's name with its size ("pneumonia-28", as in the records), not by the data entry: a target holds
# at one image size (the same flag at 64 px is another question). check_targets refuses keys that name nothing.
TARGETS_CPU = {"pneumonia-28": dict(over_untrained=0.02, best=0.965, best_1pct=0.93, floor={"barlow": 0.945}),
               "breast-28": dict(over_untrained=0.0, best=0.90)}
TARGETS_GPU = {"pneumonia-28": dict(over_untrained=0.02, best=0.975, within_10pct=0.01), "breast-64": dict(best=0.90)}
PRESETS = {
    "cpu": dict(arch="resnet18", size=28, data=["pneumonia", "breast"],
                epochs={"pneumonia": 10, "breast": 100}, batch_size={"pneumonia": 256, "breast": 64},
                warmup_epochs={"pneumonia": 1, "breast": 10}, eval_every={"pneumonia": 5, "breast": 5},
                finetune_epochs={"pneumonia": 1, "breast": 10}, seeds=SEEDS_CPU, random_seeds=[0, 1, 2], train_subset=0,
                imagenet_size=224, jobs=1, parts=PARTS_CPU, minutes=MINUTES_CPU, targets=TARGETS_CPU,
                # settings that fit these short schedules, each chosen on val by the named pilot (why: the
                # deviations table and results/reading-recipes.md): byol-pv-j4-ema95, barlow-d128-j4-lr01,
                # barlow-d128-j4-lr01-breast, vicreg-d128-j4-pv-lr03, vicreg-d128-j4-pv-lr03-breast; the rest keep
                # the files' defaults
                method_flags={"byol": {"pneumonia": ["--ema-decay", "0.95"]},
                              "barlow": {"pneumonia": ["--lr", "0.01"], "breast": ["--lr", "0.01"]},
                              "vicreg": {"pneumonia": ["--lr", "0.03"], "breast": ["--lr", "0.03"]}},
                note="CPU preset: the study answered on a 2-core CPU. ResNet-18 at 28 px on the full train splits: "
                "PneumoniaMNIST 10 epochs at batch 256 (18 steps each = 180 steps), BreastMNIST 100 epochs at batch "
                "64 (8 steps each = 800 steps); the recipes of issue 30's search (results/RECIPES.md, chosen on val); "
                "PneumoniaMNIST with seeds 0, 1, 2 for every "
                "method (paired by seed with the untrained backbone's), BreastMNIST with seed 0 and the untrained "
                "backbone's 0, 1, 2 (its spread is the noise floor); the supervised baseline with the same epochs; "
                "fine-tune 1 / 10 epochs. Run in parts of <= 100 min (--part I/N), each committed as it finishes."),
    "gpu": dict(arch="resnet18", size=28, data=["pneumonia", "breast", "breast@64"],
                epochs={"pneumonia": 200, "breast": 400, "breast@64": 200},
                batch_size={"pneumonia": 256, "breast": 128, "breast@64": 128}, warmup_epochs=10, seeds=[0, 1, 2],
                train_subset=0, eval_every=20, finetune_epochs=20, imagenet_size=224, jobs=4, targets=TARGETS_GPU,
                note="GPU preset: ResNet-18 on PneumoniaMNIST 28 px (200 epochs, 18 steps each = 3,600 steps), "
                "BreastMNIST 28 px (400 epochs x 4 steps = 1,600 steps) and 64 px (200 epochs x 4 steps = 800 steps), "
                "full train splits, 3 seeds, several runs at once on the one GPU (--jobs); its targets "
                "(TARGETS_GPU) under each dataset."),
    "paper": dict(arch="resnet50", size=224, data=["pneumonia", "breast"], epochs=200, batch_size=256,
                  warmup_epochs=10, seeds=[0, 1, 2], train_subset=0, eval_every=10, finetune_epochs=20,
                  imagenet_size=224, jobs=1,
                  method_flags={"barlow": ["--proj-dim", "8192"], "vicreg": ["--proj-dim", "8192"]},
                  note="Paper preset: ResNet-50, 224 px, 200 epochs, full train splits, 3 seeds (mean +- sample "
                  "std), the papers' projection widths. Meant for a GPU."),
}
# augmentation variants of the ablation (--ablate), SimCLR on PneumoniaMNIST-28, scored on the val split
ABLATION = {"paper recipe (crop 0.08, jitter 0.4, blur)": ["--min-scale", "0.08", "--jitter", "0.4", "--blur", "1"],
            "no blur": ["--min-scale", "0.08", "--jitter", "0.4", "--blur", "0"],
            "no blur, crop >= 0.2": ["--min-scale", "0.2", "--jitter", "0.4", "--blur", "0"],
            "no blur, crop >= 0.2, jitter 0.8": ["--min-scale", "0.2", "--jitter", "0.8", "--blur", "0"],
            "no blur, crop >= 0.4": ["--min-scale", "0.4", "--jitter", "0.4", "--blur", "0"],
            "no blur, jitter 0.8": ["--min-scale", "0.08", "--jitter", "0.8", "--blur", "0"]}


# ------------------------------------------------------------------------------------------------ runs
# the settings a preset may give per data entry (one value, or a dict keyed by the entry: e.g. seeds 0-2 on one
# dataset and seed 0 on another)
PER_DATA = ("epochs", "batch_size", "warmup_epochs", "eval_every", "finetune_epochs", "seeds", "random_seeds")


def with_flags(cmd, flags):
    """cmd with each '--option value' pair of flags: replacing that option's value where cmd has it, else appended.
    A preset's method_flags thus change one method's recipe (e.g. its --lr or --warmup-epochs) and nothing else."""
    if len(flags) % 2 or not all(f.startswith("--") for f in flags[::2]):
        raise ValueError(f"method flags {flags}: expected '--option value' pairs")
    cmd = list(cmd)
    for opt, value in zip(flags[::2], flags[1::2]):
        if opt in cmd:
            cmd[cmd.index(opt) + 1] = value
        else:
            cmd += [opt, value]
    return cmd


# what a preset sets alike for every model of a data entry, so that their records compare; method_flags may not
PRESET_OWNED = ("--data", "--size", "--arch", "--seed", "--finetune-epochs", "--train-subset", "--data-dir", "--out")


def check_method_flags(name, preset):
    """Refuse, before any run starts, a preset whose method_flags name no method, no data entry of the preset, are
    not options of that method's file (parsed and range-checked by its own Args, as the run would be), or set what
    the preset sets for every model (PRESET_OWNED)."""
    for method, flags in preset.get("method_flags", {}).items():
        if method not in records.METHODS:
            raise SystemExit(f"preset {name}: method_flags names '{method}': expected one of "
                             f"{', '.join(records.METHODS)}")
        for entry, argv in (flags.items() if isinstance(flags, dict) else [(None, flags)]):  # None: every entry
            if entry is not None and entry not in preset["data"]:
                raise SystemExit(f"preset {name}: method_flags for {method} name data entry '{entry}': expected "
                                 f"one of {', '.join(preset['data'])}")
            try:
                with_flags([], argv)
                common.parse_args(importlib.import_module(method).Args, argv)
            except (ValueError, SystemExit):  # argparse has printed which option and why
                raise SystemExit(f"preset {name}: method_flags for {method} ({entry or 'every entry'}) {argv}: "
                                 f"expected '--option value' pairs of {method}.py's options (see python {method}.py "
                                 "--help)") from None
            owned = [opt for opt in argv[::2] if opt in PRESET_OWNED]
            if owned:
                raise SystemExit(f"preset {name}: method_flags for {method} ({entry or 'every entry'}) set "
                                 f"{', '.join(owned)}: the preset sets these alike for every model (runs paired by "
                                 "seed, scored on the same data by the same protocols); a method's flags may set its "
                                 "recipe, its --epochs and --batch-size")


def check_targets(name, preset):
    """Refuse, before any run starts, targets for no dataset of the preset (keys are data names, e.g. 'pneumonia-28'),
    with a goal report.targets does not know, a value that is not an AUC (difference), or a floor for no method: a
    typo would otherwise just leave the targets out of RESULTS.md."""
    names = [records.data_name(*parse_spec(spec, preset["size"])) for spec in preset["data"]]
    for d, goal in preset.get("targets", {}).items():
        if d not in names:
            raise SystemExit(f"preset {name}: targets for '{d}': expected a dataset of the preset, one of "
                             f"{', '.join(names)}")
        for key, value in goal.items():
            values = value.items() if key == "floor" and isinstance(value, dict) else [(None, value)]
            for method, v in values:
                if key not in report.GOALS or (key == "floor") != (method is not None) or \
                        (method is not None and method not in records.METHODS) or \
                        isinstance(v, bool) or not isinstance(v, (int, float)) or not -1 <= v <= 1:
                    raise SystemExit(f"preset {name}: targets for {d}: {key} {value}: expected one of "
                                     f"{', '.join(report.GOALS)}, an AUC (or difference) in [-1, 1]; floor: "
                                     f"{{method: AUC}} with methods of {', '.join(records.METHODS)}")


def parse_spec(spec, default_size):
    """'breast@64' -> ('breast', 64); 'pneumonia' -> ('pneumonia', default_size); a folder may contain '@'."""
    data, at, size = spec.rpartition("@")
    if not at or os.path.isdir(spec):
        return spec, default_size
    if not size.isdigit():
        raise SystemExit(f"data entry {spec!r}: expected NAME or NAME@SIZE (e.g. breast@64)")
    return data, int(size)


def spec_key(data, size, default_size):
    """The preset's key for a data entry: 'pneumonia', or 'breast@64' when the size is not the preset's."""
    return data if size == default_size else f"{data}@{size}"


def assign_parts(minutes, n):
    """Split runs with estimated `minutes` into n parts of about equal time: longest run first, each to the part
    with the least time so far (ties: the lower part; equal runs keep their order), the LPT rule. With equal
    estimates this is run i -> part i mod n. Parts are then numbered in the order of their first run, so part 1
    holds the study's first run. Returns each run's part (0-based) and each part's estimated minutes."""
    load, part = [0.0] * n, [0] * len(minutes)
    for i in sorted(range(len(minutes)), key=lambda i: (-minutes[i], i)):
        part[i] = min(range(n), key=lambda p: (load[p], p))
        load[part[i]] += minutes[i]
    first = sorted(range(n), key=lambda p: part.index(p) if p in part else len(part) + p)  # new number -> old
    new = {old: k for k, old in enumerate(first)}
    return [new[p] for p in part], [load[old] for old in first]


def setting(preset, key, spec):
    """A preset value that is either one value for every data entry or a dict keyed by the entry."""
    v = preset[key]
    return v.get(spec, v.get(spec.split("@")[0])) if isinstance(v, dict) else v


@dataclasses.dataclass
class Run:
    """One model x dataset x seed of the study. cfg: the preset with this data entry's values (PER_DATA), its
    n_train, subset and method_flags, and from planning its estimate_min and part; folder: where its run folder
    goes (runs/reproduce-<preset>; an ablation variant: runs/ablation-<preset>/v<i>)."""
    model: str
    data: str  # a MedMNIST flag or a folder
    size: int
    seed: int
    cfg: dict
    folder: str

    @property
    def name(self):  # '<model>-<data>-<size>-s<seed>', e.g. simclr-pneumonia-28-s0
        return f"{self.model}-{records.data_name(self.data, self.size)}-s{self.seed}"


def command(run, out, data_dir="", weights=None):
    """The subprocess that makes out/results.json for one run; data_dir and weights: this machine's paths."""
    cfg, py = run.cfg, [sys.executable, "-u"]
    common_args = ["--data", run.data, "--size", str(run.size), "--arch", cfg["arch"], "--seed", str(run.seed),
                   "--finetune-epochs", str(cfg["finetune_epochs"]), "--batch-size", str(cfg["batch_size"])]
    if cfg["subset"]:
        common_args += ["--train-subset", str(cfg["subset"])]
    if data_dir:
        common_args += ["--data-dir", data_dir]
    if run.model in records.METHODS:
        cmd = py + [f"{run.model}.py", *common_args, "--epochs", str(cfg["epochs"]), "--eval-every",
                    str(cfg["eval_every"]), "--warmup-epochs", str(cfg["warmup_epochs"]), "--out", out,
                    *cfg.get("extra", [])]
        cmd = with_flags(cmd, cfg.get("method_flags", {}).get(run.model, []))  # this data entry's, set in main()
        return cmd + ["--resume"]  # continues an interrupted run of this config; starts one when there is none
    if run.model == "supervised":  # a training script like the methods: the same epochs, its own recipe
        return py + ["supervised.py", *common_args, "--epochs", str(cfg["epochs"]), "--out", out, "--resume"]
    cmd = py + ["evaluate.py", "--init", run.model, *common_args, "--out", os.path.join(out, "results.json")]
    if run.model == "imagenet":
        cmd += ["--imagenet-size", str(cfg["imagenet_size"])] + (["--weights", weights] if weights else [])
    return cmd


def identity(run):
    """The run's configuration as one string, its command minus the interpreter and what differs between machines
    (where it writes, where the data and the ImageNet weights lie), and that string's 8-hex sha1. A finished run,
    in a local run folder or committed as results/runs/*.json, is reused only by the very same configuration."""
    config = " ".join(a for a in command(run, "")[2:] if a != "--resume")
    return config, hashlib.sha1(config.encode()).hexdigest()[:8]


def recipe(run):
    """What the run's script makes of its command (records.resolve). The command alone (identity) misses a default
    changed in a method file since; run_one compares this too before reusing a run (records.same_recipe)."""
    return records.resolve(command(run, "")[2:])


def json_path(out, preset, run):
    """Where a run's record is committed: results/runs/<preset>-<model>-<data>-s<seed>.json."""
    return os.path.join(out, "runs", f"{preset}-{run.name}.json")


def run_one(run, cli, run_it=True):
    """Run (or skip) one Run. Returns its record (records.RECORD): results, curves, wall time, or the failure.
    A run whose record is committed (results/runs/*.json, same configuration) is never rerun: the record is
    returned as it is, so parts run on other machines make one study. run_it=False (a run of another --part, or
    --table-only) only reads what a committed record or a finished local run left; else the run is pending."""
    cfg, key, path = run.cfg, run.name, json_path(cli.out, cli.preset, run)
    config, config_hash = identity(run)
    told = lambda opt, preset: int(records.config_flag(config, opt) or preset)  # its method_flags' own, or the preset's
    rec = {"model": run.model, "data": records.data_name(run.data, run.size), "seed": run.seed, "preset": cli.preset,
           "train_subset": cfg["subset"], "n_train": cfg["n_train"], "epochs": told("--epochs", cfg["epochs"]),
           "batch_size": told("--batch-size", cfg["batch_size"]), "finetune_epochs": cfg["finetune_epochs"],
           "config": config, "config_hash": config_hash, "recipe": recipe(run), "estimate_min": cfg["estimate_min"],
           "part": cfg["part"]}
    old = records.committed(path, config_hash)
    changed = old is not None and records.same_recipe(old, rec["recipe"])  # the same command, a default changed since?
    if old is None and os.path.exists(path):  # check_records found it sound
        print(f"[old ] {key}: {path} is of another configuration; not used (this run: {config_hash})", flush=True)
    elif changed:
        print(f"[old ] {key}: {path} {changed}; not used", flush=True)
        old = None
    if old is not None and (old["status"] == "ok" or (old["status"] == "failed" and not run_it)):
        print(f"[skip] {key}: committed in {path} (same configuration)", flush=True)
        return {**old, "estimate_min": rec["estimate_min"], "part": rec["part"], "committed": True}
    # the folder name carries the configuration's hash, so any other setting runs in a folder of its own
    folder = os.path.join(run.folder, f"{key}-{config_hash}")
    cmd = command(run, folder, cli.data_dir, cli.weights)
    done, info = os.path.join(folder, "results.json"), os.path.join(folder, "run.json")
    if os.path.exists(done):  # a finished folder is reused only when its run.json says it ran with this recipe
        try:
            with open(info) as f:
                ran = json.load(f)
        except (OSError, ValueError):  # no run.json: killed between results.json and it, or an older medssl's
            ran = None
        why = (records.same_recipe(ran, rec["recipe"]) if isinstance(ran, dict)
               else "its run.json is missing or unreadable, so what it ran with is unknown")
        if why:
            reason = f"{folder} finished but {why}: move it away to rerun this run"
            print(f"[fail] {key}: {reason}", flush=True)
            return {**rec, "status": "failed", "reason": reason}
    if os.path.exists(done):
        print(f"[skip] {key}: {done} exists (same configuration)", flush=True)
        rec["skipped"] = True
    elif not run_it or STOP.is_set():
        return {**rec, "status": "pending"}
    else:
        os.makedirs(folder, exist_ok=True)
        print(f"[run ] {key}: {' '.join(cmd[2:])}", flush=True)
        rc, wall = runs.run_child(cmd, folder, RUNNING, key)
        if STOP.is_set():
            print(f"[stop] {key}: interrupted; rerun the same command to resume it", flush=True)
            return {**rec, "status": "pending"}
        ran = {"wall_s": wall, "ran_in_part": cli.part, "date": datetime.datetime.now().isoformat(timespec="minutes"),
               "machine": runs.machine()}
        if rc != 0 or not os.path.exists(done):
            reason = runs.failure_reason(folder, rc)
            print(f"[fail] {key} after {wall:.0f} s: {reason}", flush=True)
            return {**rec, "status": "failed", "reason": reason, **ran}
        runs.write_json(info, {"wall_s": wall, "command": " ".join(cmd[2:]), "recipe": rec["recipe"],
                               **{k: v for k, v in ran.items() if k != "wall_s"}})
        print(f"[done] {key} in {wall / 60:.1f} min", flush=True)
    with open(done) as f:
        rec["results"] = json.load(f)
    if os.path.exists(info):
        with open(info) as f:
            rec.update(json.load(f))
    rec["curves"] = runs.curves(os.path.join(folder, "metrics.jsonl"))
    return {**rec, "status": "ok"}


RUNNING = {}  # Popen -> run key: the runs in flight, for stop()
STOP = threading.Event()  # set by a signal: start nothing new


def stop(signum, frame):
    """SIGTERM or Ctrl-C: pass SIGTERM to every running child (it saves nothing new and exits, see runs.launch),
    start nothing new, and let the main thread unwind with KeyboardInterrupt."""
    STOP.set()
    for proc in list(RUNNING):
        proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def plan(cli, cfg, specs, n_parts):
    """Every Run of the study (or of the ablation) in a fixed order, each with its data entry's settings, its
    estimated minutes and its part; the datasets' names; each part's estimated minutes. Parts balance the preset's
    estimated minutes per run and depend on the preset alone, not on what has run, so committed parts never move."""
    todo, datasets = [], []
    order = [m for m in ("random", "supervised") if m in cli.baselines] + cli.methods + \
        [m for m in ("imagenet",) if m in cli.baselines]  # ImageNet last: it may fail offline
    for spec in specs[:1] if cli.ablate else specs:
        data, size = parse_spec(spec, cfg["size"])
        # the train split's size picks a subset only where it is larger (BreastMNIST's 546 are used whole); with no
        # subset asked for, --table-only needs no data on this machine
        n_train = (len(dataset.load(data, size, cli.data_dir or None, 0)["train"][1])
                   if cfg["train_subset"] or not cli.table_only else None)
        per_method = cfg.get("method_flags", {})  # per method: flags for every entry, or a dict keyed by the entry
        run_cfg = {**cfg, **{k: setting(cfg, k, spec) for k in PER_DATA}, "n_train": n_train,
                   "method_flags": {m: setting(per_method, m, spec) or [] for m in per_method},
                   "subset": cfg["train_subset"] if n_train and 0 < cfg["train_subset"] < n_train else 0}
        datasets.append(records.data_name(data, size))
        if cli.ablate:  # one SimCLR run per variant, each in its own runs folder
            todo += [Run("simclr", data, size, s, {**run_cfg, "extra": flags}, os.path.join(cli.runs, f"v{i}"))
                     for i, flags in enumerate(ABLATION.values()) for s in run_cfg["seeds"][:1]]
        else:
            todo += [Run(m, data, size, s, run_cfg, cli.runs) for m in order
                     for s in (run_cfg["random_seeds"] if m == "random" else run_cfg["seeds"])]
    estimates = [cfg.get("minutes", {}).get(spec_key(r.data, r.size, cfg["size"]), {}).get(r.model, 1.0)
                 for r in todo]
    shares, load = assign_parts(estimates, n_parts)
    return [dataclasses.replace(r, cfg={**r.cfg, "estimate_min": e, "part": f"{p + 1}/{n_parts}"})
            for r, e, p in zip(todo, estimates, shares)], datasets, load


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--data", nargs="*", help="MedMNIST flags, NAME@SIZE for another size (default: the preset's)")
    ap.add_argument("--folders", nargs="*", default=[], help="folder datasets in the paper's layout")
    ap.add_argument("--methods", nargs="+", default=records.METHODS, choices=records.METHODS)
    ap.add_argument("--baselines", nargs="*", default=records.BASELINES, choices=records.BASELINES)
    ap.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs (every dataset)")
    ap.add_argument("--finetune-epochs", type=int, help="override the preset's fine-tune epochs")
    ap.add_argument("--train-subset", type=int, help="override the preset's train subset (0: whole train split)")
    ap.add_argument("--batch-size", type=int, help="override the preset's batch size (every dataset)")
    ap.add_argument("--jobs", type=int, help="runs at once (default: the preset's; on one GPU, small runs share it)")
    ap.add_argument("--part", default=None, help="I/N: run only the I-th of N shares of the runs, balanced by the "
                    "preset's estimated minutes per run (equal minutes: every N-th run); I alone: N from the preset. "
                    "The table covers every finished run, committed or local. Default: 1/1, the whole study")
    ap.add_argument("--table-only", action="store_true", help="train nothing: rebuild the table and figures from the "
                    "committed results/runs/*.json (and finished local runs), listing the runs still missing")
    ap.add_argument("--ablate", action="store_true", help="instead of the study: SimCLR with each augmentation "
                                                          "variant (ABLATION) on the first dataset, scored on val")
    ap.add_argument("--weights", default=None, help="ImageNet weights file for --init imagenet (default: hub cache)")
    ap.add_argument("--data-dir", default="", help="passed on to every run (default: $MEDSSL_DATA_DIR or ./data)")
    ap.add_argument("--runs", default="", help="run folders (default: runs/reproduce-<preset>)")
    ap.add_argument("--out", default="results", help="RESULTS.md, runs/*.json and figures go here")
    ap.add_argument("--readme", default=None, help="a README whose results block (between its two markers) gets "
                    "the summary table (default: README.md when --out is results and the study is a preset's own)")
    cli = ap.parse_args(argv)
    cli.argv = argv
    cfg = dict(PRESETS[cli.preset])
    check_method_flags(cli.preset, cfg)
    check_targets(cli.preset, cfg)
    specs = (cfg["data"] if cli.data is None else cli.data) + cli.folders
    if not specs:
        raise SystemExit("nothing to run: give --data flags and/or --folders")
    for folder in cli.folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"--folders {folder}: not a directory")
    if cli.part is None:  # the whole study; --table-only lists the runs still missing by the preset's parts
        cli.part = f"1/{cfg.get('parts', 1)}" if cli.table_only else "1/1"
    try:
        part, n_parts = (int(x) for x in (cli.part if "/" in cli.part else f"{cli.part}/{cfg.get('parts', 1)}")
                         .split("/"))
    except ValueError:
        part = n_parts = 0
    if not 1 <= part <= n_parts:  # (not an assert: python -O drops those)
        raise SystemExit(f"--part {cli.part}: expected I/N with 1 <= I <= N, e.g. 1/2")
    cli.part = f"{part}/{n_parts}"
    for key in ("jobs", "epochs", "finetune_epochs", "train_subset", "batch_size"):
        if getattr(cli, key) is not None and getattr(cli, key) < (1 if key in ("jobs", "epochs", "batch_size") else 0):
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(cli, key)}: expected a positive number")
    overridden = ("seeds", "epochs", "finetune_epochs", "train_subset", "batch_size", "jobs")
    cli.overrides = [f"{k} {getattr(cli, k)}" for k in overridden if getattr(cli, k) is not None]
    cli.overrides += [f"{k} {getattr(cli, k)}" for k in ("methods", "baselines")
                      if getattr(cli, k) != ap.get_default(k)]
    cli.overrides += [f"data {' '.join(specs)}"] if specs != cfg["data"] else []
    cfg.update({k: getattr(cli, k) for k in overridden if getattr(cli, k) is not None})
    cfg["random_seeds"] = cfg["seeds"] if cli.seeds else cfg.get("random_seeds", cfg["seeds"])
    cli.jobs = cfg["jobs"]
    if cli.readme is None:  # the committed README summarizes the committed study only, never a tweaked one
        cli.readme = "README.md" if cli.out == "results" and not cli.overrides and not cli.ablate else ""
    cli.runs = cli.runs or os.path.join("runs", f"{'ablation' if cli.ablate else 'reproduce'}-{cli.preset}")
    os.makedirs(os.path.join(cli.out, "runs"), exist_ok=True)
    records.check_records(cli.out, cli.preset)
    t0 = time.time()

    todo, datasets, load = plan(cli, cfg, specs, n_parts)  # load: each part's estimated minutes
    mine = set() if cli.table_only else {i for i, r in enumerate(todo) if r.cfg["part"] == cli.part}
    if n_parts > 1 and not cli.table_only:
        print(f"part {cli.part}: {len(mine)} of {len(todo)} runs, estimated {load[part - 1]:.0f} min (parts: "
              f"{', '.join(f'{x:.0f}' for x in load)} min)", flush=True)

    def go(i):
        rec = run_one(todo[i], cli, run_it=i in mine)
        if rec["status"] != "pending" and not rec.get("committed") and not cli.ablate:
            runs.write_json(json_path(cli.out, cli.preset, todo[i]), rec)
        return rec
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)
    pool = concurrent.futures.ThreadPoolExecutor(cli.jobs)  # threads only wait on their subprocess
    try:
        recs = list(pool.map(go, range(len(todo))))
    except KeyboardInterrupt:
        keys = sorted(RUNNING.values())
        pool.shutdown(wait=True, cancel_futures=True)  # the children got SIGTERM; wait until they have exited
        print(f"reproduce: interrupted; stopped {', '.join(keys) or 'no running run'}. Rerun the same command to "
              f"resume: finished runs are reused, interrupted ones continue from their last checkpoint.", flush=True)
        return 130
    pool.shutdown()
    if cli.ablate:
        path = report.write_ablation(recs, ABLATION, cli)
    else:
        path = report.write(recs, datasets, cfg, cli, time.time() - t0)
    failed = [r for r in recs if r["status"] == "failed"]
    print(f"wrote {path} ({(time.time() - t0) / 60:.1f} min; {len(failed)} failed run(s))")
    return 1 if any(r["model"] != "imagenet" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
