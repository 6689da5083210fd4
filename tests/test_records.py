"""The committed run records (results/runs/*.json) are the study's answer: each defect found by the third reliability
round (issue 32, part 1) edited into a copy of a real record must stop `reproduce.py --table-only` with one line
naming the file and the field, before RESULTS.md, the figures or the README block are touched."""
import copy
import glob
import hashlib
import json
import os
import re
import shutil

import pytest

import recipes
import records
import reproduce
from conftest import ROOT

RUNS = os.path.join(ROOT, "results", recipes.STUDY)  # the first cpu study, every run's record (results/history/)
HISTORY = os.path.dirname(RUNS)
SIMCLR = os.path.join(RUNS, "cpu-simclr-pneumonia-28-s0.json")
FAILED = os.path.join(RUNS, "cpu-imagenet-pneumonia-28-s0.json")


def load(path):
    with open(path) as f:
        return json.load(f)


def test_every_committed_record_is_sound():
    paths = glob.glob(os.path.join(ROOT, "results", "runs", "*.json")) + glob.glob(os.path.join(RUNS, "*.json"))
    assert len(glob.glob(os.path.join(RUNS, "*.json"))) == 22  # the first study, whole
    for p in paths:
        assert records.check_record(p, load(p)) == [], p


def edited(path, **change):
    rec = copy.deepcopy(load(path))
    for k, v in change.items():
        if v is KeyError:
            rec.pop(k)
        else:
            rec[k] = v
    return rec


def nan_auc():
    rec = load(SIMCLR)
    rec["results"]["linear"]["auc"] = float("nan")
    return rec


def string_auc():
    rec = load(SIMCLR)
    rec["results"]["knn"]["auc"] = "0.9"
    return rec


def edited_config():
    rec = load(SIMCLR)  # epochs 10 -> 20 in the command, the old hash kept: another run under this one's name
    rec["config"] = rec["config"].replace("--epochs 10", "--epochs 20")
    return rec


CASES = [  # (what the issue found, the record, the field its line must name)
    ("[] instead of a record", lambda: [], "expected a JSON object"),
    ('"status": "OK"', lambda: edited(SIMCLR, status="OK"), "status: expected 'ok' or 'failed'"),
    ("status missing", lambda: edited(SIMCLR, status=KeyError), "status: expected 'ok' or 'failed'"),
    ("results missing", lambda: edited(SIMCLR, results=KeyError), "results: missing"),
    ('"results": {}', lambda: edited(SIMCLR, results={}), "results.knn: missing"),
    ("an AUC as a string", string_auc, "results.knn.auc: expected finite numbers"),
    ("a NaN AUC", nan_auc, "results.linear.auc: expected finite numbers"),
    ("a failed record without reason", lambda: edited(FAILED, reason=KeyError), "reason: missing"),
    ('"data": "breast-28", hash kept', lambda: edited(SIMCLR, data="breast-28"), "file name: its preset, model"),
    ('"model": "mocov3"', lambda: edited(SIMCLR, model="mocov3"), "model: expected one of"),
    ("config edited, old hash kept", edited_config, "config_hash: b55a1b26 is not the hash of its config"),
    ('"epochs": 500 in a method\'s record', lambda: edited(SIMCLR, epochs=500),
     "config: --epochs 10 disagrees with the record's 500"),
    ('"seed": 1 (file name and hash kept)', lambda: edited(SIMCLR, seed=1), "config: --seed 0 disagrees"),
    ('"recipe": "lr 0.3" (not an object)', lambda: edited(SIMCLR, recipe="lr 0.3"), "recipe: expected the script's"),
]


@pytest.mark.parametrize("what,make,field", CASES, ids=[c[0] for c in CASES])
def test_a_bad_record_is_named_with_its_field(what, make, field):
    path = FAILED if "failed" in what else SIMCLR
    problems = records.check_record(path, make())
    assert problems and all(p.startswith(path) for p in problems)
    assert any(field in p for p in problems), problems


# the cpu preset the first study ran with (its records name it "cpu"): one seed per method, no method flags,
# 13 parts by these minutes
FIRST_CPU = {"seeds": [0], "parts": 13, "method_flags": {}, "minutes": {
    "pneumonia": {"random": 6, "supervised": 40, "imagenet": 0.5, "simclr": 70, "dclw": 70, "byol": 90, "simsiam": 70,
                  "barlow": 67, "vicreg": 67},
    "breast": {"random": 2, "supervised": 40, "imagenet": 0.5, "simclr": 69, "dclw": 69, "byol": 84, "simsiam": 69,
               "barlow": 69, "vicreg": 69}}}


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A copy of the first cpu study's records and reading, whose table --table-only can rebuild (under the preset
    it ran with). Its records predate the recipe check (no "recipe"), which refuses them as runs of today's
    defaults (test_reproduce); here they are taken as they were (these tests are about checks and tables)."""
    shutil.copytree(RUNS, tmp_path / "runs")
    shutil.copy(os.path.join(HISTORY, "reading-cpu.md"), tmp_path)
    monkeypatch.setitem(reproduce.PRESETS, "cpu", {**reproduce.PRESETS["cpu"], **FIRST_CPU})
    monkeypatch.setattr(records, "same_recipe", lambda old, recipe: None)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "not json", "nan auc"])
def test_table_only_refuses_and_touches_nothing(study, capsys, damage):
    assert reproduce.main(["--preset", "cpu", "--table-only", "--out", str(study)]) == 1  # ImageNet failed offline
    outputs = {p: os.path.getmtime(p) for p in glob.glob(str(study / "*.*")) + glob.glob(str(study / "*.png"))}
    assert any(p.endswith("RESULTS.md") for p in outputs)
    target = study / "runs" / "cpu-simclr-pneumonia-28-s0.json"
    text = target.read_text()
    target.write_text({"truncated": text[: len(text) // 2], "not json": "<html>502 Bad Gateway</html>",
                       "nan auc": re.sub(r'"auc": 0\.9557\d*', '"auc": NaN', text, count=1)}[damage])
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--preset", "cpu", "--table-only", "--out", str(study)])
    msg = str(e.value)
    assert "nothing was run or written" in msg and str(target) in msg
    assert ("results.linear.auc" in msg) if damage == "nan auc" else ("not readable JSON" in msg)
    assert {p: os.path.getmtime(p) for p in outputs} == outputs  # RESULTS.md and the figures untouched


def test_a_sound_record_of_another_configuration_is_skipped_with_a_line(study, capsys):
    target = study / "runs" / "cpu-simclr-pneumonia-28-s0.json"
    rec = load(target)
    rec["config"] = rec["config"].replace("--epochs 10", "--epochs 20")  # a sound record of a 20-epoch run
    rec["config_hash"] = hashlib.sha1(rec["config"].encode()).hexdigest()[:8]
    rec["epochs"] = 20
    target.write_text(json.dumps(rec))
    reproduce.main(["--preset", "cpu", "--table-only", "--out", str(study)])
    out = capsys.readouterr().out
    assert f"[old ] simclr-pneumonia-28-s0: {target} is of another configuration; not used" in out
    assert "simclr-pneumonia-28-s0 | 5/13 | not yet run" in (study / "RESULTS.md").read_text()  # not in this table


def test_the_table_takes_a_dataset_s_epochs_from_a_training_run(study):
    """"epochs": 500 in the untrained backbone's record: no command holds a baseline's epochs (a study rerun with
    other epochs reuses it unchanged), so RESULTS.md's dataset line takes them from a training run's record, whose
    command check_record holds them to (planted: the dataset's first record, the baseline's -> "500 epochs")."""
    target = study / "runs" / "cpu-random-pneumonia-28-s0.json"
    rec = json.loads(target.read_text())
    rec["epochs"] = 500
    target.write_text(json.dumps(rec))
    reproduce.main(["--preset", "cpu", "--table-only", "--out", str(study)])
    section = (study / "RESULTS.md").read_text().split("## pneumonia-28")[1].split("## breast-28")[0]
    assert "; 10 epochs at batch 256;" in section and "500 epochs" not in section
