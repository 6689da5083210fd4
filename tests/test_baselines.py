"""Issue 5's baselines: ImageNet weights (file, hub cache, offline error, bad files), the 1-channel
conv1 against torchvision on an RGB copy, the supervised baseline (reproduce.py: test_reproduce.py, test_report.py)."""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
import dataset
import evaluate
from conftest import make_arrays


@pytest.fixture
def weights_file(tmp_path):
    """A torchvision resnet18 state dict (seeded random values stand in for the ImageNet ones) saved like theirs."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():  # non-trivial BN statistics, so a wrongly loaded buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18-test.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_gray_backbone_equals_torchvision_on_an_rgb_copy(weights_file):
    path, ref = weights_file
    net, dim = evaluate.imagenet_backbone("resnet18", 1, 64, evaluate.imagenet_weights("resnet18", str(path)))
    ref.fc = torch.nn.Identity()
    net.eval(), ref.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # conv1 summed over RGB on a gray image == the RGB conv1 on three equal channels
        want = ref(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1))
        got = net(x)
    assert dim == 512 and got.shape == (3, 512)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    rgb, _ = evaluate.imagenet_backbone("resnet18", 3, 64, evaluate.imagenet_weights("resnet18", str(path)))
    assert torch.equal(rgb[1].conv1.weight, ref.conv1.weight)


def test_weights_from_the_hub_cache_and_the_offline_error(weights_file, tmp_path, monkeypatch):
    path, ref = weights_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    with pytest.raises(FileNotFoundError, match="--weights PATH") as e:
        evaluate.imagenet_weights("resnet18", download=False)
    assert url in str(e.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded .*no network.*--weights PATH"):
        evaluate.imagenet_weights("resnet18")
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    w = evaluate.imagenet_weights("resnet18")  # found in the cache: no download asked for
    assert torch.equal(w["layer4.1.bn2.running_var"], ref.state_dict()["layer4.1.bn2.running_var"])
    assert not any(k.startswith("fc.") for k in w)


def test_bad_weights_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt.pth: could not load"):
        evaluate.imagenet_weights("resnet18", str(corrupt))
    other = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), other)
    with pytest.raises(ValueError, match="r50.pth: not torchvision resnet18 weights"):
        evaluate.imagenet_weights("resnet18", str(other))
    with pytest.raises(ValueError, match="ImageNet weights take 1 or 3 channels"):
        evaluate.imagenet_backbone("resnet50", 2, 64, evaluate.imagenet_weights("resnet50", str(other)))


def test_evaluate_script_imagenet(weights_file, tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(96, 24, 48), seed=3))
    path, _ = weights_file
    res = evaluate.main(["--data", "pneumonia", "--data-dir", str(tmp_path), "--init", "imagenet", "--weights",
                         str(path), "--imagenet-size", "32", "--out", str(tmp_path / "imn.json")])
    assert res["method"] == "imagenet" and res["linear"]["auc"] > 0.9  # brightness classes: easy for any features
    with pytest.raises(SystemExit, match="--init imagenet: .*missing.pth: could not load"):
        evaluate.main(["--data", "pneumonia", "--data-dir", str(tmp_path), "--init", "imagenet", "--weights",
                       str(tmp_path / "missing.pth")])


def test_embedding_is_the_top_two_principal_components():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 5, generator=g) * torch.tensor([5.0, 0.1, 3.0, 0.1, 0.1])  # variance along dims 0 and 2
    e = evaluate.embed_2d(f, torch.arange(200) % 2, n=150)
    xy = torch.tensor(e["xy"], dtype=torch.float64)
    assert xy.shape == (150, 2) and len(e["y"]) == 150
    idx = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:150].sort().values
    centred = f[idx].double() - f[idx].double().mean(0)
    for col, dim in ((0, 0), (1, 2)):  # up to sign, PC1 ~ feature 0 and PC2 ~ feature 2
        corr = torch.corrcoef(torch.stack([xy[:, col], centred[:, dim]]))[0, 1]
        assert abs(corr) > 0.99


def test_training_with_labels_stops_on_a_non_finite_loss(tmp_path):
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays(n=(32, 8, 8), seed=1))
    ds = dataset.load("pneumonia", 28, str(tmp_path))
    mean, std = dataset.channel_stats(ds["train"][0])
    net, _ = common.make_backbone("resnet18", 1, 28)
    with pytest.raises(FloatingPointError, match="cross-entropy loss is (nan|inf).*lower learning rate"):
        evaluate.finetune(net, torch.nn.Linear(512, 2), ds, mean, std, epochs=3, lr=1e30, backbone_lr_scale=1.0,
                          batch_size=16)
