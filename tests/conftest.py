"""Shared fixtures: the repo root on sys.path and small synthetic MedMNIST-format data in temporary folders."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_arrays(n=(64, 16, 16), size=28, channels=1, n_classes=2, seed=0, label_shape="col"):
    """MedMNIST-like arrays whose class is visible (class k images are brighter), so kNN/probes can learn it."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "val", "test"), n):
        y = np.arange(count) % n_classes
        rng.shuffle(y)
        shape = (count, size, size) if channels == 1 else (count, size, size, channels)
        x = rng.integers(0, 120, size=shape) + (y * 100 // max(1, n_classes - 1)).reshape(-1, *[1] * (len(shape) - 1))
        out[f"{split}_images"] = np.clip(x, 0, 255).astype(np.uint8)
        out[f"{split}_labels"] = (y[:, None] if label_shape == "col" else y).astype(np.uint8)
    return out


@pytest.fixture
def npz_dir(tmp_path):
    """A data dir holding a synthetic pneumoniamnist.npz (28 px, 1 channel, labels (N, 1))."""
    np.savez(tmp_path / "pneumoniamnist.npz", **make_arrays())
    return tmp_path


@pytest.fixture
def real_data_dir():
    d = os.environ.get("MEDSSL_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))
    if not os.path.exists(os.path.join(d, "pneumoniamnist", "pneumoniamnist.npz")):
        pytest.skip(f"real data not found under {d} (set MEDSSL_DATA_DIR to ../shared/data)")
    return d


def kill_during_epoch(cmd, out, epoch, env):
    """Start cmd, SIGKILL it once out/metrics.jsonl has a row of 0-based `epoch` (it is training that epoch)."""
    def epochs(log):  # the epochs of its rows; a row still being written is skipped
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                yield json.loads(line).get("epoch")
            except json.JSONDecodeError:
                pass
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and epoch not in epochs(out / "metrics.jsonl"):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
