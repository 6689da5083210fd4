"""reproduce.py: planning (parts, data specs, per-entry settings, method flags and the config hash), the failure
reason of a run, and the study end to end on tiny data across two "machines" that share only committed records."""
import json
import os
import re
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest

import records
import report
import reproduce
import runs
from conftest import ROOT, make_arrays


def test_curves_per_epoch_means(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 0, "train/loss": 4.0, "train/z_std": 0.5, "train/eta_share": 1.0},
            {"epoch": 0, "train/loss": 2.0, "train/z_std": 0.25, "train/eta_share": 0.5},
            {"epoch": 0, "val/knn_auc": 0.7}, {"epoch": 1, "train/loss": 1.0}]  # epoch 2 without either (older log)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 1, "train/lo')  # a last line cut by a kill
    c = runs.curves(str(log))
    assert c == {"epoch": [1, 2], "loss": [3.0, 1.0], "z_std": [0.375, None], "eta_share": [0.75, None],
                 "knn_epoch": [1], "knn_auc": [0.7]}


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
    assert runs.last_message(log.getvalue(), 1) == msg
    assert runs.last_message("Traceback (most recent call last):\nValueError: bad --lr\n", 1) == \
        "ValueError: bad --lr"
    assert runs.last_message("", 3) == runs.last_message("\r\n", 3) == "exit code 3"


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
    readme.write_text(f"# title\n\n{report.README_BEGIN}\nstale\n{report.README_END}\n\n## after\n")
    (tmp_path / "B" / "results" / "reading-cpu.md").write_text("SimCLR wins here, by luck.\n")  # the hand-written part
    b = machine("B", "--part", "2/2", "--readme", str(readme))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    block = readme.read_text()
    assert block.startswith("# title\n\n") and block.endswith(f"{report.README_END}\n\n## after\n")
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
    assert len(rec["curves"]["eta_share"]) == 1 and 0 <= rec["curves"]["eta_share"][0] <= 1  # LARS's, the same
    assert re.search(r"^\| SimCLR \| 0 \| \d+\.\d{3} → \d+\.\d{3} .*\| 0\.\d{4} → 0\.\d{4} \(1/√D = 0\.0625\) "
                     r"\| [01]\.\d\d → [01]\.\d\d \|$", table, re.M)  # its training row, D = simclr.py's 256
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
    # --part I alone takes N from the preset (its parts for cpu), not 1 (planted: read as I/1, refused as 2/1)
    alone = machine("B", "--part", "2")
    n = reproduce.PRESETS["cpu"]["parts"]
    assert alone.returncode == 0 and f"part 2/{n}: " in alone.stdout, alone.stdout[-2000:] + alone.stderr[-2000:]


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
    runs_min = [cpu["minutes"][d][m] for d in cpu["data"] for m in records.BASELINES + records.METHODS
                for _ in reproduce.setting(cpu, "random_seeds" if m == "random" else "seeds", d)]
    assert max(reproduce.assign_parts(runs_min, cpu["parts"])[1]) <= 100


def test_data_specs_and_per_entry_settings(tmp_path):
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
    # seeds per entry (three paired seeds on one dataset, one on another): plan() makes exactly those runs
    cfg = dict(reproduce.PRESETS["cpu"], seeds={"pneumonia": [0, 1, 2], "breast": [0]},
               random_seeds={"pneumonia": [0, 1, 2], "breast": [0, 1]})
    cli = types.SimpleNamespace(baselines=["random"], methods=["simclr", "byol"], ablate=False, table_only=True,
                                data_dir="", runs="runs")
    todo = reproduce.plan(cli, cfg, ["pneumonia", "breast"], 1)[0]
    assert sorted((r.model, r.data, r.seed) for r in todo) == sorted(
        [(m, "pneumonia", s) for m in ("random", "simclr", "byol") for s in (0, 1, 2)]
        + [("random", "breast", 0), ("random", "breast", 1), ("simclr", "breast", 0), ("byol", "breast", 0)])
    assert report.seeds_text(cfg["seeds"]) == "pneumonia [0, 1, 2], breast [0]"


def test_method_flags_change_only_the_named_method():
    base = dict(arch="resnet18", finetune_epochs=1, batch_size=256, subset=0, epochs=10, eval_every=5, warmup_epochs=1,
                imagenet_size=224)
    tuned = {**base, "method_flags": {"vicreg": ["--warmup-epochs", "3", "--lr", "0.1"]}}
    run = lambda model, cfg: reproduce.Run(model, "pneumonia", 28, 0, cfg, "runs")
    for model in ("simclr", "barlow", "random", "supervised"):  # their runs (and committed records) stay valid
        assert reproduce.identity(run(model, tuned)) == reproduce.identity(run(model, base))
    config, digest = reproduce.identity(run("vicreg", tuned))
    args = config.split()
    assert args.count("--warmup-epochs") == 1 and args[args.index("--warmup-epochs") + 1] == "3"  # replaced
    assert args[-2:] == ["--lr", "0.1"]  # appended
    assert digest != reproduce.identity(run("vicreg", base))[1]  # so the run is redone
    # the identity leaves out what differs between machines: where the run writes, the data and the weights lie
    assert " ".join(reproduce.command(run("vicreg", base), "")[2:-1]) == reproduce.identity(run("vicreg", base))[0]
    here = reproduce.command(run("vicreg", base), "/tmp/x", data_dir="/data", weights="w.pth")
    assert "--data-dir" in here and "/tmp/x" in here and "--data-dir" not in config
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
                        (["--lr"], "options"),                                       # not a pair
                        ({"pneumonia": ["--seed", "3"]}, r"\(pneumonia\) set --seed: the preset sets"),  # unpaired
                        (["--lr", "0.1", "--finetune-epochs", "3"], "set --finetune-epochs")):  # another protocol
        method = "moco" if says.startswith("expected one") else "vicreg"
        with pytest.raises(SystemExit, match=says):
            reproduce.check_method_flags("bad", {"data": ["pneumonia"], "method_flags": {method: flags}})


def test_preset_targets_must_name_a_dataset_of_the_preset_and_known_goals():
    """A typo in a preset's targets would leave them out of RESULTS.md without a word: check_targets refuses, in one
    line naming the preset and the key, a dataset the preset does not run (keys carry the size), an unknown goal, a
    value that is no AUC, and a floor for no method; the committed presets pass."""
    for name, preset in reproduce.PRESETS.items():
        reproduce.check_targets(name, preset)
    base = {"data": ["pneumonia", "breast@64"], "size": 28}
    reproduce.check_targets("good", {**base, "targets": {"pneumonia-28": dict(best=0.9, floor={"vicreg": 0.9}),
                                                         "breast-64": dict(over_untrained=-0.01)}})
    goal = "targets for pneumonia-28: "
    for targets, says in (({"pneumonia": dict(best=0.9)}, "targets for 'pneumonia': .*pneumonia-28, breast-64"),
                          ({"breast-28": dict(best=0.9)}, "targets for 'breast-28'"),       # the other size
                          ({"pneumonia-28": dict(bset=0.9)}, goal + "bset 0.9: expected one of over_untrained"),
                          ({"pneumonia-28": dict(best="0.9")}, goal + "best 0.9: expected"),  # not a number
                          ({"pneumonia-28": dict(best=96.5)}, goal + "best 96.5: expected"),  # a percentage
                          ({"pneumonia-28": dict(best=True)}, goal + "best True: expected"),
                          ({"pneumonia-28": dict(floor={"moco": 0.9})}, goal + "floor .*moco.*methods of simclr"),
                          ({"pneumonia-28": dict(floor=0.9)}, goal + "floor 0.9: expected")):
        with pytest.raises(SystemExit, match=f"^preset bad: {says}"):
            reproduce.check_targets("bad", {**base, "targets": targets})
    # and the study checks them first: nothing is run or written
    bad = {**reproduce.PRESETS["cpu"], "targets": {"pneumonia": dict(best=0.9)}}
    with mock.patch.dict(reproduce.PRESETS, {"cpu": bad}):
        with pytest.raises(SystemExit, match="^preset cpu: targets for 'pneumonia'"):
            reproduce.main(["--preset", "cpu", "--table-only", "--out", "/nonexistent/results"])


def test_a_run_of_the_same_command_but_another_default_is_not_reused(tmp_path, monkeypatch, capsys):
    """identity() is the command; a default changed in a method file (here the small-image jitter) leaves it the
    same. recipe() sees the change, and neither a committed record nor a finished run folder of the old recipe is
    reused; nor is one from before recipes were kept (no "recipe": what it ran with is unknown)."""
    import common
    import simclr
    cfg = dict(arch="resnet18", finetune_epochs=1, batch_size=256, subset=0, epochs=10, eval_every=5, warmup_epochs=1,
               imagenet_size=224, n_train=100, estimate_min=1.0, part="1/1")
    run = reproduce.Run("simclr", "pneumonia", 28, 0, cfg, str(tmp_path / "runs"))
    config, digest = reproduce.identity(run)
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", 0.8)  # the first study's default, whatever common's is now
    before = reproduce.recipe(run)
    assert before["lr"] == simclr.Args.lr and before["temperature"] == simclr.Args.temperature  # defaults included
    assert before["jitter_strength"] == [0.8, 0.8, 0.8, 0.2] and "out" not in before and "data_dir" not in before
    cli = types.SimpleNamespace(out=str(tmp_path / "results"), preset="cpu", part="1/1", data_dir="", weights=None)
    path = reproduce.json_path(cli.out, cli.preset, run)
    os.makedirs(os.path.dirname(path))
    committed = {"status": "ok", "config": config, "config_hash": digest, "recipe": before, "results": {}}
    json.dump(committed, open(path, "w"))
    assert reproduce.run_one(run, cli, run_it=False).get("committed")  # the same recipe: reused
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", 0.4)  # the default changes; the command does not
    assert reproduce.identity(run) == (config, digest)
    after = reproduce.recipe(run)
    assert records.recipe_change(before, after) == "jitter_strength [0.8, 0.8, 0.8, 0.2] -> [0.4, 0.4, 0.4, 0.1]"
    rec = reproduce.run_one(run, cli, run_it=False)
    assert rec["status"] == "pending" and rec["recipe"] == after  # not the old record: it would run again
    assert "ran with another recipe (jitter_strength" in capsys.readouterr().out
    json.dump({k: v for k, v in committed.items() if k != "recipe"}, open(path, "w"))  # a record from before recipes
    rec = reproduce.run_one(run, cli, run_it=False)  # (planted: the old rule, reused by its command alone)
    assert rec["status"] == "pending" and not rec.get("committed")
    assert "predates the recipe check" in capsys.readouterr().out
    # a finished run folder of the old recipe (its run.json says so) is refused with one line, not reused
    os.remove(path)
    folder = tmp_path / "runs" / f"{run.name}-{digest}"
    folder.mkdir(parents=True)
    json.dump({"knn": {}}, open(folder / "results.json", "w"))
    json.dump({"wall_s": 1.0, "command": config, "recipe": before}, open(folder / "run.json", "w"))
    rec = reproduce.run_one(run, cli, run_it=True)
    assert rec["status"] == "failed" and rec["reason"].startswith(f"{folder} finished but ran with another recipe")
    json.dump({"wall_s": 1.0, "command": config, "recipe": after}, open(folder / "run.json", "w"))
    assert reproduce.run_one(run, cli, run_it=True)["status"] == "ok"  # its own recipe: reused
    # a finished folder whose run.json is missing, unreadable or silent on the recipe: unknown, so refused
    for content in (None, "{trunc", '{"wall_s": 1.0}', "[1, 2]"):
        (folder / "run.json").unlink(missing_ok=True)
        if content is not None:
            (folder / "run.json").write_text(content)
        rec = reproduce.run_one(run, cli, run_it=True)
        assert rec["status"] == "failed" and rec["reason"].startswith(f"{folder} finished but "), content
        says = "predates the recipe check" if content == '{"wall_s": 1.0}' else "run.json is missing or unreadable"
        assert says in rec["reason"]


@pytest.mark.parametrize("part", ["0/14", "15/14", "1/0", "3/-1", "a/b", "1/14/2", "2/"])
def test_a_bad_part_is_one_line(part, tmp_path):
    with pytest.raises(SystemExit, match=f"^--part {re.escape(part)}: expected I/N with 1 <= I <= N"):
        reproduce.main(["--preset", "cpu", "--table-only", "--part", part, "--out", str(tmp_path)])
    assert not (tmp_path / "RESULTS.md").exists()


def test_the_part_check_holds_under_python_O(tmp_path):
    """The range check was an assert, which python -O drops: --part 15/14 then ran as a part of its own."""
    r = subprocess.run([sys.executable, "-O", "reproduce.py", "--preset", "cpu", "--table-only", "--part", "15/14",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "--part 15/14: expected I/N" in r.stderr and "Traceback" not in r.stderr


def test_the_readme_gives_a_laptop_user_the_cpu_presets_flags():
    """The README's first commands run a method at the cpu study's budget by hand; the flags it says that budget
    wants must be the preset's PneumoniaMNIST method_flags, all of them and no others (planted: a flag changed in the
    preset only, and one more flag in the preset, each failed this)."""
    text = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    said = text[text.index("the flags the cpu study passes:"):text.index("([why](docs/deviations.md))")]
    named = {}
    for method, flags in re.findall(r"`(\w+)\.py ((?:--[\w-]+ [^\s`]+ ?)+)`", said):
        named[method] = flags.split()
    preset = reproduce.PRESETS["cpu"]["method_flags"]
    wanted = {m: f["pneumonia"] for m, f in preset.items() if "pneumonia" in f}
    assert named == wanted, (named, wanted)


def test_a_method_whose_flags_set_its_batch_gets_a_record_of_that_batch(tmp_path):
    """method_flags may give a method its own --batch-size and --epochs (e.g. the same images in twice the steps):
    its record says what ran, so check_record accepts it (planted: epochs and batch from the preset, 10 and 256,
    which check_record refuses against the command's 20 and 128), and RESULTS.md's dataset line names it."""
    cfg = dict(arch="resnet18", finetune_epochs=1, batch_size=256, subset=0, epochs=10, eval_every=5, warmup_epochs=1,
               imagenet_size=224, n_train=100, estimate_min=1.0, part="1/1")
    cli = types.SimpleNamespace(out=str(tmp_path / "results"), preset="cpu", part="1/1", data_dir="", weights=None)
    recs = []
    for model, flags in (("simclr", {}), ("byol", {"byol": ["--batch-size", "128", "--epochs", "20"]})):
        run = reproduce.Run(model, "pneumonia", 28, 0, {**cfg, "method_flags": flags}, str(tmp_path / "runs"))
        config, digest = reproduce.identity(run)
        folder = tmp_path / "runs" / f"{run.name}-{digest}"  # a finished run folder, as the run would leave it
        folder.mkdir(parents=True)
        json.dump({p: {"auc": 0.9, "acc": 0.8, "f1_weighted": 0.7} for p in ("knn", "linear")},
                  open(folder / "results.json", "w"))
        json.dump({"wall_s": 60.0, "command": config, "recipe": reproduce.recipe(run), "ran_in_part": "1/1",
                   "date": "2026-12-06T10:00", "machine": "test"}, open(folder / "run.json", "w"))
        rec = reproduce.run_one(run, cli, run_it=True)
        assert rec["status"] == "ok", rec.get("reason")
        assert records.check_record(f"cpu-{run.name}.json", rec) == []
        recs.append(rec)
    assert [(r["epochs"], r["batch_size"]) for r in recs] == [(10, 256), (20, 128)]
    os.makedirs(cli.out)
    cli.argv, cli.overrides, cli.jobs = ["--table-only"], [], 1
    md = open(report.write_results(recs, ["pneumonia-28"], {"note": "n", "arch": "resnet18", "seeds": [0],
                                                            "random_seeds": [0]}, cli, 60)).read()
    assert "Train images: all 100; 10 epochs at batch 256 (BYOL: 20 epochs at batch 128); fine-tune 1 epochs." in md
