"""Benchmark the two-view augmentation and one SimCLR step; every ratio is measured side by side in this one run.

    python bench.py                      # CPU (and CUDA when present), 28/64/224 px, C=1 and 3, batch 256
    python bench.py --sizes 64 --batch 128 --out bench-small.json

Augmentation contenders, each producing two normalized float32 views of every image in the batch:
  op         torch.ops.medssl.augment (csrc/), one call for the whole batch
  reference  csrc.augment.augment_reference, batched PyTorch ops
  tv-loop    torchvision.transforms.v2 applied per image in a Python loop (what a DataLoader worker does)
GB/s counts the uint8 input read once plus the float32 views written, against a plain tensor copy measured here.
End to end (--e2e): SimCLR training images/s on PneumoniaMNIST-28 and BreastMNIST-64, medssl's loop (data on the
device, the op, bf16 + channels_last on CUDA; optionally the backbone torch.compile'd) against the conventional
pipeline (Dataset + torchvision.transforms.v2 per image in DataLoader workers, pinned memory, non-blocking copies),
same model, loss, LARS and batch; with each step's FLOPs (torch.utils.flop_counter) and the achieved FLOP/s
against a dense matmul measured in the same run.
Results are printed as a table and written to bench.json with the device, threads and torch version.
"""
import argparse
import os
import platform
import statistics
import time

import torch
import torch.utils.flop_counter
import torchvision.transforms.v2 as T

import common
import dataset
import runs
import simclr
from csrc.augment import augment_reference, blur_kernel_size, load_op


def timeit(fn, device, repeats, warmup=1):
    """Median wall time of fn() in seconds, after warmup, synchronizing around each call on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, mb=256):
    """GB/s of dst.copy_(src) (read + write) for a large float tensor on device: the roofline for a memory-bound op."""
    src = torch.rand(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeats=5)
    return 2 * src.numel() * 4 / t / 1e9


def torchvision_pipeline(size, C, mean, std, scale=(0.08, 1.0), strength=0.4, blur=True):
    """The SimCLR recipe with torchvision's per-image transforms (uint8 tensor in, normalized float out); defaults:
    the paper's ImageNet recipe; recipe_pipeline gives medssl's recipe for a size."""
    s = strength
    jitter = T.ColorJitter(s, s, s, s / 4) if C == 3 else T.ColorJitter(s, s)
    steps = [T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(),
             T.RandomApply([jitter], p=0.8)]
    if C == 3:
        steps.append(T.RandomGrayscale(p=0.2))
    if blur:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)


def recipe_pipeline(size, C, mean, std):
    """torchvision's version of what the method files draw for this size (common.AUGMENT)."""
    recipe = common.AUGMENT["small" if size <= 64 else "large"]
    return torchvision_pipeline(size, C, mean, std, (recipe["min_scale"], 1.0), recipe["jitter"], bool(recipe["blur"]))


def bench_augment(device, sizes, channels, B, repeats, contenders):
    rows = []
    op = load_op()
    view = common.ViewProbs()
    for size in sizes:
        for C in channels:
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (B, C, size, size), generator=g, dtype=torch.uint8).to(device)
            params = common.sample_params(B, size, size, C, g, views=(view, view)).to(device)
            mean, std, k = [0.5] * C, [0.25] * C, blur_kernel_size(size)
            tv = torchvision_pipeline(size, C, mean, std)
            fns = {"op": lambda: op(images, params, size, mean, std, k),
                   "reference": lambda: augment_reference(images, params, size, mean, std, k),
                   "tv-loop": lambda: [torch.stack([tv(im) for im in images]) for _ in range(2)]}
            nbytes = images.numel() + 2 * images.numel() * 4  # uint8 in, two float32 views out (same size)
            res = {}
            for name in contenders:
                reps = 1 if (name != "op" and size >= 224) else repeats  # the slow paths at 224 px: one timed call
                t = timeit(fns[name], device, reps)
                res[name] = t
                rows.append({"device": device.type, "size": size, "channels": C, "batch": B, "impl": name,
                             "us_per_batch": t * 1e6, "images_per_s": B / t, "views_per_s": 2 * B / t,
                             "GB_per_s": nbytes / t / 1e9})
            for r in rows[-len(contenders):]:
                r["op_speedup"] = r["us_per_batch"] / (res["op"] * 1e6)
    return rows


def bench_step(device, size, B, repeats):
    """simclr.py's step (simclr_step) fed by the method files' params -> augment sequence (medssl_views), and the
    augmentation's share of it: the augmentation timed alone over the share of the whole step it is part of."""
    images = torch.randint(0, 256, (B, 1, size, size), dtype=torch.uint8, device=device)
    step = simclr_step(device, 1, size, B)
    views = medssl_views(images, size, [0.5], [0.25], device)
    idx = torch.arange(B, device=device)
    t_step = timeit(lambda: step(*views(idx)), device, repeats)
    t_aug = timeit(lambda: views(idx), device, max(repeats, 5))
    return {"device": device.type, "size": size, "batch": B, "step_s": t_step, "images_per_s": B / t_step,
            "augment_s": t_aug, "augment_share": t_aug / t_step}


# ------------------------------------------------------------------------------------------------ end to end
class TwoViews(torch.utils.data.Dataset):
    """The conventional pipeline's Dataset: the same uint8 arrays, two torchvision views per image."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


def simclr_step(device, C, size, B, compile_mode="none", layout=torch.channels_last):
    """simclr.py's training step, built from its own parts and defaults (simclr.Args: backbone, projector widths,
    optimizer and its LR for a batch of B, weight decay, temperature; bf16 autocast on CUDA, channels_last):
    returns step(x1, x2) -> loss. The one step every timing here uses. compile_mode: none, or a torch.compile mode
    for the backbone; layout: the memory format of weights and views (contiguous, to measure NCHW against NHWC)."""
    args = simclr.Args()
    backbone, dim = common.make_backbone(args.arch, C, size)
    projector = simclr.Projector(dim, args.proj_hidden, args.proj_dim)
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projector}).to(device)
    model = model.to(memory_format=layout)
    if compile_mode != "none":
        backbone.compile(mode=compile_mode)
    opt = common.make_optimizer(args.optimizer, model.parameters(), args.lr * B / 256, args.weight_decay)

    def step(x1, x2):
        x = torch.cat([x1, x2]).contiguous(memory_format=layout)  # both views in one call, as simclr.py
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = projector(backbone(x))
        loss = simclr.loss_fn(*z.float().chunk(2), args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    step.model, step.optimizer = model, opt  # for the test that this is simclr.py's step
    return step


def medssl_views(images, size, mean, std, device, seed=0):
    """The method files' params -> augment sequence on uint8 images held on the device: views(idx) -> (x1, x2),
    simclr.py's views for this size (common.augmentation), params drawn on the CPU from a seeded generator."""
    C = images.shape[1]
    aug = common.augmentation(size, simclr.VIEWS)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the method files

    def views(idx):
        params = common.sample_params(len(idx), size, size, C, gen, **aug).to(device, non_blocking=True)
        return common.augment(images[idx], params, size, mean, std, dtype=dtype)
    return views


def bench_layouts(device, size, B, rounds):
    """The training step (simclr_step: ResNet-18, B images = 2B views, forward + backward + LARS) with weights and
    views in the contiguous NCHW layout and in channels_last (NHWC), the two timed in alternation in this one
    process so that the machine's load changes hit both alike. The method files use channels_last on every device
    because it wins here. Returns the median seconds per step of each, steps/s and the ratio."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(B, 1, size, size, generator=g).to(device) for _ in range(2))
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    steps = {name: simclr_step(device, 1, size, B, layout=fmt) for name, fmt in layouts.items()}
    times = {name: [] for name in layouts}
    for step in steps.values():
        step(x1, x2)  # warm-up: allocator, oneDNN primitive caches
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timeit(lambda: step(x1, x2), device, repeats=1, warmup=0))
    row = {"device": device.type, "size": size, "batch": B, "rounds": rounds}
    for name, t in times.items():
        row[f"{name}_s"] = statistics.median(t)
        row[f"{name}_steps_per_s"] = 1 / row[f"{name}_s"]
    row["channels_last_speedup"] = row["contiguous_s"] / row["channels_last_s"]
    return row


def matmul_tflops(device):
    """Measured dense matmul throughput (bf16 on CUDA, float32 on the CPU): the 'peak' a step's FLOP/s is put
    against, measured here rather than taken from a data sheet."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timeit(lambda: a @ b, device, repeats=5) / 1e12


def bench_end_to_end(device, name, images, B, steps, workers, compile_modes):
    """images/s of SimCLR training, medssl's loop vs the conventional DataLoader pipeline, same model and batch."""
    N, C, _, size = images.shape
    B = min(B, N)
    mean, std = dataset.channel_stats(images)
    rows = []
    # medssl: the whole uint8 set on the device, index slices, params drawn on the CPU, the fused op
    views = medssl_views(images.to(device), size, mean, std, device)
    gen = torch.Generator().manual_seed(0)
    for mode in compile_modes:
        step = simclr_step(device, C, size, B, mode)
        perm = torch.randperm(N, generator=gen).to(device)

        def medssl_step(i):
            return step(*views(perm[(i * B) % (N - B + 1):][:B]))
        t0 = time.perf_counter()
        medssl_step(0)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t = timeit(lambda: [medssl_step(i) for i in range(steps)], device, repeats=1, warmup=1) / steps
        with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
            medssl_step(0)
        rows.append({"device": device.type, "data": name, "size": size, "batch": B, "pipeline": "medssl",
                     "compile": mode, "workers": 0, "step_s": t, "images_per_s": B / t, "epoch_s": N // B * t,
                     "first_step_s": first, "step_TFLOP": fc.get_total_flops() / 1e12})
    # conventional: Dataset + torchvision v2 per image in DataLoader workers, pinned memory, non-blocking copies
    step = simclr_step(device, C, size, B)
    for w in workers:
        loader = torch.utils.data.DataLoader(
            TwoViews(images, recipe_pipeline(size, C, mean, std)), batch_size=B, shuffle=True, drop_last=True,
            num_workers=w, pin_memory=device.type == "cuda", persistent_workers=w > 0,
            prefetch_factor=4 if w else None)

        def batches():
            while True:
                yield from loader
        it = batches()

        def loader_step():
            x1, x2 = next(it)
            return step(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True))
        t = timeit(lambda: [loader_step() for _ in range(steps)], device, repeats=1, warmup=1) / steps
        rows.append({"device": device.type, "data": name, "size": size, "batch": B, "pipeline": "dataloader",
                     "compile": "none", "workers": w, "step_s": t, "images_per_s": B / t, "epoch_s": N // B * t})
        del it, loader
    best = rows[0]["images_per_s"]
    for r in rows:
        r["medssl_speedup"] = best / r["images_per_s"]
    return rows


def profile_step(device, size, B, steps=10):
    """torch.profiler over `steps` medssl SimCLR steps: where the time goes (the top ops) and, on CUDA, the share
    of the wall time the GPU spends in kernels (busy); the rest is launch gaps and host work."""
    from torch.profiler import ProfilerActivity, profile
    images = torch.randint(0, 256, (B, 1, size, size), dtype=torch.uint8, device=device)
    step, views = simclr_step(device, 1, size, B), medssl_views(images, size, [0.5], [0.25], device)
    idx = torch.arange(B, device=device)

    def one():
        step(*views(idx))
    for _ in range(3):
        one()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        wall = timeit(lambda: [one() for _ in range(steps)], device, repeats=1, warmup=0)
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    return {"device": device.type, "size": size, "batch": B, "step_ms": wall / steps * 1e3,
            "gpu_busy": kernel_us / (wall * 1e6) if device.type == "cuda" else None,
            "top": events.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                row_limit=12)}


def e2e_data(spec, data_dir):
    """PneumoniaMNIST-28 / BreastMNIST-64 train images from data_dir, else random images of the same shape."""
    flag, size, n = {"pneumonia": ("pneumoniamnist", 28, 4708), "breast64": ("breastmnist", 64, 546)}[spec]
    try:
        return dataset.load(flag, size, data_dir)["train"][0], f"{flag}-{size}"
    except (OSError, ValueError):
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), f"random-{size} (n={n})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 224])
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-size", type=int, default=None, help="image side for the SimCLR step (default: 28 CPU, 64 CUDA)")
    ap.add_argument("--step-batch", type=int, default=256)
    ap.add_argument("--layout-rounds", type=int, default=5, help="alternating timings of the step in NCHW and "
                    "channels_last (bench_layouts; 0: skip)")
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--e2e", nargs="*", default=["pneumonia", "breast64"], choices=["pneumonia", "breast64"],
                    help="end-to-end comparison on these datasets (none: skip)")
    ap.add_argument("--e2e-batch", type=int, default=None, help="images per step (default: 256 CUDA, 64 CPU)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="timed steps per pipeline (default: 20 CUDA, 3 CPU)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="DataLoader worker counts to compare (default: every CPU core; on CUDA also 4 and 8)")
    ap.add_argument("--compile", nargs="+", default=None, help="medssl step variants: none and torch.compile modes "
                    "of the backbone, e.g. default reduce-overhead (default: none on the CPU; all three on CUDA)")
    ap.add_argument("--data-dir", default=None, help="where the npz files are (default: $MEDSSL_DATA_DIR or ./data)")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="profile the medssl step at these sizes")
    ap.add_argument("--out", default="bench.json")
    cli = ap.parse_args()
    os.environ["MEDSSL_REQUIRE_OP"] = "1"  # a benchmark of the fallback would be a lie: fail instead
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cuda_device": None, "augment": [], "step": [],
              "copy_GB_per_s": {}, "e2e": [], "matmul_TFLOPs": {}, "layouts": []}
    for dev in cli.devices:
        device = torch.device(dev)
        if dev == "cuda":
            report["cuda_device"] = torch.cuda.get_device_name()
        report["copy_GB_per_s"][dev] = copy_bandwidth(device)
        contenders = ["op", "reference"] + (["tv-loop"] if dev == "cpu" else [])
        report["augment"] += bench_augment(device, cli.sizes, cli.channels, cli.batch, cli.repeats, contenders)
        step_size = cli.step_size or (64 if dev == "cuda" else 28)
        step_repeats = max(1, cli.repeats // 2 if dev == "cpu" else cli.repeats)
        report["step"].append(bench_step(device, step_size, cli.step_batch, step_repeats))
        if cli.layout_rounds:
            report["layouts"].append(bench_layouts(device, step_size, cli.step_batch, cli.layout_rounds))
        cuda = dev == "cuda"
        report["matmul_TFLOPs"][dev] = matmul_tflops(device)
        cores = os.cpu_count()
        workers = cli.workers or sorted({cores} | ({4, 8} if cuda else set()))
        compile_modes = cli.compile or (["none", "default", "reduce-overhead"] if cuda else ["none"])
        report.setdefault("profile", [])
        report["profile"] += [profile_step(device, s, cli.e2e_batch or (256 if cuda else 16)) for s in cli.profile]
        for spec in cli.e2e:
            images, name = e2e_data(spec, cli.data_dir)
            report["e2e"] += bench_end_to_end(device, name, images, cli.e2e_batch or (256 if cuda else 64),
                                              cli.e2e_steps or (20 if cuda else 3), workers, compile_modes)

    print(f"torch {report['torch']}, {report['threads']} CPU threads, CUDA device: {report['cuda_device']}")
    print("copy bandwidth GB/s: " + ", ".join(f"{d} {v:.1f}" for d, v in report["copy_GB_per_s"].items()))
    print(f"{'dev':4s} {'px':>4s} {'C':>2s} {'impl':10s} {'us/batch':>12s} {'img/s':>10s} {'views/s':>11s} "
          f"{'GB/s':>7s} {'% copy':>7s} {'op x':>7s}")
    for r in report["augment"]:
        print(f"{r['device']:4s} {r['size']:4d} {r['channels']:2d} {r['impl']:10s} {r['us_per_batch']:12.0f} "
              f"{r['images_per_s']:10.0f} {r['views_per_s']:11.0f} {r['GB_per_s']:7.2f} "
              f"{100 * r['GB_per_s'] / report['copy_GB_per_s'][r['device']]:6.1f}% {r['op_speedup']:7.1f}")
    for s in report["step"]:
        print(f"SimCLR step ({s['device']}, ResNet-18, {s['size']} px, batch {s['batch']}): {s['step_s'] * 1e3:.1f} ms, "
              f"{s['images_per_s']:.0f} img/s; augmentation {s['augment_s'] * 1e3:.2f} ms = "
              f"{100 * s['augment_share']:.2g}% of the step")
    for r in report["layouts"]:
        print(f"training step ({r['device']}, ResNet-18, {r['size']} px, batch {r['batch']}, median of {r['rounds']} "
              f"alternating rounds): contiguous {r['contiguous_steps_per_s']:.3f} steps/s, channels_last "
              f"{r['channels_last_steps_per_s']:.3f} steps/s: channels_last x{r['channels_last_speedup']:.2f}")
    if report["e2e"]:
        print(f"end to end, SimCLR ResNet-18 (images/s; 'x' = the fastest medssl variant's images/s over this row's):")
        for r in report["e2e"]:
            peak = report["matmul_TFLOPs"][r["device"]]
            flops = (f", {r['step_TFLOP'] / r['step_s']:.2f} TFLOP/s = {100 * r['step_TFLOP'] / r['step_s'] / peak:.0f}% "
                     f"of matmul, first step {r['first_step_s']:.1f} s") if "step_TFLOP" in r else ""
            what = f"medssl ({r['compile']})" if r["pipeline"] == "medssl" else f"DataLoader, {r['workers']} workers"
            print(f"  {r['device']:4s} {r['data']:22s} batch {r['batch']:3d} {what:28s} {r['images_per_s']:9.0f} img/s, "
                  f"epoch {r['epoch_s']:7.1f} s, x{r['medssl_speedup']:.2f}{flops}")
    for p in report.get("profile", []):
        busy = f", GPU busy {100 * p['gpu_busy']:.0f}% of the wall time" if p["gpu_busy"] is not None else ""
        print(f"profile ({p['device']}, {p['size']} px, batch {p['batch']}): {p['step_ms']:.1f} ms per step{busy}\n{p['top']}")
    runs.write_json(cli.out, report)
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
