"""What a committed run record holds, and when a record (or a finished run) may stand for a run.

A record (results/runs/<preset>-<model>-<data>-s<seed>.json, one per run of reproduce.py) is described field by field
in RECORD and checked by check_records before anything is run or written: a bad one stops the study with one line
naming the file and the field. A record is reused for a run only when it is of the same configuration (its command:
committed) and the same recipe (what the script made of that command, defaults included: resolve, same_recipe), so a
default changed in a method file since reruns it. recipes.py's pilots keep and compare recipes the same way.
"""
import dataclasses
import glob
import hashlib
import importlib
import json
import os

import common

METHODS = ["simclr", "dclw", "byol", "simsiam", "barlow", "vicreg"]  # a record's model: a method file, or
BASELINES = ["random", "supervised", "imagenet"]  # a baseline (evaluate.py --init random / imagenet, supervised.py)


def data_name(data, size):
    """('pneumonia', 28) -> 'pneumonia-28'; ('../shared/data/chest_xray_224/', 64) -> 'chest_xray_224-64'."""
    return f"{os.path.basename(os.path.normpath(data))}-{size}"


# ------------------------------------------------------------------------------------------------ records
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
    "epochs": (int, "the preset's epochs for this data entry (a method's own, where its method_flags set them)"),
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
# Optional: "migrated" (str), why and when a record's config was rewritten to a new script's command that gives the
# same results (the supervised baseline's records, when it moved from evaluate.py to supervised.py); "recipe" (dict),
# what the script made of the config, defaults included (reproduce.recipe; records from 2026-12-05 on).
RECORD_OPTIONAL = {"migrated": (str, "why the config was rewritten"),
                   "recipe": (dict, "the script's resolved arguments and augmentation (reproduce.recipe)")}


def config_flag(config, opt):
    """The value after option opt in a record's config (its command), or None when the command does not give it."""
    words = config.split()
    return words[words.index(opt) + 1] if opt in words[:-1] else None


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
    bad += [f"{path}: {k}: expected {doc}, found {type(rec[k]).__name__} {rec[k]!r:.40}"
            for k, (typ, doc) in RECORD_OPTIONAL.items() if k in rec and not isinstance(rec[k], typ)]
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
    flag = lambda opt: config_flag(rec["config"], opt)
    script = f"{rec['model']}.py" if rec["model"] in METHODS + ["supervised"] else "evaluate.py"
    agree = {"script": (words[0] if words else None, script), "--seed": (flag("--seed"), str(rec["seed"])),
             "--data/--size": (flag("--data") and data_name(flag("--data"), flag("--size")), rec["data"]),
             "--batch-size": (flag("--batch-size"), str(rec["batch_size"])),
             "--finetune-epochs": (flag("--finetune-epochs"), str(rec["finetune_epochs"]))}
    if script == "evaluate.py":
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


def check_records(out, preset):
    """Validate every committed record of this preset before anything runs or is written: one line per problem,
    then stop (exit 2). The study's answer lives in these files: a bad one must never silently rewrite it."""
    bad = []
    for path in sorted(glob.glob(os.path.join(out, "runs", f"{preset}-*.json"))):
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


def committed(path, config_hash):
    """The record committed at `path` when it is of this configuration (else None: absent, unreadable, or another
    configuration, e.g. the preset's epochs changed since)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("config_hash") == config_hash else None


# ------------------------------------------------------------------------------------------------ recipes
MACHINE_ARGS = ("out", "data_dir", "weights", "resume", "overwrite")  # where a run writes and reads: not its recipe


def resolve(cmd):
    """What a script makes of a command ['<script>.py', '--flag', 'value', ...]: every field of its Args, defaults
    included (less MACHINE_ARGS), and for a training script the augmentation they resolve to (common.augmentation of
    its VIEWS), e.g. {'lr': 0.3, ..., 'jitter_strength': [0.4, 0.4, 0.4, 0.1]}. reproduce.recipe(run) and the pilots'
    records keep it: the command alone misses a default changed in a method file since."""
    module = importlib.import_module(cmd[0][:-3])
    args = dataclasses.asdict(common.parse_args(module.Args, [a for a in cmd[1:] if a != "--resume"]))
    out = {k: v for k, v in args.items() if k not in MACHINE_ARGS}
    if hasattr(module, "VIEWS"):
        aug = common.augmentation(args["size"], module.VIEWS, args["min_scale"], args["jitter"], args["blur"])
        out.update(views=[dataclasses.asdict(v) for v in aug["views"]], crop_scale=list(aug["scale"]),
                   jitter_strength=list(aug["strength"]))  # brightness, contrast, saturation, hue
    return out


def recipe_change(old, new):
    """What differs between two recipes, as 'jitter 0.8 -> 0.4, bn joint -> per-view' (first five)."""
    keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    more = ", ..." if len(keys) > 5 else ""
    return ", ".join(f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys[:5]) + more


def same_recipe(old, recipe):
    """None when `old` (a committed record, a run folder's run.json, a pilot's record) ran with `recipe`; else why
    not, in a few words. One without "recipe" predates the recipe check (2026-12-05): what its script made of its
    command then is unknown (a default may have changed since), so it is not taken for this recipe."""
    if "recipe" not in old:
        return "predates the recipe check (no \"recipe\")"
    if old["recipe"] != recipe:
        return f"ran with another recipe ({recipe_change(old['recipe'] or {}, recipe or {})})"
    return None
