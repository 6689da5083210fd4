"""Careless use must end in a clear message or the documented behaviour, and nothing may be lost or mixed: argument
checks, run folders (rerun, --overwrite, --resume with another config, stale temp files, interrupts, full disk),
data (caches that notice their source changed, labels, 16-bit images, .npz paths) and file modes."""
import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import common
import dataset
import runs
from conftest import ROOT, make_arrays
from test_train import command, run

METHOD_FILES = ("simclr", "dclw", "byol", "simsiam", "barlow", "vicreg")


@pytest.fixture
def tiny_dir(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(48, 16, 16)))
    return tmp_path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 1-epoch SimCLR run on tiny data (its npz beside it), trained once for the tests below that
    start from one; each works on its own copy (`finished_copy`), so none sees another's edits."""
    d = tmp_path_factory.mktemp("finished")
    np.savez(d / "pneumoniamnist.npz", **make_arrays(n=(48, 16, 16)))
    run("simclr.py", d, d / "run", "--epochs", "1")
    return d


def finished_copy(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def wait_for_step(log, since=0.0, timeout=300):
    """Block until metrics.jsonl, written after `since`, has a train row (the run is past its setup)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and log.stat().st_mtime > since and '"step"' in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step logged in {log}")


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_args_field_has_a_rule_and_the_defaults_pass(method):
    module = __import__(method)
    rules = {**common.RULES, **module.RULES}
    missing = [f.name for f in dataclasses.fields(module.Args) if f.name not in rules]
    assert not missing, f"{method}.Args fields without a rule (common.RULES or {method}.RULES): {missing}"
    assert common.check_args(module.Args(), rules) == []
    assert not set(module.RULES) & set(common.RULES), "a method's own rule shadows a shared one"
    assert not {k for m in METHOD_FILES if m != method for k in __import__(m).RULES} & set(common.RULES)


@pytest.mark.parametrize("argv,message", [
    (["--eval-every", "0"], "--eval-every 0: expected >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: expected > 0"),
    (["--temperature", "nan"], "--temperature nan: expected > 0"),
    (["--epochs", "-1"], "--epochs -1: expected >= 1"),
    (["--out", "/tmp/" + "x" * 300], "a name in it is 300 bytes long, over the file systems' 255"),
    (["--epochs", "0"], "--epochs 0: expected >= 1"),
    (["--lr", "-1"], "--lr -1.0: expected > 0"),
    (["--batch-size", "1"], "--batch-size 1: expected >= 2"),
    (["--arch", "vgg"], "--arch 'vgg': expected resnet18 or resnet50"),
    (["--jitter", "2"], "--jitter 2.0: expected -1 (by size) or 0..1"),
    (["--blur", "3"], "--blur 3: expected -1 (by size), 0 or 1"),
    (["--min-scale", "1.5"], "--min-scale 1.5: expected 0 (by size) or a fraction in (0, 1]"),
    (["--resume", "--overwrite"], "--resume and --overwrite: pick one"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    import simclr
    with pytest.raises(SystemExit) as e:
        common.parse_args(simclr.Args, argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_all_bad_fields_are_reported_at_once_and_out_may_not_be_a_file(tmp_path, capsys):
    import byol
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        common.parse_args(byol.Args, ["--ema-decay", "1.5", "--proj-dim", "0", "--out", str(f)])
    err = capsys.readouterr().err
    assert "--ema-decay 1.5: expected 0..1" in err and "--proj-dim 0: expected >= 1" in err
    assert f"--out {str(f)!r}: is a file, expected a run folder" in err


# ------------------------------------------------------------------------------------------------ run folders
def test_second_run_into_a_finished_folder_is_refused_then_overwritten(finished, tmp_path):
    tiny_dir = finished  # the data the run was trained on
    out = finished_copy(finished, tmp_path)
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl", "results.json")}
    r = run("simclr.py", tiny_dir, out, "--epochs", "1", "--lr", "0.1", check=False)
    assert r.returncode != 0 and f"{out} already holds a run (checkpoint.pt, metrics.jsonl, results.json)" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert all((out / f).read_bytes() == b for f, b in before.items())  # nothing touched
    run("simclr.py", tiny_dir, out, "--epochs", "1", "--lr", "0.1", "--overwrite")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["lr"] == 0.1
    assert json.loads((out / "results.json").read_text())["epochs"] == 1


def test_prepare_run_removes_only_its_own_stale_temp_files(tmp_path):
    import simclr
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / "checkpoint.pt.k3j_x.tmp", out / "results.json.abc.tmp"]
    for f in stale + [out / "notes.tmp"]:
        f.write_bytes(b"x" * 100)
    runs.prepare_run(simclr.Args(out=str(out), resume=True), "simclr")
    assert sorted(os.listdir(out)) == [".lock", "notes.tmp"]  # .lock: this process holds the folder


def test_resume_refuses_another_configuration_but_accepts_the_same_data_by_another_name(finished, tmp_path):
    tiny_dir = finished  # the data the run was trained on
    out = finished_copy(finished, tmp_path)
    r = run("simclr.py", tiny_dir, out, "--epochs", "1", "--resume", "--lr", "0.01", "--seed", "5", check=False)
    assert r.returncode != 0 and "was made with another configuration" in r.stderr
    assert "lr: 0.4 in the checkpoint, 0.01 now" in r.stderr and "seed: 0 in the checkpoint, 5 now" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "breastmnist.npz", **make_arrays(n=(48, 16, 16), seed=9))
    r = run("simclr.py", other, out, "--epochs", "1", "--resume", "--data", "breast", check=False)
    assert r.returncode != 0 and "data: 'pneumonia' (content" in r.stderr
    # the same arrays as a path: resumes (nothing left to train: re-evaluates); eval frequency may differ
    r = run("simclr.py", tiny_dir, out, "--epochs", "1", "--resume", "--data",
            str(tiny_dir / "pneumoniamnist.npz"), "--eval-every", "3")
    assert "resumed from" in r.stdout
    # a checkpoint from a version of the code with one Args field more, or one less: refused, naming the field
    # (planted: the comparison over the fields both sides have, set(now) & set(was), resumed both silently)
    for edit, expected in ((lambda a: a.update(mystery=1), "mystery: 1 in the checkpoint, None now"),
                           (lambda a: a.pop("jitter"), "jitter: None in the checkpoint, -1.0 now")):
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        shutil.copytree(out, tmp_path / "edited")
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        edit(ckpt["args"])
        torch.save(ckpt, tmp_path / "edited" / "checkpoint.pt")
        r = run("simclr.py", tiny_dir, tmp_path / "edited", "--epochs", "1", "--resume", check=False)
        assert r.returncode != 0 and expected in r.stderr, r.stderr
    # a checkpoint from before --optimizer and --bn existed resumes when this run does what that version did (LARS,
    # joint batch norm), saying so; asking for something else is refused (issue 32: advice that could be followed)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k in ("optimizer", "bn"):
        ckpt["args"].pop(k)
    shutil.rmtree(tmp_path / "edited")
    shutil.copytree(out, tmp_path / "edited")
    torch.save(ckpt, tmp_path / "edited" / "checkpoint.pt")
    r = run("simclr.py", tiny_dir, tmp_path / "edited", "--epochs", "1", "--resume")
    assert "bn: not in this older checkpoint, 'joint' is what that version did" in r.stdout
    assert "optimizer: not in this older checkpoint, 'lars' is what that version did" in r.stdout
    r = run("simclr.py", tiny_dir, tmp_path / "edited", "--epochs", "1", "--resume", "--bn", "per-view", check=False)
    assert r.returncode != 0 and "bn: None in the checkpoint, 'per-view' now" in r.stderr


def test_a_torch_file_that_is_not_a_medssl_checkpoint_is_named(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"state_dict": {}}, out / "checkpoint.pt")
    r = run("simclr.py", tiny_dir, out, "--resume", check=False)
    assert r.returncode != 0 and "checkpoint.pt is not a medssl checkpoint (missing keys ['method', 'args'" in r.stderr


def test_ctrl_c_and_sigterm_end_with_one_line(tiny_dir, tmp_path):
    out = tmp_path / "run"
    for sig in (signal.SIGINT, signal.SIGTERM):
        t0 = time.time()
        # SIGINT as a terminal gives it: a shell starts background jobs with SIGINT ignored, which the child would
        # inherit (and Python honours) when the tests themselves run in the background
        p = subprocess.Popen(command("simclr.py", tiny_dir, out, "--epochs", "3", "--resume"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for_step(out / "metrics.jsonl", since=t0)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert "simclr: interrupted at epoch " in err and "rerun with --resume to continue" in err


def test_two_processes_never_share_a_run_folder(tiny_dir, tmp_path):
    """A second identical command (and evaluate.py) on a folder a run is training in: one line naming the folder
    and the holder's pid, and the first run's log untouched by it (planted: no lock: both trained one folder, the
    log held more train rows than steps). The lock goes with its process: after it ends, --resume works."""
    out = tmp_path / "run"
    t0 = time.time()
    first = subprocess.Popen(command("simclr.py", tiny_dir, out, "--epochs", "3"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(out / "metrics.jsonl", since=t0)
        second = run("simclr.py", tiny_dir, out, "--epochs", "3", "--resume", check=False)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert f"simclr: {out} is in use by another process (pid {first.pid})" in second.stderr, second.stderr
        r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint",
                            str(out / "checkpoint.pt"), "--data-dir", str(tiny_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=300) if (out / "checkpoint.pt").exists() else None
        if r is not None:
            assert r.returncode != 0 and f"evaluate.py: {out} is in use by another process" in r.stderr, r.stderr
    finally:
        first.kill()  # SIGKILL: no chance to clean up; the kernel drops the lock with the process
        first.wait()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert [r["step"] for r in rows] == list(range(len(rows)))  # one writer: steps in order, none twice
    r = run("simclr.py", tiny_dir, out, "--epochs", "1", "--resume", check=False)
    assert "is in use" not in r.stderr


def test_killing_reproduce_stops_its_child(tmp_path):
    """SIGKILL of reproduce.py (no handler runs) must not leave its training child as an orphan (planted: no
    PR_SET_PDEATHSIG: the child went on training with parent 1, and a rerun started a second one in its folder)."""
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "pneumoniamnist.npz", **make_arrays(n=(64, 16, 16)))
    cmd = [sys.executable, "reproduce.py", "--preset", "cpu", "--data", "pneumonia", "--methods", "simclr",
           "--baselines", "--seeds", "0", "--epochs", "50", "--data-dir", str(data), "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "results")]
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    locks = []
    while time.time() < deadline and not locks:
        locks = [p for p in (tmp_path / "runs").glob("*/.lock") if p.read_text().strip()]
        time.sleep(0.5)
    assert locks, "the child never took its run folder"
    child = int(locks[0].read_text())
    parent.kill()
    parent.wait()
    for _ in range(120):  # the child gets SIGTERM, saves nothing new and exits (as on Ctrl-C)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError(f"child {child} still running 60 s after reproduce.py was killed")


def test_bad_data_ends_the_scripts_with_one_line(tmp_path):
    """A truncated npz, a missing key, a class folder of non-images: the method scripts and evaluate.py print the
    data error's own message, naming the file, as one line, never a traceback (planted: runs.launch without the
    handler printed three chained tracebacks)."""
    a = make_arrays()
    del a["val_labels"]
    np.savez(tmp_path / "nokey.npz", **a)
    np.savez(tmp_path / "good.npz", **make_arrays())
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:3000])
    for data, expected in ((tmp_path / "nokey.npz", "missing key 'val_labels'"),
                           (tmp_path / "cut.npz", "not a readable npz file")):
        for script in ("simclr.py", "evaluate.py"):
            r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--data", str(data), "--out",
                                str(tmp_path / "out" / script)], capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
            line = r.stderr.strip().splitlines()[-1]
            assert line.startswith(f"{script.removesuffix('.py')}:" if script != "evaluate.py" else "evaluate.py:")
            assert str(data) in line and expected in line, line


def test_evaluate_checks_its_output_path_before_it_evaluates(tmp_path):
    """--out an existing folder, or under a file (not writable as a folder): one line at once, not a traceback after
    the whole evaluation (planted: the check removed: IsADirectoryError after the evaluation)."""
    np.savez(tmp_path / "d.npz", **make_arrays())
    (tmp_path / "afolder").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, expected in ((tmp_path / "afolder", "is a folder, expected the path of a JSON file"),
                          (tmp_path / "afile" / "r.json", "cannot write there")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--data", str(tmp_path / "d.npz"),
                            "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"evaluate.py --out {out}: {expected}" in r.stderr and "linear" not in r.stdout, r.stderr


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    """An image over PIL's pixel limit (a 14000 x 14000 PNG in the trials; the limit lowered here to keep it small)
    is named as unreadable, not a DecompressionBombError traceback."""
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(tmp_path / "ds" / c / f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: PIL raises, not warns
    with pytest.raises(ValueError, match=r"0\.png: unreadable image file \(DecompressionBombError"):
        dataset.load(str(tmp_path / "ds"), 28, str(tmp_path / "cache"))


def test_more_bad_sources_are_named(tmp_path):
    """Issue 32's third list: an npz whose header claims 10^12 images (a MemoryError that named nothing), a float
    TIFF of NaN (a cast warning and undefined pixels), a class folder in test but not in train ("label 2 out of
    range"): each a ValueError naming the file or folder and what is wrong."""
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10 ** 12, 28, 28)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("train_images.npy", header.getvalue() + b"\0" * 1000)
    with pytest.raises(ValueError, match=r"huge\.npz: (an array in it does not fit in memory|not a readable npz)"):
        dataset.load(str(tmp_path / "huge.npz"), 28, str(tmp_path))
    for c in ("a", "b"):
        (tmp_path / "tif" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), float(i), np.float32), mode="F").save(tmp_path / "tif" / c / f"{i}.tif")
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(tmp_path / "tif" / "b" / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif: unreadable image file \(ValueError: 64 NaN or infinite pixels"):
        dataset.load(str(tmp_path / "tif"), 28, str(tmp_path / "c1"))
    root = tmp_path / "splits"
    for split, classes in (("train", "ab"), ("test", "abc")):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(root / split / c / f"{i}.png")
    with pytest.raises(ValueError, match=r"class folder\(s\) c not in .*train: every class needs train images"):
        dataset.load(str(root), 28, str(tmp_path / "c2"))


def test_appledouble_files_are_skipped_and_a_broken_link_is_named(tmp_path):
    """macOS copies leave ._name.png AppleDouble files (not images) beside each image: skipped like other dotfiles,
    not the whole dataset refused; a broken symlink or a symlink loop among the images: one line naming it."""
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / c / f"{i}.png")
            (root / c / f"._{i}.png").write_bytes(b"\0\x05\x16\x07" + b"\0" * 80)  # AppleDouble magic
    ds = dataset.load(str(root), 28, str(tmp_path / "c"))
    assert sum(len(ds[s][1]) for s in dataset.SPLITS) == 6  # the six PNGs, none of the ._ files
    os.symlink(tmp_path / "gone.png", root / "a" / "3.png")
    with pytest.raises(OSError, match=r"3\.png") as e:
        dataset.load(str(root), 28, str(tmp_path / "c"))
    assert dataset.one_line(e.value) and "3.png" in dataset.one_line(e.value)
    os.remove(root / "a" / "3.png")  # a symlink loop: named too (planted: the message without the file)
    os.symlink(root / "a" / "loop2.png", root / "a" / "loop1.png")
    os.symlink(root / "a" / "loop1.png", root / "a" / "loop2.png")
    with pytest.raises(OSError) as e:
        dataset.load(str(root), 28, str(tmp_path / "c"))
    assert dataset.one_line(e.value).endswith("loop1.png: Too many levels of symbolic links")


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "notadir").write_text("x")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "simclr.py"), "--data", "breast", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, MEDSSL_DATA_DIR=str(tmp_path / "notadir")))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"simclr: --data-dir / MEDSSL_DATA_DIR {tmp_path / 'notadir'}: is a file, expected the folder" in r.stderr


def test_evaluate_names_a_checkpoint_whose_backbone_does_not_fit(finished, tmp_path):
    """A 5x5 conv1, a missing key: one line naming the checkpoint, not load_state_dict's traceback; all-NaN weights:
    one line naming the checkpoint and a tensor, not L-BFGS's overflow after feature extraction; an empty model,
    'encoder.' keys, a truncated file: one line each saying so."""
    tiny_dir = finished  # the data the run was trained on
    out = finished_copy(finished, tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for name, edit in (("conv5", lambda m: m.update({"backbone.conv1.weight": torch.zeros(64, 1, 5, 5)})),
                       ("nokey", lambda m: m.pop("backbone.layer1.0.bn1.weight")),
                       ("nan", lambda m: m.update({k: torch.full_like(v, float("nan")) for k, v in m.items()
                                                   if v.is_floating_point()})),
                       ("empty", lambda m: m.clear()),
                       ("encoder", lambda m: [m.update({k.replace("backbone.", "encoder."): m.pop(k)})
                                              for k in list(m)])):
        bad = {**ckpt, "model": dict(ckpt["model"])}
        edit(bad["model"])
        torch.save(bad, tmp_path / f"{name}.pt")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint",
                            str(tmp_path / f"{name}.pt"), "--data-dir", str(tiny_dir), "--out",
                            str(tmp_path / f"{name}.json")], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        says = {"nan": "non-finite backbone weights in conv1.weight and",
                "empty": "its backbone does not fit a resnet18 for 1-channel 28 px images: no 'backbone.' keys in "
                         "its model (0 keys)",
                "encoder": "its backbone does not fit a resnet18 for 1-channel 28 px images: no 'backbone.' keys "
                           "in its model (128 keys, e.g. 'encoder.conv1.weight')"}.get(
            name, "its backbone does not fit a resnet18")
        assert f"evaluate.py --checkpoint {tmp_path / name}.pt: {says}" in r.stderr
    data = (out / "checkpoint.pt").read_bytes()  # cut short (a copy interrupted): one line, no traceback
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(tmp_path / "cut.pt")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"evaluate.py --checkpoint: {tmp_path / 'cut.pt'}: not a readable medssl checkpoint" in r.stderr


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "w": torch.ones(10)}, path)
    good = path.read_bytes()
    script = ("import resource, sys, torch; sys.path.insert(0, sys.argv[1]); import runs; "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
              "runs.atomic_write(sys.argv[2], lambda tmp: torch.save({'epoch': 2, 'w': torch.ones(100000)}, tmp))")
    r = subprocess.run([sys.executable, "-c", script, ROOT, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"no space left on device (or over the file-size limit) while writing {path}" in r.stderr
    assert "the previous checkpoint.pt is intact" in r.stderr
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_full_disk_during_a_run_ends_it_with_one_line(tiny_dir, tmp_path):
    """A method run whose checkpoint meets a full disk (the file-size limit here) ends with the one line the README
    promises, naming the file (issue 32: the right message after three chained tracebacks)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # a checkpoint is ~45 MB
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "simclr.py"), "--data", "pneumonia", "--data-dir",
                        str(tiny_dir), "--batch-size", "16", "--epochs", "1", "--proj-hidden", "64", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=limit,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"simclr: no space left on device (or over the file-size limit) while writing {out / 'checkpoint.pt'}; " \
           "nothing was written" in r.stderr


def test_written_files_get_the_mode_open_would_give(tmp_path, monkeypatch):
    """mkstemp makes 0600 files; renamed into place they must get 0666 & ~umask, as open() would."""
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        monkeypatch.setattr(runs, "_UMASK", umask)  # the process umask, read once at import
        runs.atomic_write(str(tmp_path / f"a{umask}.pt"), lambda tmp: torch.save({"x": 1}, tmp))
        runs.write_json(str(tmp_path / f"b{umask}.json"), {})
        assert all((tmp_path / f).stat().st_mode & 0o777 == mode for f in (f"a{umask}.pt", f"b{umask}.json"))
    r = subprocess.run([sys.executable, "-c", "import runs, os; print(oct(runs._UMASK), oct(os.umask(0)))"],
                       cwd=ROOT, text=True, capture_output=True, preexec_fn=lambda: os.umask(0o027), timeout=120)
    assert r.stdout.strip() == "0o27 0o27"  # runs reads the process's umask at import and leaves it as it was


# ------------------------------------------------------------------------------------------------ reproduce
def test_sigterm_to_reproduce_stops_its_child_and_says_how_to_resume(tiny_dir, tmp_path):
    study = tmp_path / "runs"
    cmd = [sys.executable, "reproduce.py", "--preset", "cpu", "--data", "pneumonia", "--methods", "simclr",
           "--baselines", "--epochs", "50", "--data-dir", str(tiny_dir), "--runs", str(study), "--out",
           str(tmp_path / "results")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(study.glob("*/metrics.jsonl")):
        time.sleep(0.1)
    wait_for_step(next(study.glob("*/metrics.jsonl")))
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted; stopped simclr-pneumonia-28-s0" in stdout, stdout[-2000:]
    assert "Rerun the same command to resume" in stdout
    time.sleep(0.5)
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(study).encode() in f.read():
                    alive.append(pid)
        except OSError:
            pass
    assert not alive, f"children still running: {alive}"
    log = next(study.glob("*/log.txt")).read_text()
    assert "simclr: interrupted at epoch" in log


# ------------------------------------------------------------------------------------------------ data
def _png_folder(root, classes, n, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 50, (size, size), dtype=np.uint8) + 60 * k).save(root / c / f"{i}.png")


def test_folder_cache_is_keyed_by_path_and_content(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "site1" / "ds", tmp_path / "site2" / "ds"
    _png_folder(a, ["x", "y"], 10)
    _png_folder(b, ["x", "y", "z"], 10, seed=1)
    first = dataset.load(str(a), 16, str(cache))
    second = dataset.load(str(b), 16, str(cache))  # same base name, another folder
    assert first["n_classes"] == 2 and second["n_classes"] == 3 and len(os.listdir(cache)) == 2
    _png_folder(a, ["y", "w"], 20, seed=2)  # 20 more images in y (10 new names), and a class more
    grown = dataset.load(str(a), 16, str(cache))
    assert grown["n_classes"] == 3 and sum(len(grown[s][1]) for s in dataset.SPLITS) == 50
    for f in (a / "w").iterdir():  # delete that class again
        f.unlink()
    (a / "w").rmdir()
    back = dataset.load(str(a), 16, str(cache))
    assert back["n_classes"] == 2 and sum(len(back[s][1]) for s in dataset.SPLITS) == 30


def test_a_broken_folder_cache_is_decoded_again_and_stale_temps_go(tmp_path):
    """A cache file cut short (a full disk, a copy interrupted) is decoded again with a warning, not an error
    (planted: the old 'not a readable npz' error); a cache temp file left by a write killed midway is removed once
    it is ten minutes old, a fresh one (another process writing now) is kept."""
    _png_folder(tmp_path / "ds", ["a", "b"], 6)
    first = dataset.load(str(tmp_path / "ds"), 16, str(tmp_path / "c"))
    (cache,) = (tmp_path / "c").glob("ds_16_*.npz")
    cache.write_bytes(cache.read_bytes()[:200])
    stale, fresh = (tmp_path / "c" / f"{cache.name}.{x}.tmp" for x in ("k1ll3d", "wr1t1ng"))
    for t in (stale, fresh):
        t.write_bytes(b"half an npz")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with pytest.warns(UserWarning, match="not a readable npz file.*decoding .*ds again"):
        again = dataset.load(str(tmp_path / "ds"), 16, str(tmp_path / "c"))
    assert all(torch.equal(first[s][0], again[s][0]) for s in dataset.SPLITS)
    assert dataset.load_npz(str(cache))  # rebuilt whole
    assert not stale.exists() and fresh.exists()


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to view) loads as it
    is viewed: the stored top half (white) on the right (planted: exif_transpose dropped -> white on top)."""
    stored = np.zeros((16, 16), dtype=np.uint8)
    stored[:8] = 255  # top half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the 0th row is the visual right-hand side
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(stored).save(tmp_path / "ds" / c / f"{i}.jpg", exif=exif, quality=95)
    ds = dataset.load(str(tmp_path / "ds"), 16, str(tmp_path / "c"))
    x = ds["train"][0][0, 0].float()
    assert x[:, 8:].mean() > 200 and x[:, :8].mean() < 50  # white right, black left


def test_folder_decoding_shows_progress(tmp_path, capsys):
    _png_folder(tmp_path / "ds", ["a", "b"], 5)
    dataset.load(str(tmp_path / "ds"), 16, str(tmp_path / "c"))
    err = capsys.readouterr().err
    assert "decoding ds at 16 px" in err and "10/10" in err


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "xr"
    for k, c in enumerate(("normal", "sick")):
        (root / c).mkdir(parents=True)
        for i in range(6):
            a = np.linspace(0, 63840, 16 * 16).reshape(16, 16).astype(np.uint16) // (k + 1)
            Image.fromarray(a).save(root / c / f"{i}.png")  # PIL writes a 16-bit PNG (mode I;16)
    assert Image.open(root / "normal" / "0.png").mode.startswith("I;16")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = dataset.load(str(root), 16, str(tmp_path / "c"))
    assert any("scaled to 8 bits by their bit depth" in str(x.message) for x in w)
    x = torch.cat([ds[s][0][ds[s][1] == 0] for s in dataset.SPLITS]).float()
    assert (x == 255).float().mean() < 0.05 and abs(x.max().item() - 63840 / 257) <= 1.5  # not 99% white


@pytest.mark.parametrize("labels,message", [
    ({"train": [0, 1, 2 ** 40]}, "train_labels must be 0..K-1 with every class present; found 3 distinct labels up "
                                 "to 1099511627776, missing e.g. [2, 3]"),
    ({"train": [0, 0, 2]}, "missing e.g. [1]"),
    ({"train": [3, 3, 3]}, "train_labels has 1 class ([3]); need at least two"),
    ({"test": [0, 5, 1]}, "test_labels has label 5 out of range: train has labels 0..1"),
])
def test_labels_must_be_0_to_k_minus_1_with_two_classes_or_more(tmp_path, labels, message):
    arrays = make_arrays(n=(3, 3, 3))
    for split, y in labels.items():
        arrays[f"{split}_labels"] = np.asarray(y, dtype=np.int64)[:, None]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as e:
        dataset.load(str(tmp_path / "bad.npz"))
    assert message in str(e.value)


def test_data_may_be_an_npz_path_validated_like_the_official_files(tmp_path):
    np.savez(tmp_path / "mine.npz", **make_arrays(n=(20, 6, 6)))
    ds = dataset.load(str(tmp_path / "mine.npz"), 28, str(tmp_path / "unused"))
    assert ds["name"] == "mine" and len(ds["train"][1]) == 20 and ds["n_classes"] == 2
    again = dataset.load(str(tmp_path / "mine.npz"), 28)
    assert again["id"] == ds["id"]  # the content identity a resume compares
    with pytest.raises(FileNotFoundError, match="no such .npz file"):
        dataset.load(str(tmp_path / "missing.npz"))
    arrays = make_arrays(n=(20, 6, 6))
    del arrays["val_labels"]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(KeyError, match="missing key 'val_labels'"):
        dataset.load(str(tmp_path / "broken.npz"))
    with mock.patch.object(dataset, "find_medmnist", side_effect=AssertionError("looked up as a flag")):
        dataset.load(str(tmp_path / "mine.npz"))


def test_reproduce_refuses_epochs_zero_instead_of_using_the_presets(capsys):
    import reproduce
    for flag in ("--epochs", "--batch-size", "--jobs"):
        with pytest.raises(SystemExit, match=f"{flag} 0: expected a positive number"):
            reproduce.main([flag, "0"])


def test_a_class_missing_from_val_or_test_is_named_with_its_count(tmp_path):
    """A class of a single image stays in train (the carving keeps one there): val and test have no image of it,
    and a two-class AUC there is nan with accuracy 1.0. A warning names the class and its count (planted: silent)."""
    _png_folder(tmp_path / "ds", ["common"], 20)
    (tmp_path / "ds" / "rare").mkdir()
    Image.fromarray(np.full((12, 12), 200, np.uint8)).save(tmp_path / "ds" / "rare" / "only.png")
    with pytest.warns(UserWarning, match=r"no val image of class 'rare' \(1 images in all\); a two-class AUC on val "
                                         r"is undefined") as w:
        dataset.load(str(tmp_path / "ds"), 16, str(tmp_path / "c"))
    assert any("no test image of class 'rare'" in str(x.message) for x in w)


def test_resume_refuses_a_checkpoint_made_under_another_augmentation_default(tmp_path, monkeypatch):
    """The small-image jitter is common.AUGMENT's, not an Args field: when that default changes, the args of an
    interrupted run stay alike, and a resume would train the rest under the new recipe. The checkpoint keeps what
    --min-scale / --jitter / --blur resolved to; a checkpoint from before it did was made under AUGMENT_BEFORE."""
    import simclr
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen, path, log = torch.Generator(), str(tmp_path / "checkpoint.pt"), str(tmp_path / "metrics.jsonl")
    args = simclr.Args(size=28, resume=True)
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", 0.4)
    runs.save_state(path, args, "simclr", "data1", 3, model, opt, sched, gen)
    assert torch.load(path, weights_only=True)["augment"] == {"min_scale": 0.2, "jitter": 0.4, "blur": 0}
    assert runs.restore_state(path, args, "simclr", "data1", model, opt, sched, gen, log) == 3  # the same: resumes
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", 0.8)  # the default changes; the args do not
    with pytest.raises(SystemExit, match=r"augmentation jitter: 0\.4 in the checkpoint, 0\.8 now"):
        runs.restore_state(path, args, "simclr", "data1", model, opt, sched, gen, log)
    # given on the command line, the jitter does not depend on the table: resumes (planted: comparing the tables)
    runs.save_state(path, dataclasses.replace(args, jitter=0.4), "simclr", "data1", 3, model, opt, sched, gen)
    assert runs.restore_state(path, dataclasses.replace(args, jitter=0.4), "simclr", "data1", model, opt, sched, gen,
                              log) == 3
    # another --jitter is named once, as the Args field it is, not again as a changed default
    with pytest.raises(SystemExit) as e:
        runs.restore_state(path, dataclasses.replace(args, jitter=0.3), "simclr", "data1", model, opt, sched, gen, log)
    assert "jitter: 0.4 in the checkpoint, 0.3 now" in str(e.value) and "augmentation" not in str(e.value)
    # a checkpoint without "augment" (before 2026-12-05): AUGMENT_BEFORE's jitter 0.8 at <= 64 px
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("augment")
    ckpt["args"]["jitter"] = -1.0
    torch.save(ckpt, path)
    assert runs.restore_state(path, args, "simclr", "data1", model, opt, sched, gen, log) == 3  # AUGMENT: 0.8 now
    monkeypatch.setitem(common.AUGMENT["small"], "jitter", 0.4)
    with pytest.raises(SystemExit, match=r"augmentation jitter: 0\.8 in the checkpoint, 0\.4 now"):
        runs.restore_state(path, args, "simclr", "data1", model, opt, sched, gen, log)
    assert runs.augment_of(argparse.Namespace(size=28, seed=0)) == {}  # a script without augmentation flags
