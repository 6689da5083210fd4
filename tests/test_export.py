"""The way out of medssl: a run's backbone.pt, loaded in other code through torch.hub (hubconf.py, source="local"),
gives the features medssl's own evaluation computes; its keys are torchvision's; bad files get one line; and
`evaluate.py --backbone` scores it like the checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import dataset
import evaluate
import runs
from conftest import ROOT, make_arrays


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny SimCLR run (1 epoch) and its data folder."""
    tmp = tmp_path_factory.mktemp("export")
    np.savez(tmp / "pneumoniamnist.npz", **make_arrays(n=(48, 16, 16), seed=2))
    out = tmp / "run"
    cmd = [sys.executable, os.path.join(ROOT, "simclr.py"), "--data", "pneumonia", "--data-dir", str(tmp),
           "--epochs", "1", "--batch-size", "16", "--proj-hidden", "64", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"backbone for your own code: {out / 'backbone.pt'}" in r.stdout
    return tmp, out


def medssl_features(data_dir, out, split="test"):
    """What medssl's evaluation computes: the checkpoint's backbone, the train split's statistics, extract_features."""
    ds = dataset.load("pneumonia", 28, str(data_dir))
    ckpt = runs.load_checkpoint(str(out / "checkpoint.pt"))
    net, _ = common.make_backbone("resnet18", 1, 28)
    net.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")})
    mean, std = dataset.channel_stats(ds["train"][0])
    return ds, mean, std, evaluate.extract_features(net, ds[split][0], mean, std)


def test_hub_backbone_gives_medssl_features(trained):
    data_dir, out = trained
    ds, mean, std, expected = medssl_features(data_dir, out)
    net = torch.hub.load(ROOT, "backbone", source="local", weights=str(out / "backbone.pt"))
    assert isinstance(net, torchvision.models.ResNet) and isinstance(net.fc, torch.nn.Identity) and not net.training
    assert net.medssl["mean"] == pytest.approx(mean) and net.medssl["std"] == pytest.approx(std)
    assert net.medssl["method"] == "simclr" and net.medssl["size"] == 28 and net.medssl["stem"] == "small"
    images = ds["test"][0]  # uint8 (N, 1, 28, 28)
    with torch.no_grad():
        got = net(net.preprocess(images))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # PIL images (what a user's folder gives) at the trained size: the same batch, the same features
    pil = [Image.fromarray(x[0].numpy()) for x in images]
    assert torch.equal(net.preprocess(pil), net.preprocess(images))
    # keys: torchvision's own, nothing of medssl's heads, optimizer or RNG
    saved = torch.load(out / "backbone.pt", weights_only=True)
    assert set(saved["state_dict"]) == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}
    assert saved["commit"] and saved["data_id"] == ds["id"]


def test_hub_works_in_a_program_with_its_own_common_and_runs_modules(trained, monkeypatch):
    """torch.hub imports hubconf.py into the caller's program: a caller whose own modules are called `common`,
    `runs` or `dataset` (usual names in research code) must get medssl's backbone all the same (planted: hubconf
    importing medssl's common / runs by those names: AttributeError on the caller's module)."""
    import types
    for name in ("common", "runs", "dataset"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # the caller's modules, nothing medssl's
    monkeypatch.delitem(sys.modules, "hubconf", raising=False)
    _, out = trained
    net = torch.hub.load(ROOT, "backbone", source="local", weights=str(out / "backbone.pt"))
    x = net.preprocess(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert net.medssl["method"] == "simclr" and net(x).shape == (2, 512)


def test_hub_without_weights_and_preprocess_of_other_sizes():
    net = torch.hub.load(ROOT, "backbone", source="local", arch="resnet18", channels=3, size=64)
    assert net.conv1.in_channels == 3 and net.conv1.kernel_size == (3, 3) and net.medssl["method"] == "untrained"
    x = net.preprocess(torch.full((2, 3, 100, 80), 255, dtype=torch.uint8))  # resized to 64, (1 - 0.5) / 0.5 = 1
    assert x.shape == (2, 3, 64, 64) and torch.allclose(x, torch.ones_like(x))
    gray_net = torch.hub.load(ROOT, "backbone", source="local", channels=1, size=28)
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: a 1-channel backbone takes its luminance, ITU-R 601 as PIL's "L": 76
    assert torch.allclose(gray_net.preprocess(rgb), torch.full((1, 1, 28, 28), (76 / 255 - 0.5) / 0.5))
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 1, H, W\)"):
        gray_net.preprocess(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_bad_backbone_files_name_the_file(trained, tmp_path):
    _, out = trained
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a medssl backbone file \(a checkpoint\.pt: use the"):
        torch.hub.load(ROOT, "backbone", source="local", weights=str(out / "checkpoint.pt"))
    data = (out / "backbone.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable backbone file"):
        runs.load_backbone(str(tmp_path / "cut.pt"))
    saved = torch.load(out / "backbone.pt", weights_only=True)
    for name, edit, message in (("arch.pt", {"arch": "vgg"}, r"arch 'vgg' / stem 'small': expected"),
                                ("rgb.pt", {"in_channels": 3}, r"weights do not fit a resnet18 with 3 input channels"),
                                ("r50.pt", {"arch": "resnet50"}, r"weights do not fit a resnet50")):
        torch.save({**saved, **edit}, tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: {message}"):
            runs.load_backbone(str(tmp_path / name))


def test_evaluate_script_scores_the_backbone_like_the_checkpoint(trained):
    data_dir, out = trained
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--backbone", str(out / "backbone.pt"),
                        "--data-dir", str(data_dir)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = json.loads((out / "eval.json").read_text())
    res = json.loads((out / "results.json").read_text())  # the run's own evaluation of the same weights
    assert ev["method"] == "simclr" and ev["data"] == "pneumonia"
    for proto in ("knn", "linear"):
        assert ev[proto]["auc"] == pytest.approx(res[proto]["auc"], abs=1e-6)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--backbone", str(out / "checkpoint.pt")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode != 0 and "evaluate.py --backbone: " in r.stderr and "Traceback" not in r.stderr
