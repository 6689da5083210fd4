"""The study's report: the committed run records in; results/RESULTS.md, the README's results block, ABLATION.md
and the figures out. reproduce.py runs the study and ends in one call to write(); recipes.py reuses the names.

A record (results/runs/<preset>-<model>-<data>-s<seed>.json, one per run) is described field by field in
records.RECORD and checked before anything is run or written. Every number in the tables comes from these records:
    python reproduce.py --preset cpu --table-only      # rebuild RESULTS.md, the README block and the figures
"""
import datetime
import math
import os
import re

import torch

import common
import evaluate
import runs
from records import BASELINES, METHODS, config_flag

NAMES = {"random": "random init", "supervised": "supervised (scratch)", "imagenet": "ImageNet transfer",
         "simclr": "SimCLR", "dclw": "DCLW", "byol": "BYOL", "simsiam": "SimSiam", "barlow": "Barlow Twins",
         "vicreg": "VICReg"}
PROTOCOLS = [("knn", "kNN"), ("linear_1pct", "linear 1%"), ("linear_10pct", "linear 10%"), ("linear", "linear 100%"),
             ("finetune", "fine-tune"), ("supervised", "supervised head")]
FRACTIONS = {"linear_1pct": 1, "linear_10pct": 10, "linear": 100}  # protocol -> % of train labels
CLASSES = {"pneumonia": ["normal", "pneumonia"], "breast": ["malignant", "normal/benign"]}  # MedMNIST's label names
# Published reference points for the table, kept here only (MedMNIST v2, Yang et al., Scientific Data 2023).
ANCHORS = ("Anchors (MedMNIST v2, supervised ResNet-18 at 28 px, full data, 100 epochs): PneumoniaMNIST "
           "ACC 0.854 / AUC 0.944, BreastMNIST ACC 0.863 / AUC 0.901. Frozen ImageNet features, the seed paper's "
           "comparison, which needs weights this offline study cannot fetch (MedMNIST+, Doerrich et al. 2024, arXiv "
           "2404.15786: PneumoniaMNIST at 28 px zero-padded to 224 px, the ImageNet networks' own 7x7 stem, a linear "
           "head trained with AdamW): linear-probe AUC 0.877 with a ResNet-18, 0.973 with DINO's ViT-B/16.")


# ------------------------------------------------------------------------------------------------ table
def mean_sd(values):
    """(mean, sample std) of a list of numbers; std None for one value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None


def mean_sd_text(values):
    """'0.960' for one value, '0.960 ± 0.004' (sample std) for several; '–' for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    m, sd = mean_sd(values)
    return f"{m:.3f}" if sd is None else f"{m:.3f} ± {sd:.3f}"


def auc_cell(rs):
    """Test AUC of one model and protocol over seeds: mean ± std, or for a single seed the value and its 95%
    bootstrap interval over the test set (evaluate.bootstrap_auc)."""
    if len(rs) == 1 and "auc_ci95" in rs[0]:
        lo, hi = rs[0]["auc_ci95"]
        return f"{rs[0]['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
    return mean_sd_text([x["auc"] for x in rs])


def paired_diffs(ok, d, model, proto):
    """Test AUC of `model` minus the untrained backbone's, one per seed both have finished."""
    base = {r["seed"]: r["results"][proto]["auc"] for r in ok
            if r["model"] == "random" and r["data"] == d and proto in r["results"]}
    return [r["results"][proto]["auc"] - base[r["seed"]] for r in ok
            if r["model"] == model and r["data"] == d and r["seed"] in base and proto in r["results"]]


def paired_delta(ok, d, model, proto):
    """paired_diffs as text: '+0.012 ± 0.004 (3 seeds)'."""
    diffs = paired_diffs(ok, d, model, proto)
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
    """D, the width of the projection z of a run: what its recipe says (the Args it ran with), else its --proj-dim;
    None for a record from before recipes were kept that does not name it (the method file's default then may not
    be today's: Barlow Twins' and VICReg's went from 2048 to 128)."""
    if "proj_dim" in r.get("recipe", {}):
        return r["recipe"]["proj_dim"]
    words = r["config"].split()
    return int(words[words.index("--proj-dim") + 1]) if "--proj-dim" in words else None


def z_curve(r):
    """A run's z_std per epoch, the epochs that recorded one."""
    return [v for v in r.get("curves", {}).get("z_std", []) if v is not None]


def training(ok, d):
    """How each SSL run trained, from its curves: the train loss, the online val kNN AUC, z_std and LARS's eta_share
    from first to last epoch. z_std is the per-dimension std of the L2-normalised projection z, averaged over its D
    dimensions: 0 when every image maps to one point (collapse), 1/sqrt(D) when z is spread evenly over the sphere.
    eta_share (common.LARS): the share of weight tensors whose step eta set, not the LR (0 for plain SGD; "–" in
    records from before it was logged)."""
    lines = []
    for r in sorted((r for r in ok if r["data"] == d and r["model"] in METHODS and r.get("curves", {}).get("loss")),
                    key=lambda r: (METHODS.index(r["model"]), r["seed"])):
        c = r["curves"]
        knn = list(zip(c["knn_epoch"], c["knn_auc"]))
        best = max(knn, key=lambda t: t[1]) if knn else None
        knn_cell = (f"{knn[0][1]:.3f} (ep {knn[0][0]}) → best {best[1]:.3f} (ep {best[0]}) → {knn[-1][1]:.3f} "
                    f"(ep {knn[-1][0]}); last − best {knn[-1][1] - best[1]:+.3f}") if knn else "–"
        z = z_curve(r)
        D = proj_dim(r)
        z_cell = (f"{z[0]:.4f} → {z[-1]:.4f} " + (f"(1/√D = {D ** -0.5:.4f})" if D else "(D not recorded)")
                  if z else "not recorded")
        eta = [v for v in c.get("eta_share", []) if v is not None]
        low, low_epoch = min(zip(c["loss"], c["epoch"]))  # the lowest epoch-mean loss and its (first) epoch
        lines.append(f"| {NAMES[r['model']]} | {r['seed']} | {c['loss'][0]:.3f} → {c['loss'][-1]:.3f} "
                     f"(min {low:.3f}, ep {low_epoch}) | {knn_cell} | {z_cell} | "
                     + (f"{eta[0]:.2f} → {eta[-1]:.2f} |" if eta else "– |"))
    if not lines:
        return []
    return ["", "Training, per run (epoch means; val kNN AUC online, every eval_every epochs; z_std: the per-dimension "
            "std of the L2-normalised projection z, 0 = collapsed to one point, 1/√D = spread evenly; see curves.png; "
            "η-set: the share of weight tensors whose LARS step η set rather than the LR, 0 for plain SGD, – where "
            "the record predates it):",
            "", "| model | seed | train loss, epoch 1 → last | val kNN AUC, first → best → last | z_std, epoch 1 → "
            "last | η-set, epoch 1 → last |", "|---|---:|---|---|---|---|"] + lines


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
        lines[0] += f"; untrained backbone {mean_sd_text(rnd)}" + (f" over {len(rnd)} seeds (the noise floor)"
                                                               if len(rnd) > 1 else "")
        lines.append("- Every SSL method minus the untrained backbone of the same seed: " + ", ".join(
            f"{NAMES[m]} {paired_delta(ok, d, m, 'linear')}" for m in ssl))
    ten = mean_auc(ok, d, best, "linear_10pct")
    if ten is not None:
        lines.append(f"- {NAMES[best]} with 10% of the labels: {ten:.3f} ({ten - ssl[best]:+.3f} from 100%)")
    return lines


GOALS = ("over_untrained", "best", "best_1pct", "within_10pct", "floor")  # what a preset's targets may ask


def targets(records, d, goal):
    """The preset's targets for dataset d (goal: a dict of GOALS: over_untrained, best, best_1pct, within_10pct, floor
    {model: AUC}; test split, linear probe) against the records, one row each: what was measured and 'met' / 'missed'
    once every run the target needs has finished (a failed run misses it), else 'open (k of n runs)'. Collapse is
    checked per run: z_std must stay above half of its epoch-1 value."""
    mine = [r for r in records if r["data"] == d]
    ok = [r for r in mine if r["status"] == "ok"]
    ssl = [r for r in mine if r["model"] in METHODS]

    def status(needed, holds):
        done = sum(r["status"] != "pending" for r in needed)
        if done < len(needed):
            return f"open ({done} of {len(needed)} runs)"
        return "met" if holds and all(r["status"] == "ok" for r in needed) else "missed"

    rows, means = [], {}
    for m in [m for m in METHODS if any(r["model"] == m for r in mine)]:
        runs_m = [r for r in mine if r["model"] == m]
        seeds = {r["seed"] for r in runs_m}
        diffs = paired_diffs(ok, d, m, "linear")
        needed = runs_m + [r for r in mine if r["model"] == "random" and r["seed"] in seeds]
        means[m] = mean_auc(ok, d, m, "linear")
        if "over_untrained" in goal:
            gain = sum(diffs) / len(diffs) if diffs else None
            gap = f" + {goal['over_untrained']:.2f}" if goal["over_untrained"] else ""
            rows.append((f"{NAMES[m]}: linear 100% ≥ the untrained backbone{gap} (mean over paired seeds)",
                         paired_delta(ok, d, m, "linear"),
                         status(needed, gain is not None and gain >= goal["over_untrained"])))
        if m in goal.get("floor", {}):
            rows.append((f"{NAMES[m]}: linear 100% ≥ {goal['floor'][m]:.3f}", "–" if means[m] is None else
                         f"{means[m]:.3f}", status(runs_m, means[m] is not None and means[m] >= goal["floor"][m])))
    top = max((m for m in means if means[m] is not None), key=means.get, default=None)  # best by linear 100%
    for key, proto, name in (("best", "linear", "linear 100%"), ("best_1pct", "linear_1pct", "linear 1%")):
        if key in goal:
            aucs = {m: mean_auc(ok, d, m, proto) for m in means}
            aucs = {m: v for m, v in aucs.items() if v is not None}
            best = max(aucs, key=aucs.get) if aucs else None
            rows.append((f"best SSL method: {name} ≥ {goal[key]:.3f}", f"{NAMES[best]} {aucs[best]:.3f}" if best
                         else "–", status(ssl, best is not None and aucs[best] >= goal[key])))
    if "within_10pct" in goal:  # the best method (by linear 100%) loses little with a tenth of the labels
        few = mean_auc(ok, d, top, "linear_10pct") if top else None
        gap = None if few is None else means[top] - few
        rows.append((f"best SSL method: linear 10% within {goal['within_10pct']:.2f} of its linear 100%",
                     "–" if gap is None else f"{NAMES[top]} {few:.3f} vs {means[top]:.3f} ({-gap:+.3f})",
                     status(ssl, gap is not None and gap <= goal["within_10pct"])))
    zs = [(min(z) / z[0], r) for r in ok if r["model"] in METHODS for z in [z_curve(r)] if z and z[0] > 0]
    low = min(zs, key=lambda t: t[0]) if zs else None
    failed = [f"{NAMES[r['model']]} s{r['seed']} failed" for r in ssl if r["status"] == "failed"]
    # the ratio rounded down: one under the ½ line never reads as 0.500 beside "missed"
    lowest = ([f"{len(zs)} run{'s' * (len(zs) != 1)} checked, lowest min / epoch 1: {NAMES[low[1]['model']]} "
               f"s{low[1]['seed']} {math.floor(low[0] * 1000) / 1000:.3f}"] if low else [])
    rows.append(("no SSL run collapses or diverges: min z_std ≥ ½ × epoch 1's, no failed run",
                 "; ".join(lowest + failed) or "–", status(ssl, not failed and (low is None or low[0] >= 0.5))))
    return ["", "Targets (the preset's; test split; a target is open until every run it needs has finished):", "",
            "| target | measured | status |", "|---|---|---|"] + [f"| {t} | {v} | {s} |" for t, v, s in rows]


README_BEGIN, README_END = "<!-- results: begin (reproduce.py writes this block) -->", "<!-- results: end -->"


def short_reason(reason):
    """A failed run's message cut to its first clause for the README ("vicreg: loss is nan at epoch 1 step 10"; the
    offline ImageNet error without its paths and URL); RESULTS.md keeps it whole."""
    reason = re.sub(r"^[\w.]+\.py( --?[\w-]+ \S+)*: ", "", reason)  # the program's own prefix
    return re.split(r"; | \(| at /", reason, maxsplit=1)[0].rstrip(". ")


def readme_summary(records, datasets, cli):
    """The README's results block, from the same records as RESULTS.md: per dataset, test AUC of each model under
    every frozen-feature protocol, and the linear-probe difference to the untrained backbone of the same seed."""
    ok = [r for r in records if r["status"] == "ok"]
    done = len([r for r in records if r["status"] != "pending"])
    dates = sorted(r["date"][:10] for r in ok if "date" in r)
    lines = [f"Preset `{cli.preset}`: `python reproduce.py {' '.join(cli.argv)}`, from {done} of {len(records)} runs "
             f"({len(ok)} finished{f', {dates[0]} to {dates[-1]}' if dates else ''}; machines and times in "
             "[results/RESULTS.md](results/RESULTS.md)).", "Test AUC; one seed: the linear probe's 95% bootstrap "
             "interval; the untrained backbone: mean ± std over its seeds.", ""]
    protos = PROTOCOLS[:4]  # the frozen-feature protocols
    for d in datasets:
        rows = []
        for model in ["random", "supervised"] + METHODS:
            rs = [r for r in ok if r["data"] == d and r["model"] == model]
            if not rs:
                continue
            cells = [auc_cell([r["results"][p] for r in rs]) if p == "linear" else mean_sd_text(
                [r["results"][p]["auc"] for r in rs]) for p, _ in protos]
            delta = "–" if model == "random" else paired_delta(ok, d, model, "linear").replace(" (1 seed)", "")
            rows.append(f"| {NAMES[model]} | " + " | ".join(cells) + f" | {delta} |")
        if rows:
            lines += [f"| {d} | " + " | ".join(header(ok, d, p, n) for p, n in protos) +
                      " | minus untrained, linear 100% |",
                      "|---|" + "---:|" * (len(protos) + 1)] + rows + [""]
        by_reason = {}  # (model, reason) -> seeds: one entry for the same failure on every seed
        for r in records:
            if r["data"] == d and r["status"] == "failed":
                by_reason.setdefault((r["model"], short_reason(r["reason"])), []).append(str(r["seed"]))
        failed = [f"{NAMES[m]} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {why})"
                  for (m, why), seeds in by_reason.items()]
        if failed:
            lines += [f"Failed on {d}, no results: " + "; ".join(failed) + f". Why, in full: [{os.path.basename(cli.out)}"
                      f"/RESULTS.md]({os.path.basename(cli.out)}/RESULTS.md).", ""]
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


def seeds_text(seeds):
    """A preset's seeds: '[0, 1, 2]', or per data entry 'pneumonia [0, 1, 2], breast [0]'."""
    return ", ".join(f"{d} {v}" for d, v in seeds.items()) if isinstance(seeds, dict) else str(seeds)


def write_results(records, datasets, cfg, cli, wall):
    """results/RESULTS.md (in cli.out): how it was built, the hand-written reading, per dataset the test metrics of
    every model and protocol, the paired differences and the training curves, then the parts and every run."""
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
             f"- Backbone {cfg['arch']}, seeds {seeds_text(cfg['seeds'])}"
             + (f" (untrained backbone: seeds {seeds_text(cfg['random_seeds'])})"
                if cfg["random_seeds"] != cfg["seeds"] else "")
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
        lines.append(f"- {NAMES[m]}: settings of its own, chosen on the val split (results/RECIPES.md): "
                     + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in (flags.items() if isinstance(flags, dict)
                                                                       else [("every dataset", flags)])))
    reasons = {}  # the same failure (ImageNet weights offline) is listed once, with every run it stopped
    for r in records:
        if r["status"] == "failed":
            reasons.setdefault(r["reason"], []).append(f"{r['model']}-{r['data']}-s{r['seed']}")
    commands = {r["reason"]: r["config"] for r in records if r["status"] == "failed" and r["model"] == "imagenet"}
    for reason, names in reasons.items():
        where = (f" Where the weights exist: `python {commands[reason]} --weights FILE` (or the torch hub cache)."
                 if reason in commands else "")
        lines.append(f"- Failed, no results: {', '.join(names)}. {reason}{where}")
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
        # the dataset's settings from the training runs, whose epochs and batch their commands hold (check_record):
        # the most common, and each method whose preset flags set others; a baseline's record carries the preset's
        # epochs of when it ran, reused while its own command is unchanged
        trained = [r for r in records if r["data"] == d and config_flag(r.get("config", ""), "--epochs")]
        r0 = trained[0] if trained else next(r for r in records if r["data"] == d)
        budgets = [(r["epochs"], r["batch_size"]) for r in trained] or [(r0["epochs"], r0["batch_size"])]
        usual = max(budgets, key=budgets.count)  # the first of the most common
        own = {r["model"]: (r["epochs"], r["batch_size"]) for r in trained if (r["epochs"], r["batch_size"]) != usual}
        budget = f"{usual[0]} epochs at batch {usual[1]}" + "".join(
            f" ({NAMES[m]}: {e} epochs at batch {b})" for m, (e, b) in own.items())
        n_train = next((r["n_train"] for r in records if r["data"] == d and r.get("n_train")), "")
        used = f"a seeded {r0['train_subset']}-image subset of" if r0["train_subset"] else "all"
        lines += [f"## {d}", "", f"Train images: {used} {n_train}".rstrip() + f"; {budget}; fine-tune "
                  f"{r0['finetune_epochs']} epochs.", ""] + summary(ok, d) + (
                  targets(records, d, cfg["targets"][d]) if d in cfg.get("targets", {}) else []) + [
                  "", "| protocol | model | ACC | AUC | F1 (weighted) | chosen on val |",
                  "|---|---|---:|---:|---:|---|"]
        for proto, pname in PROTOCOLS:
            for model in BASELINES + METHODS:
                rs = [r["results"][proto] for r in ok if r["data"] == d and r["model"] == model
                      and proto in r["results"]]
                if rs:
                    cells = [mean_sd_text([x["acc"] for x in rs]), auc_cell(rs),
                             mean_sd_text([x["f1_weighted"] for x in rs])]
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


def write_ablation(records, variants, cli):
    """results/ABLATION.md: the augmentation variants' val-split scores (never test), with their flags; variants:
    name -> flags, in the order of records."""
    lines = ["# Augmentation for small images: ablation on the val split", "",
             f"SimCLR, preset `{cli.preset}` settings (`python reproduce.py {' '.join(cli.argv)}`); date "
             f"{datetime.date.today().isoformat()}; machine: {runs.machine()}. Scores on the **val** split only "
             "(kNN with "
             "k chosen on val; linear probe with L2 chosen on val, so slightly optimistic, equally for every row); "
             "the test split is never looked at. One seed: differences below ~0.01 AUC are noise at this size.", "",
             "| variant | flags | val kNN AUC | val linear AUC | run |", "|---|---|---:|---:|---|"]
    for name, r in zip(variants, records):
        flags = " ".join(variants[name])
        if r["status"] != "ok":
            lines.append(f"| {name} | `{flags}` | – | – | {r['status']} |")
            continue
        res = r["results"]
        lines.append(f"| {name} | `{flags}` | {res['knn']['val_auc']:.3f} | {res['linear']['val_auc']:.3f} | "
                     f"{r.get('wall_s', 0) / 60:.1f} min |")
    ok = [(name, r["results"]) for name, r in zip(variants, records) if r["status"] == "ok"]
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
    if not models:  # nothing finished yet: a figure that says so, never one left from other records
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center", color="gray")
        ax.set_axis_off()
        fig.savefig(os.path.join(out, "embedding.png"), dpi=80)
        plt.close(fig)
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


# ------------------------------------------------------------------------------------------------ the one call
def write(records, datasets, cfg, cli, wall):
    """Everything the study's records give: RESULTS.md, the figures and (cli.readme) the README block. records: one
    per run, in the study's order (status ok, failed or pending); cli: how reproduce.py was invoked (preset, argv,
    overrides, jobs, out, readme). Returns RESULTS.md's path."""
    path = write_results(records, datasets, cfg, cli, wall)
    figures(records, datasets, cli.out)
    if cli.readme:
        write_readme(cli.readme, readme_summary(records, datasets, cli))
    return path
