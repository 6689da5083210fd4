"""Reproduce the paper's study (arXiv 2303.02245): every SSL method x dataset x seed, the three baselines, every
evaluation protocol, then one table (results/RESULTS.md), the per-run JSON and the figures.

Run:
    python reproduce.py --preset cpu --part 1/13          # a 2-core CPU: 28 px, full splits, 13 parts of <= 100 min
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
import datetime
import glob
import hashlib
import importlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time

import torch

import common
import dataset
import evaluate
import runs

# A preset's `data` entries are MedMNIST flags or folders, "@64" picks another image size than the preset's `size`;
# Published reference points for the table, kept here only (MedMNIST v2, Yang et al., Scientific Data 2023).
ANCHORS = ("Anchors (MedMNIST v2, supervised ResNet-18 at 28 px, full data, 100 epochs): PneumoniaMNIST "
           "ACC 0.854 / AUC 0.944, BreastMNIST ACC 0.863 / AUC 0.901.")
# epochs, batch_size, warmup_epochs, eval_every and finetune_epochs are one value or one per data entry.
# method_flags: {method: flags, or {data entry: flags}}, '--option value' pairs that replace or extend one method's
# command (its own --lr or --warmup-epochs, chosen on val); they enter the run's config hash, so only it reruns.
# minutes: each run's wall time measured on the 2-core CPU (per data entry and model; see results/RESULTS.md's parts
# table), which --part uses to split the study into parts of about equal time; parts: how many (each <= 100 min).
# Estimated 2026-12-02 from per-step times of each method file measured on the 2-core CPU (pneumonia: 20.5 s per
# step of batch 256 for SimCLR, 27.0 BYOL, 19.5 Barlow; breast: 4.7 s per step of 64, 5.8 BYOL) plus evaluation.
MINUTES_CPU = {"pneumonia": {"random": 6, "supervised": 40, "imagenet": 0.5, "simclr": 70, "dclw": 70, "byol": 90,
                             "simsiam": 70, "barlow": 67, "vicreg": 67},
               "breast": {"random": 2, "supervised": 40, "imagenet": 0.5, "simclr": 69, "dclw": 69, "byol": 84,
                          "simsiam": 69, "barlow": 69, "vicreg": 69}}
PARTS_CPU = 13  # every SSL run takes 67-90 min alone, so one per part; the baselines fill the gaps
PRESETS = {
    "cpu": dict(arch="resnet18", size=28, data=["pneumonia", "breast"],
                epochs={"pneumonia": 10, "breast": 100}, batch_size={"pneumonia": 256, "breast": 64},
                warmup_epochs={"pneumonia": 1, "breast": 10}, eval_every={"pneumonia": 5, "breast": 5},
                finetune_epochs={"pneumonia": 1, "breast": 10}, seeds=[0], random_seeds=[0, 1, 2], train_subset=0,
                imagenet_size=224, jobs=1, parts=PARTS_CPU, minutes=MINUTES_CPU,
                note="CPU preset: the study answered on a 2-core CPU. ResNet-18 at 28 px on the full train splits: "
                "PneumoniaMNIST 10 epochs at batch 256 (18 steps each = 180 steps), BreastMNIST 100 epochs at batch "
                "64 (8 steps each = 800 steps); one seed per method, the untrained backbone with seeds 0, 1, 2 (its "
                "spread is the noise floor), the supervised baseline with the same epochs; fine-tune 1 / 10 epochs. "
                "Run in parts of <= 100 min (--part I/N), each committed as it finishes."),
    "gpu": dict(arch="resnet18", size=28, data=["pneumonia", "breast", "breast@64"],
                epochs={"pneumonia": 200, "breast": 400, "breast@64": 200},
                batch_size={"pneumonia": 256, "breast": 128, "breast@64": 128}, warmup_epochs=10, seeds=[0, 1, 2],
                train_subset=0, eval_every=20, finetune_epochs=20, imagenet_size=224, jobs=4,
                note="GPU preset: ResNet-18 on PneumoniaMNIST 28 px (200 epochs, 18 steps each = 3,600 steps), "
                "BreastMNIST 28 px (400 epochs x 4 steps = 1,600 steps) and 64 px (200 epochs x 4 steps = 800 steps), "
                "full train splits, 3 seeds, several runs at once on the one GPU (--jobs). Targets: best SSL linear "
                "AUC >= 0.975 on PneumoniaMNIST-28, every SSL method >= random init + 0.02 (3-seed mean), best "
                "BreastMNIST-64 linear AUC >= 0.90, 10% of the labels within 0.01 AUC of 100%."),
    "paper": dict(arch="resnet50", size=224, data=["pneumonia", "breast"], epochs=200, batch_size=256,
                  warmup_epochs=10, seeds=[0, 1, 2], train_subset=0, eval_every=10, finetune_epochs=20,
                  imagenet_size=224, jobs=1, note="Paper preset: ResNet-50, 224 px, 200 epochs, full train splits, "
                  "3 seeds (mean +- sample std). Meant for a GPU."),
}
METHODS = ["simclr", "dclw", "byol", "simsiam", "barlow", "vicreg"]
BASELINES = ["random", "supervised", "imagenet"]
NAMES = {"random": "random init", "supervised": "supervised (scratch)", "imagenet": "ImageNet transfer",
         "simclr": "SimCLR", "dclw": "DCLW", "byol": "BYOL", "simsiam": "SimSiam", "barlow": "Barlow Twins",
         "vicreg": "VICReg"}
PROTOCOLS = [("knn", "kNN"), ("linear_1pct", "linear 1%"), ("linear_10pct", "linear 10%"), ("linear", "linear 100%"),
             ("finetune", "fine-tune"), ("supervised", "supervised head")]
FRACTIONS = {"linear_1pct": 1, "linear_10pct": 10, "linear": 100}  # protocol -> % of train labels
CLASSES = {"pneumonia": ["normal", "pneumonia"], "breast": ["malignant", "normal/benign"]}  # MedMNIST's label names
# augmentation variants of the ablation (--ablate), SimCLR on PneumoniaMNIST-28, scored on the val split
ABLATION = {"paper recipe (crop 0.08, jitter 0.4, blur)": ["--min-scale", "0.08", "--jitter", "0.4", "--blur", "1"],
            "no blur": ["--min-scale", "0.08", "--jitter", "0.4", "--blur", "0"],
            "no blur, crop >= 0.2": ["--min-scale", "0.2", "--jitter", "0.4", "--blur", "0"],
            "no blur, crop >= 0.2, jitter 0.8": ["--min-scale", "0.2", "--jitter", "0.8", "--blur", "0"],
            "no blur, crop >= 0.4": ["--min-scale", "0.4", "--jitter", "0.4", "--blur", "0"],
            "no blur, jitter 0.8": ["--min-scale", "0.08", "--jitter", "0.8", "--blur", "0"]}


# ------------------------------------------------------------------------------------------------ runs
# the settings a preset may give per data entry (one value, or a dict keyed by the entry)
PER_DATA = ("epochs", "batch_size", "warmup_epochs", "eval_every", "finetune_epochs")


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


def check_method_flags(name, preset):
    """Refuse, before any run starts, a preset whose method_flags name no method, no data entry of the preset, or
    are not options of that method's file (parsed and range-checked by its own Args, as the run would be)."""
    for method, flags in preset.get("method_flags", {}).items():
        if method not in METHODS:
            raise SystemExit(f"preset {name}: method_flags names '{method}': expected one of {', '.join(METHODS)}")
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


def parse_spec(spec, default_size):
    """'breast@64' -> ('breast', 64); 'pneumonia' -> ('pneumonia', default_size); a folder may contain '@'."""
    data, at, size = spec.rpartition("@")
    if not at or os.path.isdir(spec):
        return spec, default_size
    if not size.isdigit():
        raise SystemExit(f"data entry {spec!r}: expected NAME or NAME@SIZE (e.g. breast@64)")
    return data, int(size)


def data_name(data, size):
    """('pneumonia', 28) -> 'pneumonia-28'; ('../shared/data/chest_xray_224/', 64) -> 'chest_xray_224-64'."""
    return f"{os.path.basename(os.path.normpath(data))}-{size}"


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


def command(model, data, size, seed, cfg, run, cli):
    """The subprocess that makes runs/.../results.json for one model x dataset x seed."""
    py = [sys.executable, "-u"]
    common_args = ["--data", data, "--size", str(size), "--arch", cfg["arch"], "--seed", str(seed),
                   "--finetune-epochs", str(cfg["finetune_epochs"]), "--batch-size", str(cfg["batch_size"])]
    if cfg["subset"]:
        common_args += ["--train-subset", str(cfg["subset"])]
    if cli.data_dir:
        common_args += ["--data-dir", cli.data_dir]
    if model in METHODS:
        cmd = py + [f"{model}.py", *common_args, "--epochs", str(cfg["epochs"]), "--eval-every", str(cfg["eval_every"]),
                    "--warmup-epochs", str(cfg["warmup_epochs"]), "--out", run, *cfg.get("extra", [])]
        cmd = with_flags(cmd, cfg.get("method_flags", {}).get(model, []))  # this data entry's, set in main()
        return cmd + ["--resume"]  # continues an interrupted run of this config; starts one when there is none
    cmd = py + ["evaluate.py", "--init", model, *common_args, "--out", os.path.join(run, "results.json")]
    if model == "supervised":
        cmd += ["--epochs", str(cfg["epochs"])]
    if model == "imagenet":
        cmd += ["--imagenet-size", str(cfg["imagenet_size"])] + (["--weights", cli.weights] if cli.weights else [])
    return cmd


def identity(model, data, size, seed, cfg, cli):
    """The run's configuration as one string, its command minus the interpreter and what differs between machines
    (where it writes, where the data and the ImageNet weights lie), and that string's 8-hex sha1. A finished run,
    in a local run folder or committed as results/runs/*.json, is reused only by the very same configuration."""
    here = argparse.Namespace(**{**vars(cli), "data_dir": "", "weights": None})
    config = " ".join(a for a in command(model, data, size, seed, cfg, "", here)[2:] if a != "--resume")
    return config, hashlib.sha1(config.encode()).hexdigest()[:8]


def json_path(cli, model, name, seed):
    """Where a run's record is committed: results/runs/<preset>-<model>-<data>-s<seed>.json."""
    return os.path.join(cli.out, "runs", f"{cli.preset}-{model}-{name}-s{seed}.json")


def committed(path, config_hash):
    """The record committed at `path` when it is of this configuration (else None: absent, unreadable, or another
    configuration, e.g. the preset's epochs changed since)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("config_hash") == config_hash else None


# A committed record, results/runs/<preset>-<model>-<data>-s<seed>.json: its keys, their types, and what each means.
# check_records validates every record against this (and against its own file name and config) before anything is
# run or written, so a bad record stops the study with one line naming the file and the field.
RECORD = {
    "model": (str, "a method (METHODS) or a baseline (BASELINES)"),
    "data": (str, "<data>-<size>, e.g. pneumonia-28 (data_name)"),
    "seed": (int, "the run's --seed"),
    "preset": (str, "the preset it was planned by"),
    "train_subset": (int, "the --train-subset it ran with (0: the whole train split)"),
    "n_train": ((int, type(None)), "train images (None when planned by --table-only without data)"),
    "epochs": (int, "the preset's epochs for this data entry"),
    "batch_size": (int, "images per step"),
    "finetune_epochs": (int, "LP-FT epochs"),
    "config": (str, "the run's command minus interpreter, paths and --resume (identity)"),
    "config_hash": (str, "the first 8 hex digits of sha1(config): the run folder's suffix"),
    "estimate_min": ((int, float), "the preset's estimated minutes for the run"),
    "part": (str, "I/N: the part it was planned in"),
    "status": (str, "ok, or failed (with reason)"),
    "wall_s": ((int, float), "seconds the run took"),
    "ran_in_part": (str, "I/N: the part it ran in"),
    "date": (str, "ISO date and time it finished"),
    "machine": (str, "CPU, threads, GPU, torch version"),
}
RECORD_OK = {"results": (dict, "the run's results.json: protocol -> metrics"), "command": (str, "what ran"),
             "curves": (dict, "per-epoch loss, z_std and online val kNN (curves())")}
RECORD_FAILED = {"reason": (str, "the run's own last message (failure_reason)")}


def check_record(path, rec):
    """Every problem of one committed record, each as 'path: field: what is wrong' (empty: the record is sound).
    Types and ranges per RECORD; the file name, model, data, seed, preset and config agree with each other; the
    hash is recomputed from the config; every AUC is a finite number in [0, 1]."""
    if not isinstance(rec, dict):
        return [f"{path}: expected a JSON object (a run record), found {type(rec).__name__}"]
    status = rec.get("status")
    if status not in ("ok", "failed"):
        return [f"{path}: status: expected 'ok' or 'failed', found {status!r}"]
    keys = {**RECORD, **(RECORD_OK if status == "ok" else RECORD_FAILED)}
    bad = [f"{path}: {k}: missing (expected {doc})" if k not in rec else
           f"{path}: {k}: expected {doc}, found {type(rec[k]).__name__} {rec[k]!r:.40}"
           for k, (typ, doc) in keys.items() if k not in rec or not isinstance(rec[k], typ) or
           (typ is int and isinstance(rec[k], bool))]
    if bad:
        return bad
    name = f"{rec['preset']}-{rec['model']}-{rec['data']}-s{rec['seed']}.json"
    if os.path.basename(path) != name:
        bad.append(f"{path}: file name: its preset, model, data and seed say {name}")
    if rec["model"] not in METHODS + BASELINES:
        bad.append(f"{path}: model: expected one of {', '.join(METHODS + BASELINES)}, found {rec['model']!r}")
    if hashlib.sha1(rec["config"].encode()).hexdigest()[:8] != rec["config_hash"]:
        bad.append(f"{path}: config_hash: {rec['config_hash']} is not the hash of its config (edited?)")
    words = rec["config"].split()
    flag = lambda f: words[words.index(f) + 1] if f in words[:-1] else None
    script = f"{rec['model']}.py" if rec["model"] in METHODS else "evaluate.py"
    agree = {"script": (words[0] if words else None, script), "--seed": (flag("--seed"), str(rec["seed"])),
             "--data/--size": (flag("--data") and data_name(flag("--data"), flag("--size")), rec["data"]),
             "--batch-size": (flag("--batch-size"), str(rec["batch_size"])),
             "--finetune-epochs": (flag("--finetune-epochs"), str(rec["finetune_epochs"]))}
    if rec["model"] in BASELINES:
        agree["--init"] = (flag("--init"), rec["model"])
    if rec["model"] in METHODS + ["supervised"]:
        agree["--epochs"] = (flag("--epochs"), str(rec["epochs"]))
    bad += [f"{path}: config: {k} {have} disagrees with the record's {want}" for k, (have, want) in agree.items()
            if have != want]
    if status == "ok":
        for proto, m in rec["results"].items():
            if isinstance(m, dict) and "auc" in m:
                aucs = [m["auc"], *m.get("auc_ci95", [])]
                if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in aucs):
                    bad.append(f"{path}: results.{proto}.auc: expected finite numbers in [0, 1], found {aucs}")
        bad += [f"{path}: results.{p}: missing (every finished run has it)" for p in ("knn", "linear")
                if not isinstance(rec["results"].get(p), dict)]
    elif not rec["reason"].strip():
        bad.append(f"{path}: reason: empty (a failed run says why)")
    return bad


def check_records(cli):
    """Validate every committed record of this preset before anything runs or is written: one line per problem,
    then stop (exit 2). The study's answer lives in these files: a bad one must never silently rewrite it."""
    bad = []
    for path in sorted(glob.glob(os.path.join(cli.out, "runs", f"{cli.preset}-*.json"))):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            bad.append(f"{path}: not readable JSON ({type(e).__name__}: {e})")
            continue
        bad += check_record(path, rec)
    if bad:
        raise SystemExit("reproduce: bad committed run record(s); nothing was run or written:\n  " + "\n  ".join(bad)
                         + "\nMend or delete them (git checkout restores a committed one).")


def run_one(model, data, size, seed, cfg, cli, run_it=True):
    """Run (or skip) one model x dataset x seed. Returns its record: results, curves, wall time, or the failure.
    A run whose record is committed (results/runs/*.json, same configuration) is never rerun: the record is
    returned as it is, so parts run on other machines make one study. run_it=False (a run of another --part, or
    --table-only) only reads what a committed record or a finished local run left; else the run is pending."""
    name = data_name(data, size)
    key = f"{model}-{name}-s{seed}"
    config, config_hash = identity(model, data, size, seed, cfg, cli)
    rec = {"model": model, "data": name, "seed": seed, "preset": cli.preset, "train_subset": cfg["subset"],
           "n_train": cfg["n_train"], "epochs": cfg["epochs"], "batch_size": cfg["batch_size"],
           "finetune_epochs": cfg["finetune_epochs"], "config": config,
           "config_hash": config_hash, "estimate_min": cfg["estimate_min"], "part": cfg["part"]}
    old = committed(json_path(cli, model, name, seed), config_hash)
    if old is None and os.path.exists(json_path(cli, model, name, seed)):  # check_records found it sound
        print(f"[old ] {key}: {json_path(cli, model, name, seed)} is of another configuration; not used "
              f"(this run: {config_hash})", flush=True)
    if old is not None and (old["status"] == "ok" or (old["status"] == "failed" and not run_it)):
        print(f"[skip] {key}: committed in {json_path(cli, model, name, seed)} (same configuration)", flush=True)
        return {**old, "estimate_min": rec["estimate_min"], "part": rec["part"], "committed": True}
    # the folder name carries the configuration's hash, so any other setting runs in a folder of its own
    run = os.path.join(cli.runs, f"{key}-{config_hash}")
    cmd = command(model, data, size, seed, cfg, run, cli)
    done, info = os.path.join(run, "results.json"), os.path.join(run, "run.json")
    if os.path.exists(done):
        print(f"[skip] {key}: {done} exists (same configuration)", flush=True)
        rec["skipped"] = True
    elif not run_it or STOP.is_set():
        return {**rec, "status": "pending"}
    else:
        os.makedirs(run, exist_ok=True)
        print(f"[run ] {key}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(os.path.join(run, "log.txt"), "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            RUNNING[proc] = key
            rc = proc.wait()
            del RUNNING[proc]
        wall = time.time() - t0
        if STOP.is_set():
            print(f"[stop] {key}: interrupted; rerun the same command to resume it", flush=True)
            return {**rec, "status": "pending"}
        if rc != 0 or not os.path.exists(done):
            with open(os.path.join(run, "log.txt"), errors="replace") as f:
                reason = failure_reason(f.read(), rc)
            print(f"[fail] {key} after {wall:.0f} s: {reason}", flush=True)
            return {**rec, "status": "failed", "reason": reason, "wall_s": wall, "ran_in_part": cli.part,
                    "date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": machine()}
        runs.write_json(info, {"wall_s": wall, "command": " ".join(cmd[2:]), "ran_in_part": cli.part,
                               "date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": machine()})
        print(f"[done] {key} in {wall / 60:.1f} min", flush=True)
    with open(done) as f:
        rec["results"] = json.load(f)
    if os.path.exists(info):
        with open(info) as f:
            rec.update(json.load(f))
    rec["curves"] = curves(os.path.join(run, "metrics.jsonl"))
    return {**rec, "status": "ok"}


def die_with_parent():
    """In the child, before it runs: ask Linux to send it SIGTERM when this thread of reproduce.py ends, even by
    SIGKILL (prctl PR_SET_PDEATHSIG), so no orphan keeps training; the child then stops as on Ctrl-C, keeping its
    last checkpoint. Elsewhere (no prctl): nothing."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


TQDM_FRAME = re.compile(r"\S+:\s+\d+%\|[^\]]*\]")  # "vicreg:   5%|▌   | 9/180 [02:34<48:55, ...]": a progress frame


def failure_reason(log, rc):
    """The last thing a failed run's log says that is not a progress-bar frame: the method's own message (e.g.
    "vicreg: loss is nan at ...; Try a lower --lr."), which tqdm's frames, written around it with \\r and no newline,
    would otherwise hide."""
    lines = [TQDM_FRAME.sub("", ln).strip() for ln in re.split(r"[\r\n]", log)]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else f"exit code {rc}"


RUNNING = {}  # Popen -> run key: the runs in flight, for stop()
STOP = threading.Event()  # set by a signal: start nothing new


def stop(signum, frame):
    """SIGTERM or Ctrl-C: pass SIGTERM to every running child (it saves nothing new and exits, see runs.launch),
    start nothing new, and let the main thread unwind with KeyboardInterrupt."""
    STOP.set()
    for proc in list(RUNNING):
        proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def curves(path):
    """metrics.jsonl -> per-epoch means of the train loss and of z_std (the projection's spread, see training()),
    and the online val kNN AUC (all empty for the baselines)."""
    loss, z_std, knn = {}, {}, {}
    if os.path.exists(path):
        with open(path) as f:
            for row in map(json.loads, f):
                if "train/loss" in row:
                    loss.setdefault(row["epoch"] + 1, []).append(row["train/loss"])
                if "train/z_std" in row:
                    z_std.setdefault(row["epoch"] + 1, []).append(row["train/z_std"])
                if "val/knn_auc" in row:
                    knn[row["epoch"] + 1] = row["val/knn_auc"]
    mean = lambda v: sum(v) / len(v) if v else None
    return {"epoch": sorted(loss), "loss": [mean(loss[e]) for e in sorted(loss)],
            "z_std": [mean(z_std.get(e)) for e in sorted(loss)],
            "knn_epoch": sorted(knn), "knn_auc": [knn[e] for e in sorted(knn)]}


# ------------------------------------------------------------------------------------------------ table
def mean_sd(values):
    """(mean, sample std) of a list of numbers; std None for one value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None


def mean_std(values):
    """'0.960' for one value, '0.960 ± 0.004' (sample std) for several; '–' for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    m, sd = mean_sd(values)
    return f"{m:.3f}" if sd is None else f"{m:.3f} ± {sd:.3f}"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} CPU threads, {gpu}, torch {torch.__version__}"


def auc_cell(rs):
    """Test AUC of one model and protocol over seeds: mean ± std, or for a single seed the value and its 95%
    bootstrap interval over the test set (evaluate.bootstrap_auc)."""
    if len(rs) == 1 and "auc_ci95" in rs[0]:
        lo, hi = rs[0]["auc_ci95"]
        return f"{rs[0]['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    return mean_std([x["auc"] for x in rs])


def paired_delta(ok, d, model, proto):
    """Test AUC of `model` minus the untrained backbone's on the same seeds: '+0.012 ± 0.004 (3 seeds)'."""
    base = {r["seed"]: r["results"][proto]["auc"] for r in ok
            if r["model"] == "random" and r["data"] == d and proto in r["results"]}
    diffs = [r["results"][proto]["auc"] - base[r["seed"]] for r in ok
             if r["model"] == model and r["data"] == d and r["seed"] in base and proto in r["results"]]
    if not diffs:
        return "–"
    m, sd = mean_sd(diffs)
    return f"{m:+.3f} (1 seed)" if sd is None else f"{m:+.3f} ± {sd:.3f} ({len(diffs)} seeds)"


def chosen(rs, proto):
    """What the protocol chose on the val split: kNN's k, the fine-tune's best epoch (per seed)."""
    if proto == "knn" and all("k" in x for x in rs):
        return "k = " + ", ".join(str(x["k"]) for x in rs)
    if proto in ("finetune", "supervised") and all("epoch" in x for x in rs):
        return "epoch " + ", ".join(f"{x['epoch']}/{x['epochs']}" for x in rs)
    if proto in FRACTIONS and all("wd" in x for x in rs):  # the probe's L2 and, below 100%, how few labels it had
        return "L2 " + ", ".join(f"{x['wd']:g}" for x in rs) + "".join(f"; {n} labels" for n in n_labels(rs, proto))
    return ""


def n_labels(rs, proto):
    """The train label counts a label fraction below 100% had in these protocol results (sorted, distinct)."""
    return sorted({x["n_labels"] for x in rs if "n_labels" in x}) if proto in FRACTIONS and proto != "linear" else []


def header(ok, d, proto, name):
    """A protocol's column name; a label fraction also says how many train labels that is on dataset d (1% of
    BreastMNIST's 546 is 5 images, one of them malignant: a probe from one example per class, not a trend)."""
    n = n_labels([r["results"][proto] for r in ok if r["data"] == d and proto in r["results"]], proto)
    return f"{name} ({'/'.join(map(str, n))} labels)" if n else name


def wall_min(rs):
    """The runs' own wall times summed, in minutes (a run not yet run counts 0)."""
    return sum(r.get("wall_s") or 0 for r in rs) / 60


def proj_dim(r):
    """D, the width of the projection z of a run (its --proj-dim, else the method file's default)."""
    words = r["config"].split()
    if "--proj-dim" in words:
        return int(words[words.index("--proj-dim") + 1])
    return importlib.import_module(r["model"]).Args.proj_dim


def training(ok, d):
    """How each SSL run trained, from its curves: the train loss, the online val kNN AUC and z_std from first to
    last epoch. z_std is the per-dimension std of the L2-normalised projection z, averaged over its D dimensions:
    0 when every image maps to one point (collapse), 1/sqrt(D) when z is spread evenly over the sphere."""
    lines = []
    for r in sorted((r for r in ok if r["data"] == d and r["model"] in METHODS and r.get("curves", {}).get("loss")),
                    key=lambda r: (METHODS.index(r["model"]), r["seed"])):
        c = r["curves"]
        knn = list(zip(c["knn_epoch"], c["knn_auc"]))
        best = max(knn, key=lambda t: t[1]) if knn else None
        knn_cell = (f"{knn[0][1]:.3f} (ep {knn[0][0]}) → best {best[1]:.3f} (ep {best[0]}) → {knn[-1][1]:.3f} "
                    f"(ep {knn[-1][0]}); last − best {knn[-1][1] - best[1]:+.3f}") if knn else "–"
        z = [v for v in c.get("z_std", []) if v is not None]
        z_cell = f"{z[0]:.4f} → {z[-1]:.4f} (1/√D = {proj_dim(r) ** -0.5:.4f})" if z else "not recorded"
        low, low_epoch = min(zip(c["loss"], c["epoch"]))  # the lowest epoch-mean loss and its (first) epoch
        lines.append(f"| {NAMES[r['model']]} | {r['seed']} | {c['loss'][0]:.3f} → {c['loss'][-1]:.3f} "
                     f"(min {low:.3f}, ep {low_epoch}) | {knn_cell} | {z_cell} |")
    if not lines:
        return []
    return ["", "Training, per run (epoch means; val kNN AUC online, every eval_every epochs; z_std: the per-dimension "
            "std of the L2-normalised projection z, 0 = collapsed to one point, 1/√D = spread evenly; see curves.png):",
            "", "| model | seed | train loss, epoch 1 → last | val kNN AUC, first → best → last | z_std, epoch 1 → "
            "last |", "|---|---:|---|---|---|"] + lines


def mean_auc(ok, d, model, proto):
    vals = [r["results"][proto]["auc"] for r in ok if r["model"] == model and r["data"] == d and proto in r["results"]]
    return sum(vals) / len(vals) if vals else None


def summary(ok, d):
    """The study's question for one dataset, in three numbers."""
    ssl = {m: mean_auc(ok, d, m, "linear") for m in METHODS}
    ssl = {m: v for m, v in ssl.items() if v is not None}
    if not ssl:
        return []
    best = max(ssl, key=ssl.get)
    rnd = [r["results"]["linear"]["auc"] for r in ok if r["model"] == "random" and r["data"] == d]
    lines = [f"- Best SSL linear-probe AUC: {NAMES[best]} {ssl[best]:.3f}"]
    if rnd:
        lines[0] += f"; untrained backbone {mean_std(rnd)}" + (f" over {len(rnd)} seeds (the noise floor)"
                                                               if len(rnd) > 1 else "")
        lines.append("- Every SSL method minus the untrained backbone of the same seed: " + ", ".join(
            f"{NAMES[m]} {paired_delta(ok, d, m, 'linear')}" for m in ssl))
    ten = mean_auc(ok, d, best, "linear_10pct")
    if ten is not None:
        lines.append(f"- {NAMES[best]} with 10% of the labels: {ten:.3f} ({ten - ssl[best]:+.3f} from 100%)")
    return lines


README_BEGIN, README_END = "<!-- results: begin (reproduce.py writes this block) -->", "<!-- results: end -->"


def readme_summary(records, datasets, cfg, cli):
    """The README's results block, from the same records as RESULTS.md: per dataset, test AUC of each model under
    every frozen-feature protocol, and the linear-probe difference to the untrained backbone of the same seed."""
    ok = [r for r in records if r["status"] == "ok"]
    done = len([r for r in records if r["status"] != "pending"])
    dates = sorted(r["date"][:10] for r in ok if "date" in r)
    lines = [f"Preset `{cli.preset}`, built by `python reproduce.py {' '.join(cli.argv)}` from {done} of "
             f"{len(records)} runs ({len(ok)} finished{f', {dates[0]} to {dates[-1]}' if dates else ''}; the runs' "
             "machines, parts and wall times in [results/RESULTS.md](results/RESULTS.md)). Test AUC; one seed: the "
             "linear probe's 95% bootstrap interval; the untrained backbone: mean ± std over its seeds.", ""]
    protos = [("knn", "kNN"), ("linear_1pct", "linear 1%"), ("linear_10pct", "linear 10%"), ("linear", "linear 100%")]
    for d in datasets:
        rows = []
        for model in ["random", "supervised"] + METHODS:
            rs = [r for r in ok if r["data"] == d and r["model"] == model]
            if not rs:
                continue
            cells = [auc_cell([r["results"][p] for r in rs]) if p == "linear" else mean_std(
                [r["results"][p]["auc"] for r in rs]) for p, _ in protos]
            delta = "–" if model == "random" else paired_delta(ok, d, model, "linear").replace(" (1 seed)", "")
            rows.append(f"| {NAMES[model]} | " + " | ".join(cells) + f" | {delta} |")
        if rows:
            lines += [f"| {d} | " + " | ".join(header(ok, d, p, n) for p, n in protos) +
                      " | minus untrained, linear 100% |",
                      "|---|" + "---:|" * (len(protos) + 1)] + rows + [""]
        failed = [f"{NAMES[r['model']]} (seed {r['seed']}: {r['reason']})" for r in records
                  if r["data"] == d and r["status"] == "failed"]
        if failed:
            lines += [f"Failed on {d}, no results: " + "; ".join(failed) + ".", ""]
        pending = {}  # model -> seeds not yet run
        for r in records:
            if r["data"] == d and r["status"] == "pending":
                pending.setdefault(r["model"], []).append(str(r["seed"]))
        if pending:
            lines += [f"Not yet run on {d}: " + ", ".join(
                NAMES[m] + (f" (seed {', '.join(seeds)})" if any(r["data"] == d and r["model"] == m for r in ok)
                            else "") for m, seeds in pending.items()) + ".", ""]
    return lines


def write_readme(path, lines):
    """Replace the block between README_BEGIN and README_END in `path` (a README that has the two markers)."""
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"--readme {path}: expected the markers {README_BEGIN!r} and {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    runs.write_text(path, head + README_BEGIN + "\n" + "\n".join(lines) + "\n" + README_END + tail)


def write_table(records, datasets, cfg, cli, wall):
    ok = [r for r in records if r["status"] == "ok"]
    lines = [f"# medssl results: preset `{cli.preset}`", "",
             f"**{cfg['note']}**" + (f" This invocation overrides the preset: {', '.join(cli.overrides)}."
                                     if cli.overrides else ""), "",
             f"- Table built by `python reproduce.py {' '.join(cli.argv)}` (`make reproduce PRESET={cli.preset}` "
             f"runs `python reproduce.py --preset {cli.preset}`) on {datetime.date.today().isoformat()}, from "
             f"{sum(bool(r.get('committed')) for r in records)} committed run records (results/runs/*.json) and "
             f"{sum(r['status'] != 'pending' and not r.get('committed') for r in records)} runs of this invocation "
             f"or its run folders; each run's date, machine and part are in the Parts and Runs tables below",
             f"- Wall time of this invocation: {wall / 60:.1f} min with {cli.jobs} run(s) at once; sum of the runs' "
             f"own wall times, when they ran: {wall_min(records):.1f} min",
             f"- Backbone {cfg['arch']}, seeds {cfg['seeds']}"
             + (f" (untrained backbone: seeds {cfg['random_seeds']})" if cfg["random_seeds"] != cfg["seeds"] else "")
             + "; epochs, batch, fine-tune epochs and train images per dataset under its heading. Metrics on each "
             "dataset's test split: mean ± "
             f"sample std over seeds, or for one seed the AUC with its 95% bootstrap interval over the test set.",
             "- Protocols: kNN (cosine, T = 0.1, k chosen on the val split from "
             f"{', '.join(map(str, evaluate.KS))} by balanced accuracy) and linear probe (L2 chosen on val AUC) on "
             "frozen features, the probe at 1%, 10% and 100% of the train labels; fine-tune end to end from the "
             "probe (LP-FT), reported at the epoch with the best val AUC (0 = the probe itself); for the supervised "
             "baseline also its own head (its backbone saw every train label, so its frozen-feature rows are not "
             "label-efficient).",
             "- " + ANCHORS]
    for m, flags in cfg.get("method_flags", {}).items():  # each run's full command is in the Runs table
        lines.append(f"- {NAMES[m]}'s own settings, chosen on the val split (results/NOTES.md): "
                     + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in (flags.items() if isinstance(flags, dict)
                                                                       else [("every dataset", flags)])))
    reasons = {}  # the same failure (ImageNet weights offline) is listed once, with every run it stopped
    for r in records:
        if r["status"] == "failed":
            reasons.setdefault(r["reason"], []).append(f"{r['model']}-{r['data']}-s{r['seed']}")
    commands = {r["reason"]: r["config"] for r in records if r["status"] == "failed" and r["model"] == "imagenet"}
    lines += [f"- Failed, no results: {', '.join(runs)}. {reason}" + (f" Where the weights exist: `python {commands[reason]} "
              "--weights FILE` (or the torch hub cache)." if reason in commands else "")
              for reason, runs in reasons.items()]
    pending = [f"{r['model']}-{r['data']}-s{r['seed']}" for r in records if r["status"] == "pending"]
    if pending:
        lines.append(f"- Not yet run ({len(pending)} of {len(records)}; another --part, or in progress): "
                     f"{', '.join(pending)}.")
    lines.append("")
    reading = os.path.join(cli.out, f"reading-{cli.preset}.md")  # hand-written: what the committed study shows
    if os.path.exists(reading):  # (--ablate writes its own table, without it)
        with open(reading, encoding="utf-8") as f:
            lines += [f"## Reading (hand-written, {os.path.basename(reading)}; the tables below are generated)", "",
                      f.read().strip(), ""]
    for d in datasets:
        r0 = next(r for r in records if r["data"] == d)
        n_train = next((r["n_train"] for r in records if r["data"] == d and r.get("n_train")), "")
        used = f"a seeded {r0['train_subset']}-image subset of" if r0["train_subset"] else "all"
        lines += [f"## {d}", "", f"Train images: {used} {n_train}".rstrip() + f"; {r0['epochs']} epochs at batch "
                  f"{r0['batch_size']}; fine-tune {r0['finetune_epochs']} epochs.", ""] + summary(ok, d) + [
                  "", "| protocol | model | ACC | AUC | F1 (weighted) | chosen on val |", "|---|---|---:|---:|---:|---|"]
        for proto, pname in PROTOCOLS:
            for model in BASELINES + METHODS:
                rs = [r["results"][proto] for r in ok if r["data"] == d and r["model"] == model
                      and proto in r["results"]]
                if rs:
                    cells = [mean_std([x["acc"] for x in rs]), auc_cell(rs), mean_std([x["f1_weighted"] for x in rs])]
                    lines.append(f"| {pname} | {NAMES[model]} | " + " | ".join(cells) + f" | {chosen(rs, proto)} |")
        protos = [(proto, n) for proto, n in PROTOCOLS if proto != "supervised"]
        lines += ["", "Test AUC minus the untrained backbone's, same seeds (paired):", "",
                  "| model | " + " | ".join(n for _, n in protos) + " |", "|---|" + "---:|" * len(protos)]
        for model in METHODS + ["supervised", "imagenet"]:
            if any(r["model"] == model and r["data"] == d for r in ok):
                lines.append(f"| {NAMES[model]} | " + " | ".join(paired_delta(ok, d, model, proto)
                                                               for proto, _ in protos) + " |")
        lines += training(ok, d) + [""]
    lines += ["## Figures", "", "![loss and online kNN](curves.png)", "",
              "![label efficiency](label_efficiency.png)", "", "![embedding](embedding.png)", "",
              "## Parts", "", "Each part (`--part I/N`) ran in one invocation; its runs were assigned by the "
              "preset's estimated minutes (`assign_parts`).", "",
              "| part | runs | done | estimated (min) | measured: sum of run wall times (min) | ran on |",
              "|---|---:|---:|---:|---:|---|"]
    part_of = lambda r: r.get("ran_in_part", r["part"])  # where it ran; a run not yet run: its planned part
    for p in sorted({part_of(r) for r in records}, key=lambda p: tuple(map(int, p.split("/")))[::-1]):
        rs = [r for r in records if part_of(r) == p]
        done = [r for r in rs if r["status"] != "pending"]
        when = sorted({f"{r['date'][:10]}, {r['machine'].split(',')[0]}" for r in done if r.get("date")})
        lines.append(f"| {p} | {len(rs)} | {len(done)} | {sum(r['estimate_min'] for r in rs):.0f} | "
                     f"{wall_min(done):.1f} | {'; '.join(when) or '–'} |")
    total = wall_min(records)  # the whole study's machine time so far (a pending run has no wall_s)
    lines.append(f"| all | {len(records)} | {sum(r['status'] != 'pending' for r in records)} | "
                 f"{sum(r['estimate_min'] for r in records):.0f} | {total:.1f} ({total / 60:.1f} h) | |")
    lines += ["", "## Runs", "", "| run | part | status | wall (min) | date |", "|---|---|---|---:|---|"]
    for r in records:
        status = {"ok": "ok", "pending": "not yet run"}.get(r["status"], "failed (see above)")
        wall_s = r.get("wall_s")
        lines.append(f"| {r['model']}-{r['data']}-s{r['seed']} | {part_of(r)} | {status} | "
                     f"{'–' if wall_s is None else f'{wall_s / 60:.1f}'} | {r.get('date', '–')} |")
    path = os.path.join(cli.out, "RESULTS.md")
    runs.write_text(path, "\n".join(lines) + "\n")
    return path


def write_ablation(records, names, cli):
    """results/ABLATION.md: the augmentation variants' val-split scores (never test), with their commands."""
    lines = ["# Augmentation for small images: ablation on the val split", "",
             f"SimCLR, preset `{cli.preset}` settings (`python reproduce.py {' '.join(cli.argv)}`); date "
             f"{datetime.date.today().isoformat()}; machine: {machine()}. Scores on the **val** split only (kNN with "
             "k chosen on val; linear probe with L2 chosen on val, so slightly optimistic, equally for every row); "
             "the test split is never looked at. One seed: differences below ~0.01 AUC are noise at this size.", "",
             "| variant | flags | val kNN AUC | val linear AUC | run |", "|---|---|---:|---:|---|"]
    for name, r in zip(names, records):
        flags = " ".join(ABLATION[name])
        if r["status"] != "ok":
            lines.append(f"| {name} | `{flags}` | – | – | {r['status']} |")
            continue
        res = r["results"]
        lines.append(f"| {name} | `{flags}` | {res['knn']['val_auc']:.3f} | {res['linear']['val_auc']:.3f} | "
                     f"{r.get('wall_s', 0) / 60:.1f} min |")
    ok = [(name, r["results"]) for name, r in zip(names, records) if r["status"] == "ok"]
    if ok:
        best = lambda key: max(ok, key=lambda t: t[1][key]["val_auc"])[0]
        lines += ["", f"Best val kNN AUC: {best('knn')}; best val linear AUC: {best('linear')}. In use for images of "
                  f"at most 64 px (`common.AUGMENT['small']`): {common.AUGMENT['small']}."]
    path = os.path.join(cli.out, "ABLATION.md")
    runs.write_text(path, "\n".join(lines) + "\n")
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
            if r is None:  # say why the panel is empty: the run failed (its message is in RESULTS.md) or is to come
                failed = any(x["status"] == "failed" and (x["model"], x["data"]) == (m, d) for x in records)
                ax.text(0.5, 0.5, "failed (RESULTS.md)" if failed else "not run yet", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="gray")
                ax.set_axis_off()
                continue
            c = r["curves"]
            ax.plot(c["epoch"], c["loss"], color=colors[m])
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel("train loss", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(c["knn_epoch"], c["knn_auc"], "k--o", ms=3)
            ax2.set_ylabel("val kNN AUC (dashed)", fontsize=8)
            for axis in (ax, ax2):
                axis.tick_params(labelsize=7)
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
        if ax.get_legend_handles_labels()[0]:  # a dataset with no finished run yet has nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "label_efficiency.png"), dpi=80)
    plt.close(fig)

    # 3. 2-D embedding (PCA) of the test features, coloured by class, lowest seed of each model
    models = [m for m in BASELINES + METHODS if any((m, d) in first for d in datasets)]
    if not models:  # nothing finished yet
        return
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
                flag = d.rsplit("-", 1)[0]  # 'breast-64' -> 'breast'
                name = CLASSES[flag][c] if flag in CLASSES else f"class {c}"
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
    ap.add_argument("--data", nargs="*", help="MedMNIST flags, NAME@SIZE for another size (default: the preset's)")
    ap.add_argument("--folders", nargs="*", default=[], help="folder datasets in the paper's layout")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES)
    ap.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs (every dataset)")
    ap.add_argument("--finetune-epochs", type=int, help="override the preset's fine-tune epochs")
    ap.add_argument("--train-subset", type=int, help="override the preset's train subset (0: whole train split)")
    ap.add_argument("--batch-size", type=int, help="override the preset's batch size (every dataset)")
    ap.add_argument("--jobs", type=int, help="runs at once (default: the preset's; on one GPU, small runs share it)")
    ap.add_argument("--part", default=None, help="I/N: run only the I-th of N shares of the runs, balanced by the "
                    "preset's measured minutes per run (equal minutes: every N-th run); I alone: N from the preset. "
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
        assert 1 <= part <= n_parts
    except (ValueError, AssertionError):
        raise SystemExit(f"--part {cli.part}: expected I/N with 1 <= I <= N, e.g. 1/2") from None
    cli.part = f"{part}/{n_parts}"
    for key in ("jobs", "epochs", "finetune_epochs", "train_subset", "batch_size"):
        if getattr(cli, key) is not None and getattr(cli, key) < (1 if key in ("jobs", "epochs", "batch_size") else 0):
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(cli, key)}: expected a positive number")
    overridden = ("seeds", "epochs", "finetune_epochs", "train_subset", "batch_size", "jobs")
    cli.overrides = [f"{k} {getattr(cli, k)}" for k in overridden if getattr(cli, k) is not None]
    cli.overrides += [f"{k} {getattr(cli, k)}" for k in ("methods", "baselines") if getattr(cli, k) != ap.get_default(k)]
    cli.overrides += [f"data {' '.join(specs)}"] if specs != cfg["data"] else []
    cfg.update({k: getattr(cli, k) for k in overridden if getattr(cli, k) is not None})
    cfg["random_seeds"] = cfg["seeds"] if cli.seeds else cfg.get("random_seeds", cfg["seeds"])
    cli.jobs = cfg["jobs"]
    if cli.readme is None:  # the committed README summarizes the committed study only, never a tweaked one
        cli.readme = "README.md" if cli.out == "results" and not cli.overrides and not cli.ablate else ""
    cli.runs = cli.runs or os.path.join("runs", f"{'ablation' if cli.ablate else 'reproduce'}-{cli.preset}")
    os.makedirs(os.path.join(cli.out, "runs"), exist_ok=True)
    check_records(cli)
    t0 = time.time()

    # every model x dataset x seed of the study, each with its dataset's settings, in a fixed order
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
        datasets.append(data_name(data, size))
        if cli.ablate:  # one SimCLR run per variant, each in its own runs folder
            todo += [("simclr", data, size, s, {**run_cfg, "extra": flags},
                      argparse.Namespace(**{**vars(cli), "runs": os.path.join(cli.runs, f"v{i}")}))
                     for i, flags in enumerate(ABLATION.values()) for s in cfg["seeds"][:1]]
        else:
            todo += [(m, data, size, s, run_cfg, cli) for m in order
                     for s in (cfg["random_seeds"] if m == "random" else cfg["seeds"])]
    # parts: each run to one part, balanced by the preset's measured minutes per run; the same assignment on every
    # machine (it depends on the preset alone, not on what has run), so committed parts never move
    estimates = [cfg.get("minutes", {}).get(spec_key(t[1], t[2], cfg["size"]), {}).get(t[0], 1.0) for t in todo]
    shares, load = assign_parts(estimates, n_parts)
    todo = [(*t[:4], {**t[4], "estimate_min": e, "part": f"{p + 1}/{n_parts}"}, t[5])
            for t, e, p in zip(todo, estimates, shares)]
    mine = set() if cli.table_only else {i for i, p in enumerate(shares) if p == part - 1}
    if n_parts > 1 and not cli.table_only:
        print(f"part {cli.part}: {len(mine)} of {len(todo)} runs, estimated {load[part - 1]:.0f} min (parts: "
              f"{', '.join(f'{x:.0f}' for x in load)} min)", flush=True)

    def go(i):
        rec = run_one(*todo[i], run_it=i in mine)
        if rec["status"] != "pending" and not rec.get("committed") and not cli.ablate:
            runs.write_json(json_path(cli, rec["model"], rec["data"], rec["seed"]), rec)
        return rec
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)
    pool = concurrent.futures.ThreadPoolExecutor(cli.jobs)  # threads only wait on their subprocess
    try:
        records = list(pool.map(go, range(len(todo))))
    except KeyboardInterrupt:
        keys = sorted(RUNNING.values())
        pool.shutdown(wait=True, cancel_futures=True)  # the children got SIGTERM; wait until they have exited
        print(f"reproduce: interrupted; stopped {', '.join(keys) or 'no running run'}. Rerun the same command to "
              f"resume: finished runs are reused, interrupted ones continue from their last checkpoint.", flush=True)
        return 130
    pool.shutdown()
    if cli.ablate:
        path = write_ablation(records, list(ABLATION), cli)
    else:
        path = write_table(records, datasets, cfg, cli, time.time() - t0)
        figures(records, datasets, cli.out)
        if cli.readme:
            write_readme(cli.readme, readme_summary(records, datasets, cfg, cli))
    failed = [r for r in records if r["status"] == "failed"]
    print(f"wrote {path} ({(time.time() - t0) / 60:.1f} min; {len(failed)} failed run(s))")
    return 1 if any(r["model"] != "imagenet" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
