"""bench.py runs end to end on a tiny configuration and writes the report the README's table is made from."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--sizes", "28", "--channels", "1", "3", "--batch", "8",
                        "--repeats", "1", "--step-batch", "8", "--devices", "cpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["threads"] >= 1 and rep["torch"] and rep["copy_GB_per_s"]["cpu"] > 0
    impls = {(a["size"], a["channels"], a["impl"]) for a in rep["augment"]}
    assert impls == {(28, c, i) for c in (1, 3) for i in ("op", "reference", "tv-loop")}
    assert all(a["images_per_s"] > 0 and a["op_speedup"] > 0 for a in rep["augment"])
    assert 0 < rep["step"][0]["augment_share"] < 1
    assert "SimCLR step" in r.stdout and os.path.exists(out)
