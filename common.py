"""Plumbing shared by the method files: args, seeding, data, augmentation parameters, backbone, LR schedule,
checkpoints and logging. Nothing method-specific lives here: the losses, heads and loops are in the method files.
"""
import argparse
import concurrent.futures
import dataclasses
import errno
import glob
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image, UnidentifiedImageError

from csrc.augment import P, TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA, SOLARIZE
from csrc.augment import augment, check_params  # noqa: F401  (augment re-exported for the method files)

# ------------------------------------------------------------------------------------------------ args
def parse_args(cls, argv=None):
    """A dataclass -> argparse bridge: every field becomes --field-name with its type, default, and as help the
    comment that follows it in the source (so the Args class stays the one place that documents an option).
    Every field is then checked against RULES before any work starts; all bad fields are reported at once."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), flags=re.M))
    for f in dataclasses.fields(cls):
        flag, doc = "--" + f.name.replace("_", "-"), f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=f.default, help=doc)
    args = cls(**vars(parser.parse_args(argv)))
    errors = check_args(args)
    if errors:
        parser.error("\n  " + "\n  ".join(errors))  # usage + every bad field, exit code 2
    return args


# What each Args field may hold (every method file's fields; tests/test_common.py checks none is missing). The
# comparisons are written so that NaN fails them. --epochs 0 is refused: there is nothing to pre-train.
RULES = {
    "data": (lambda v: v != "", "a MedMNIST flag, a folder or an .npz file"),
    "size": (lambda v: 8 <= v <= 1024, "8..1024 pixels"),
    "arch": (lambda v: v in ("resnet18", "resnet50"), "resnet18 or resnet50"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 2, ">= 2 (batch norm and the losses need two images)"),
    "lr": (lambda v: 0 < v < math.inf, "> 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "0 <= seed < 2**63"),
    "train_subset": (lambda v: v >= 0, ">= 0 (0: the whole train split)"),
    "eval_every": (lambda v: v >= 1, ">= 1"),
    "finetune_epochs": (lambda v: v >= 0, ">= 0"),
    "min_scale": (lambda v: 0 <= v <= 1, "0 (by size) or a fraction in (0, 1]"),
    "jitter": (lambda v: v == -1 or 0 <= v <= 1, "-1 (by size) or 0..1"),
    "blur": (lambda v: v in (-1, 0, 1), "-1 (by size), 0 or 1"),
    "temperature": (lambda v: 0 < v < math.inf, "> 0"),
    "sigma": (lambda v: 0 < v < math.inf, "> 0"),
    "weighting": (lambda v: v in ("vmf", "none"), "vmf or none"),
    "compile": (lambda v: v in ("none", "default", "reduce-overhead", "max-autotune"),
                "none, default, reduce-overhead or max-autotune"),
    "ema_decay": (lambda v: 0 <= v <= 1, "0..1"),
    "lambd": (lambda v: 0 <= v < math.inf, ">= 0"),
    "scale_loss": (lambda v: 0 < v < math.inf, "> 0"),
    **{k: (lambda v: 0 <= v < math.inf, ">= 0") for k in ("sim_coeff", "std_coeff", "cov_coeff")},
    **{k: (lambda v: v >= 1, ">= 1") for k in ("proj_hidden", "proj_dim", "pred_hidden")},
    **{k: (lambda v: True, "any") for k in ("data_dir", "out", "resume", "overwrite", "fix_pred_lr", "host_data")},
}


def check_args(args):
    """One message per Args field that breaks its RULES entry, plus the cross-field rules."""
    errors = [f"--{k.replace('_', '-')} {v!r}: expected {RULES[k][1]}" for k, v in vars(args).items()
              if k in RULES and not RULES[k][0](v)]
    out = getattr(args, "out", "")
    if out and os.path.exists(out) and not os.path.isdir(out):
        errors.append(f"--out {out!r}: is a file, expected a run folder")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        errors.append("--resume and --overwrite: pick one (continue the run in --out, or replace it)")
    return errors


def launch(main, cls, method):
    """Parse and check the arguments, then main(args). Ctrl-C or SIGTERM end it with one line saying where it
    stopped and how to resume (exit code 130), not a traceback."""
    args = parse_args(cls)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (kill, a scheduler) becomes Ctrl-C
    try:
        main(args)
    except KeyboardInterrupt:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not interrupt the message
        out = run_dir(args, method)
        rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
        last = next((r for r in reversed(rows) if "step" in r), None)
        where = f"epoch {last['epoch'] + 1} (step {last['step'] + 1} of the run)" if last else "before the first step"
        ckpt = os.path.join(out, "checkpoint.pt")
        kept = (f"last checkpoint {ckpt} (epoch {torch.load(ckpt, mmap=True, weights_only=True)['epoch']})"
                if os.path.exists(ckpt) else "no checkpoint yet")
        print(f"\n{method}: interrupted at {where}; {kept}; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)


def get_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dir(args, method):
    name = os.path.basename(os.path.normpath(args.data)).removesuffix(".npz")
    return args.out or os.path.join("runs", f"{method}-{name}-{args.size}-s{args.seed}")


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "results.json", "eval.json")


def prepare_run(args, method):
    """The run folder, made ready: the temp files of a killed save removed; a folder that holds another run refused
    unless --resume (continue it) or --overwrite (delete its files first), so checkpoint, log and results of one
    folder always belong to one run. Returns (out, checkpoint path, metrics path)."""
    out = run_dir(args, method)
    if RANK == 0:  # torchrun: rank 0 checks and cleans the folder while the others wait at the barrier below
        _check_run_folder(out, args, method)
    barrier()
    return out, os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")


def _check_run_folder(out, args, method):
    os.makedirs(out, exist_ok=True)
    for tmp in glob.glob(os.path.join(glob.escape(out), "*.tmp")):
        if os.path.basename(tmp).rsplit(".", 2)[0] in RUN_FILES:
            os.remove(tmp)  # only what atomic_write makes of a run file: <name>.<random>.tmp
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if found and args.overwrite:
        for f in found:
            os.remove(os.path.join(out, f))
    elif found and not args.resume:
        raise SystemExit(f"{method}: {out} already holds a run ({', '.join(found)}). Pass --resume to continue it, "
                         f"--overwrite to replace it, or a new --out.")


# ------------------------------------------------------------------------------------------------ torchrun
# Under torchrun every process runs the same method file; these few helpers are all that differs. RANK and WORLD
# stay 0 and 1 in a plain `python simclr.py` run, where each of them is a no-op.
RANK, WORLD = 0, 1


def init_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group (NCCL on CUDA, gloo on the CPU) and
    take GPU LOCAL_RANK. Returns (rank, world size, device); without torchrun (0, 1, the one device)."""
    global RANK, WORLD
    if "RANK" not in os.environ:
        return 0, 1, get_device()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    return RANK, WORLD, device


def barrier():
    if WORLD > 1:
        dist.barrier()


def rank_slice(batch, rank=None, world=None):
    """This rank's share of a global batch: every rank draws the same permutation and augmentation params for the
    whole batch and keeps rows [rank * batch / world, (rank + 1) * batch / world), so N ranks see exactly the images
    and views one process would."""
    rank, world = RANK if rank is None else rank, WORLD if world is None else world
    if batch % world:
        raise SystemExit(f"--batch-size {batch} is the global batch: it must divide evenly over {world} ranks")
    return slice(rank * batch // world, (rank + 1) * batch // world)


class _Gather(torch.autograd.Function):
    """All ranks' rows in rank order. Backward: every rank's loss used every row, so the gradient of this rank's
    rows is the sum over ranks of the gradient at them (an all-reduce, then this rank's slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(WORLD)[RANK]


def gather(x):
    """torchrun: the rows of x from every rank, with gradients flowing back to each rank's own rows, so a loss over
    the global batch sees every rank's negatives and batch statistics. One process: x itself."""
    return _Gather.apply(x) if WORLD > 1 else x


def distribute(model):
    """torchrun on GPUs: batch norm over the global batch (SyncBatchNorm, which PyTorch provides on CUDA only; CPU
    ranks keep per-rank statistics). Converted under any torchrun (with one GPU it computes plain BN, but the
    1-GPU smoke run then covers the conversion). Without torchrun: model itself."""
    if dist.is_initialized() and next(model.parameters()).is_cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def average_gradients(model):
    """torchrun: every gradient replaced by its mean over the ranks (what DistributedDataParallel does), in one
    flat all-reduce after backward. With the same init and optimizer, every rank then takes the same step."""
    if WORLD == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= WORLD
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def broadcast_buffers(model):
    """torchrun: rank 0's buffers (BN running statistics) to every rank, as DDP's broadcast_buffers does, so the
    ranks hold identical models at each checkpoint (CPU ranks compute per-rank BN statistics)."""
    if WORLD > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


# ------------------------------------------------------------------------------------------------ data
# Official MedMNIST v3 files (Zenodo record 10519652): MD5 of <flag>.npz (28 px), <flag>_64/_128/_224.npz.
ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"
MEDMNIST_MD5 = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                  "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                   "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                   "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                 "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                       "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                    "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                    "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                   "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                    "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                    "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                    "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                    "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
}
ALIASES = {"pneumonia": "pneumoniamnist", "breast": "breastmnist"}
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def default_data_dir():
    return os.environ.get("MEDSSL_DATA_DIR", "data")


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, md5):
    """Stream url to a temp file with a progress bar, check the MD5, then rename: no half-written file is left."""
    from tqdm import tqdm

    def write(tmp):
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = md5sum(tmp)
        if got != md5:
            raise ValueError(f"downloaded {url} has MD5 {got}, expected the official {md5}; the file was deleted")
    atomic_write(path, write)


def find_medmnist(flag, size, data_dir):
    """Path of <flag>[_size].npz in data_dir or data_dir/<flag>/, downloading it if it is in neither place."""
    if flag not in MEDMNIST_MD5:
        raise ValueError(f"--data {flag!r}: not a folder and not a MedMNIST 2D flag; known: "
                         f"{sorted(ALIASES) + sorted(MEDMNIST_MD5)}")
    if size not in SIZES:
        raise ValueError(f"--size {size}: MedMNIST files exist at {SIZES}")
    file = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    for path in (os.path.join(data_dir, file), os.path.join(data_dir, flag, file)):
        if os.path.exists(path):
            return path
    url, path = ZENODO.format(file=file), os.path.join(data_dir, file)
    try:
        download(url, path, MEDMNIST_MD5[flag][SIZES.index(size)])
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{file} is not in {data_dir!r} (or {os.path.join(data_dir, flag)!r}) and the download "
                                f"failed ({e}). Download {url} and put it at {path}, or point --data-dir / "
                                f"MEDSSL_DATA_DIR at a folder that holds it.") from e
    return path


def check_splits(arrays, source):
    """Validate a {train,val,test}_{images,labels} mapping; return uint8 N x C x H x W tensors and int64 labels."""
    out = {}
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                raise KeyError(f"{source}: missing key {key!r}; expected {[f'{s}_{k}' for s in SPLITS for k in ('images', 'labels')]}")
        x, y = np.asarray(arrays[f"{split}_images"]), np.asarray(arrays[f"{split}_labels"])
        if x.dtype != np.uint8:
            raise TypeError(f"{source}: {split}_images has dtype {x.dtype}, expected uint8")
        if x.ndim == 3:
            x = x[:, None]  # gray N x H x W -> N x 1 x H x W
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W
        else:
            raise ValueError(f"{source}: {split}_images has shape {x.shape}, expected N x H x W or N x H x W x C (C=1,3)")
        if len(x) == 0:
            raise ValueError(f"{source}: split {split!r} is empty")
        if y.ndim == 2 and y.shape[1] > 1:
            raise ValueError(f"{source}: {split}_labels has shape {y.shape}: multi-label data is not supported")
        y = y.reshape(-1) if y.ndim == 2 else y
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{source}: {split}_labels has shape {y.shape}, expected ({len(x)},) or ({len(x)}, 1)")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{source}: {split}_labels has dtype {y.dtype}, expected integers")
        if y.min() < 0:
            raise ValueError(f"{source}: {split}_labels has negative label {y.min()}")
        out[split] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
    # classes are 0..K-1, every one of them in train (checked on the distinct labels: a stray 2**40 allocates nothing)
    present = np.unique(out["train"][1].numpy())
    if len(present) < 2:
        raise ValueError(f"{source}: train_labels has {len(present)} class ({present.tolist()}); need at least two")
    if present[-1] != len(present) - 1:
        missing = np.setdiff1d(np.arange(len(present) + 1), present)[:5].tolist()
        raise ValueError(f"{source}: train_labels must be 0..K-1 with every class present; found {len(present)} "
                         f"distinct labels up to {present[-1]}, missing e.g. {missing}")
    n_classes = len(present)
    for split in ("val", "test"):
        if int(out[split][1].max()) >= n_classes:
            raise ValueError(f"{source}: {split}_labels has label {int(out[split][1].max())} out of range: "
                             f"train has labels 0..{n_classes - 1}")
    shapes = {tuple(out[s][0].shape[1:]) for s in SPLITS}
    if len(shapes) != 1:
        raise ValueError(f"{source}: splits have different image shapes {shapes}")
    return out, n_classes


def load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable npz file (truncated or corrupt?): {e}") from e


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _list_class_folder(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected {root}/CLASS/*.png|jpg|...)")
    files = {}
    for c in classes:
        fs = sorted(os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTS))
        if not fs:
            raise ValueError(f"{os.path.join(root, c)}: class folder has no images ({'/'.join(IMAGE_EXTS)})")
        files[c] = fs
    return files


def stratified_sample(labels, frac, gen, leave_one=False):
    """Seeded per-class sample of indices: (chosen, rest), round(frac * n_c) chosen per class and at least one;
    leave_one: never a whole class (a split carved from train keeps >= 1 of each class there). Shared by the
    folder splits and evaluate.label_subset."""
    chosen, rest = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = max(1, round(frac * len(idx)))
        n = min(n, len(idx) - 1) if leave_one else n
        chosen.append(idx[:n]), rest.append(idx[n:])
    return torch.cat(chosen).sort().values, torch.cat(rest).sort().values


def _to_rgb8(im):
    """A PIL image as 8-bit RGB. 16-bit images (X-ray, MRI exports) are scaled by their bit depth (x / 257), 32-bit
    integer and float ones by their own min..max; PIL's convert would clip them at 255 instead."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (a.min(), max(a.max(), a.min() + 1))
        warnings.warn(f"{im.mode} images are scaled to 8 bits " + ("by their bit depth (x / 257)" if lo == 0 and
                      hi == 65535 else "by each image's range"), stacklevel=3)  # shown once per place
        im = Image.fromarray(np.round((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_folder(root, size, data_dir, seed=0):
    """Paper layouts PATH/{train,val,test}/CLASS/* or PATH/CLASS/*, resized to size x size -> (arrays, source).

    The arrays are cached as <data_dir>/<folder>_<size>_s<seed>_<key>.npz so the second run starts at once. The key
    hashes the folder's absolute path, size, seed and every file's name, size and mtime: another folder of the same
    name, or an added, removed or changed image, makes a new cache. A read-only data_dir only costs the cache.
    """
    from tqdm import tqdm
    root = os.path.abspath(root)
    has_splits = os.path.isdir(os.path.join(root, "train"))
    per_split = {s: _list_class_folder(os.path.join(root, s)) for s in SPLITS
                 if os.path.isdir(os.path.join(root, s))} if has_splits else {"train": _list_class_folder(root)}
    key = hashlib.sha1(f"{root}|{size}|{seed}".encode())
    for files in per_split.values():
        for f in (f for fs in files.values() for f in fs):
            st = os.stat(f)
            key.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = os.path.join(data_dir, f"{os.path.basename(root)}_{size}_s{seed}_{key.hexdigest()[:12]}.npz")
    if os.path.exists(cache):
        return load_npz(cache), cache
    classes = sorted(set().union(*per_split.values()))

    def decode(f):  # PIL decodes and resizes outside the GIL, so threads use every core
        try:
            with Image.open(f) as im:
                return np.asarray(_to_rgb8(im).resize((size, size), Image.BILINEAR))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{f}: unreadable image file ({e})") from e
    imgs, labels = {}, {}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool, \
            tqdm(total=sum(len(fs) for files in per_split.values() for fs in files.values()), unit="img",
                 desc=f"decoding {os.path.basename(root)} at {size} px (cached after this run)") as bar:
        for split, files in per_split.items():
            paths = [f for fs in files.values() for f in fs]
            decoded = []
            for x in pool.map(decode, paths):
                decoded.append(x)
                bar.update()
            imgs[split] = np.stack(decoded)
            labels[split] = np.asarray([classes.index(c) for c, fs in files.items() for _ in fs], dtype=np.int64)
    # carve the missing splits from train, seeded and stratified (paper: 10% val; 20% test where absent)
    gen = torch.Generator().manual_seed(seed)
    for split, frac in (("test", 0.2), ("val", 0.1)):
        if split not in imgs:
            carve, keep = (t.numpy() for t in stratified_sample(torch.from_numpy(labels["train"]), frac, gen, True))
            imgs[split], labels[split] = imgs["train"][carve], labels["train"][carve]
            imgs["train"], labels["train"] = imgs["train"][keep], labels["train"][keep]
    # keep 1 channel when every image is gray (R == G == B), as X-rays are; else RGB
    gray = all((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all() for x in imgs.values())
    arrays = {f"{s}_images": imgs[s][..., 0] if gray else imgs[s] for s in SPLITS}
    arrays.update({f"{s}_labels": labels[s] for s in SPLITS})

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, classes=np.asarray(classes), **arrays)
    try:
        atomic_write(cache, write)
    except OSError as e:
        warnings.warn(f"could not cache {root} as {cache} ({e}); it will be decoded again next time", stacklevel=2)
    return arrays, root


def load_dataset(data, size=28, data_dir=None, seed=0, device="cpu", host=False):
    """data: a MedMNIST flag, a folder (load_folder) or a .npz file in the MedMNIST layout. Returns
    {'train'|'val'|'test': (uint8 N x C x H x W, int64 N) on device, 'n_classes', 'channels', 'name', 'id'};
    'id' hashes the arrays themselves, so a resumed run can tell the same data under another name or path.
    host (--host-data), or images over half the GPU's free memory: the images stay in pinned CPU memory and each
    batch is copied over (labels go to the device), so the dataset's size is not limited by the GPU's memory."""
    data_dir = data_dir or default_data_dir()
    if RANK > 0:  # torchrun: rank 0 downloads or decodes (and caches) first; the others then read its files
        barrier()
    if os.path.isdir(data):
        arrays, path = load_folder(data, size, data_dir, seed)
    elif data.endswith(".npz"):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"--data {data}: no such .npz file")
        arrays, path = load_npz(data), data
    else:
        path = find_medmnist(ALIASES.get(data, data), size, data_dir)
        arrays = load_npz(path)
    if RANK == 0:
        barrier()
    splits, n_classes = check_splits(arrays, path)
    if splits["train"][0].shape[-1] != size or splits["train"][0].shape[-2] != size:
        raise ValueError(f"{path}: images are {tuple(splits['train'][0].shape[-2:])}, expected --size {size}")
    digest = hashlib.sha1()
    for s in SPLITS:
        for t in splits[s]:
            digest.update(str(tuple(t.shape)).encode() + t.numpy().tobytes())
    device = torch.device(device)
    nbytes = sum(x.numel() for x, _ in splits.values())
    if device.type == "cuda" and not host and nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        host = True
        print(f"{path}: {nbytes / 2**30:.1f} GiB of images, over half the GPU's free memory: kept in pinned host memory")
    on_host = host and device.type == "cuda"
    ds = {s: (x.pin_memory() if on_host else x.to(device), y.to(device)) for s, (x, y) in splits.items()}
    name = os.path.basename(os.path.normpath(data)).removesuffix(".npz")
    ds.update(n_classes=n_classes, channels=ds["train"][0].shape[1], name=name, id=digest.hexdigest()[:16])
    return ds


def channel_stats(images, chunk=4096):
    """Per-channel mean and std of uint8 images in [0, 1] units, for the normalize step (float64 sums over chunks
    of images, so a large set is never copied whole as floats)."""
    s = s2 = 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double().div(255).transpose(0, 1).flatten(1)  # (C, n*H*W)
        s, s2 = s + x.sum(1), s2 + x.square().sum(1)
    n = images[:1].numel() // images.shape[1] * len(images)  # values per channel
    mean = s / n
    std = ((s2 - n * mean ** 2) / (n - 1)).clamp(min=0).sqrt()  # sample std, as torch.std
    return mean.tolist(), std.clamp(min=1e-3).tolist()


# ------------------------------------------------------------------------------------------------ augmentation params
@dataclasses.dataclass
class ViewProbs:
    """Per-view probabilities of the SimCLR recipe (BYOL passes asymmetric ones)."""
    jitter: float = 0.8
    gray: float = 0.2
    blur: float = 0.5
    solarize: float = 0.0


# Augmentation strength by image size. The ImageNet recipe (crops down to 8% of the area, Gaussian blur, jitter 0.4)
# erases most of a 28 px image; the small-image values were chosen on the val split (results/ABLATION.md). On gray
# images (X-rays, ultrasound) "colour" jitter is brightness and contrast only: saturation, hue and grayscale are
# identities on one channel.
AUGMENT = {"small": dict(min_scale=0.2, jitter=0.8, blur=0), "large": dict(min_scale=0.08, jitter=0.4, blur=1)}


def augmentation(size, views, min_scale=0.0, jitter=-1.0, blur=-1):
    """The sample_params keywords of a run: the method's views, crop scale and jitter strength, from --min-scale,
    --jitter and --blur where given (> 0, >= 0, >= 0), else AUGMENT's values for the size (small: <= 64 px)."""
    d = AUGMENT["small" if size <= 64 else "large"]
    s = d["jitter"] if jitter < 0 else jitter
    views = tuple(dataclasses.replace(v, blur=v.blur if (d["blur"] if blur < 0 else blur) else 0.0) for v in views)
    return dict(views=views, scale=(min_scale or d["min_scale"], 1.0), strength=(s, s, s, s / 4))


def sample_params(B, H, W, C, gen, views, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), strength=(0.4, 0.4, 0.4, 0.1)):
    """Draw the (V, B, P) params tensor (layout: csrc/augment.py) from `gen`, one ViewProbs per view.

    Crop boxes follow torchvision's RandomResizedCrop: up to 10 tries of area ~ U(scale) * H * W and log-aspect
    ~ U(log ratio); the first box that fits wins; else a centre crop clamped to the ratio range.
    """
    V = len(views)
    M, tries = V * B, 10
    u = lambda *shape: torch.rand(*shape, generator=gen)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u(M, tries))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u(M, tries)
    w = torch.sqrt(area * torch.exp(logr)).round()
    h = torch.sqrt(area / torch.exp(logr)).round()
    ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)  # index of the first box that fits, -1 if none
    # fallback: whole image, clamped to the ratio range, centred (torchvision's behaviour after 10 misses)
    if W / H < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    pick = lambda t, fb: torch.where(first >= 0, t.gather(1, first.clamp(min=0)[:, None])[:, 0], torch.tensor(float(fb)))
    h, w = pick(h, fh), pick(w, fw)
    top = torch.where(first >= 0, (u(M) * (H - h + 1)).floor(), torch.tensor(float((H - fh) // 2)))
    left = torch.where(first >= 0, (u(M) * (W - w + 1)).floor(), torch.tensor(float((W - fw) // 2)))
    p = torch.zeros(V, B, P)
    p[..., TOP], p[..., LEFT], p[..., HEIGHT], p[..., WIDTH] = (t.view(V, B) for t in (top, left, h, w))
    p[..., FLIP] = (u(V, B) < 0.5).float()
    bs, cs, ss, hs = strength
    p[..., BRIGHT] = 1 - bs + 2 * bs * u(V, B)
    p[..., CONTRAST] = 1 - cs + 2 * cs * u(V, B)
    p[..., SAT] = 1 - ss + 2 * ss * u(V, B)
    p[..., HUE] = hs * (2 * u(V, B) - 1)
    p[..., SIGMA] = 0.1 + 1.9 * u(V, B)
    coin = u(V, B, 4)  # one coin per view per optional step, always drawn so the stream does not depend on p
    for v, pr in enumerate(views):
        p[v, :, JITTER] = (coin[v, :, 0] < pr.jitter).float()
        p[v, :, GRAY] = (coin[v, :, 1] < (pr.gray if C == 3 else 0.0)).float()
        p[v, :, BLUR] = (coin[v, :, 2] < pr.blur).float()
        p[v, :, SOLARIZE] = (coin[v, :, 3] < pr.solarize).float()
    check_params(p, H, W)  # on the CPU, before the copy to the device (bad scale/ratio/strength arguments)
    return p


# ------------------------------------------------------------------------------------------------ backbone, optimizer
def make_backbone(arch, channels, size):
    """torchvision ResNet with its first conv taking `channels`; a 3x3 stride-1 stem without max-pool for <= 64 px.
    Returns (backbone, feature_dim); the classification head is replaced by Identity, so backbone(x) is h.
    (The ImageNet-weights variant, which keeps torchvision's stem, is evaluate.imagenet_backbone.)"""
    if arch not in ("resnet18", "resnet50"):
        raise ValueError(f"--arch {arch!r}: expected resnet18 or resnet50")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if size <= 64:  # a 7x7/2 conv + max-pool would shrink 28 px to 7 px before the first block
        net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return net, dim


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is scaled by a layer-wise trust ratio (You et al. 2017,
    arXiv 1708.03888), as the BYOL and Barlow Twins papers train. For a weight w with gradient g:

        trust = eta ||w|| / (||g|| + wd ||w||)           with clip_lr: trust = min(trust / lr, 1)   (solo-learn)
        buf <- momentum buf + trust (g + wd w);   w <- w - lr buf

    so a layer moves by about eta of its own norm per step whatever its gradient's scale (with clip_lr: never
    faster than plain SGD at the scheduled lr). 1-D parameters (biases, BN weights) are excluded from weight decay
    and adaptation, as in those papers: a plain momentum-SGD step.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the torch.optim contract (L-BFGS-style callers); the method files pass none
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if w.ndim > 1:  # weight matrices and conv kernels; biases and norm parameters skip this
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
                    if group["clip_lr"]:
                        trust = (trust / max(lr, 1e-12)).clamp(max=1.0)
                    # a layer whose weight or gradient is all zero has no ratio to take: plain step
                    g = g.add(w, alpha=wd) * torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0)
                buf = self.state[w].get("momentum_buffer")
                if buf is None:
                    buf = self.state[w]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                w.add_(buf, alpha=-lr)
        return loss


def warmup_cosine(optimizer, warmup_steps, total_steps, fixed_groups=()):
    """Linear warmup to the base LR, then cosine decay to 0, stepped once per optimizer step.

    Param groups listed in fixed_groups keep their base LR throughout (SimSiam's predictor).
    """
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    lambdas = [(lambda step: 1.0) if i in fixed_groups else f for i in range(len(optimizer.param_groups))]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# ------------------------------------------------------------------------------------------------ checkpoints, logs
_UMASK = os.umask(0o022)  # the process umask; reading it means setting it, so put it straight back
os.umask(_UMASK)


def _write_failed_for_space(e):
    """A full disk or the file-size limit (ulimit -f): OSError ENOSPC/EFBIG/EDQUOT, or torch.save's zip writer
    failing mid-file ("[enforce fail at inline_container.cc] unexpected pos ...")."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "inline_container" in str(e)


def atomic_write(path, write):
    """write(tmp) into a temp file beside path, then rename it over path: a reader never sees a half-written file,
    and a failed or killed write leaves the previous file as it was. Temp files are named <name>.<random>.tmp
    (prepare_run removes those a killed save left). The file gets the mode a plain open() would (mkstemp: 0600)."""
    if RANK > 0:  # torchrun: rank 0 alone writes files
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not _write_failed_for_space(e):
            raise
        kept = f"the previous {name} is intact" if os.path.exists(path) else "nothing was written"
        raise OSError(errno.ENOSPC, f"no space left on device (or over the file-size limit) while writing {path}; "
                                    f"{kept} ({type(e).__name__}: {e})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def log_jsonl(path, row):
    if RANK > 0:  # torchrun: rank 0 alone writes files
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of a metrics.jsonl ([] if there is none); a last line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def trim_log(path, start_epoch):
    """Keep the metrics rows of epochs before start_epoch (on resume: the epochs the checkpoint contains)."""
    if os.path.exists(path):
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r.get("epoch", 0) < start_epoch))


STATE_KEYS = ("method", "args", "data_id", "epoch", "model", "optimizer", "scheduler", "gen", "torch_rng")
# Args fields that do not change what is trained or measured (compile: the same math, compiled), so a
# resumed run may give other values for these.
# The data is compared by its content (ds["id"]), so --data pneumonia and --data path/to/pneumoniamnist.npz agree.
FREE_ON_RESUME = ("data", "data_dir", "out", "eval_every", "resume", "overwrite", "compile", "host_data")


def load_checkpoint(path, device="cpu", keys=("args", "model")):
    """torch.load(weights_only=True) of a medssl checkpoint, with a clear error for anything else."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable medssl checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a medssl checkpoint (missing keys {missing})")
    return ckpt


def save_state(path, args, method, data_id, epoch, model, optimizer, scheduler, gen):
    """The checkpoint after `epoch` epochs: all a run needs to continue exactly (weights, optimizer and schedule,
    both RNG streams), and the args and data identity that restore_state compares. torchrun: every rank calls it;
    rank 0's BN statistics go to every rank first (as DDP's broadcast_buffers), then rank 0 writes."""
    broadcast_buffers(model)
    state = {"method": method, "args": dataclasses.asdict(args), "data_id": data_id, "epoch": epoch,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "gen": gen.get_state(), "torch_rng": torch.get_rng_state()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def restore_state(path, args, method, data_id, model, optimizer, scheduler, gen, log_path):
    """With --resume and a checkpoint at path: load it into the objects and return its epoch, after checking that it
    is this method's with the same configuration (every Args field but FREE_ON_RESUME, and the same data). Else 0.
    The log keeps only the epochs the checkpoint contains (an epoch cut short is re-run)."""
    start = 0
    if args.resume and os.path.exists(path):
        try:
            ckpt = load_checkpoint(path, next(model.parameters()).device, STATE_KEYS)
        except ValueError as e:
            raise SystemExit(f"{method}: --resume: {e}") from None
        now, was = {**dataclasses.asdict(args), "method": method}, {**ckpt["args"], "method": ckpt["method"]}
        diff = [f"{k}: {was.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(now) | set(was))
                if k not in FREE_ON_RESUME and was.get(k) != now.get(k)]
        if ckpt["data_id"] != data_id:
            diff.append(f"data: {was.get('data')!r} (content {ckpt['data_id']}) in the checkpoint, {args.data!r} "
                        f"(content {data_id}) now")
        if diff:
            raise SystemExit(f"{method}: --resume: {path} was made with another configuration:\n  " + "\n  ".join(diff)
                             + "\nRerun with the checkpoint's values, or use --overwrite / a new --out for a new run.")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["gen"].cpu())  # RNG states are CPU tensors even when the model is on a GPU
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        start = ckpt["epoch"]
        print(f"resumed from {path} at epoch {start}" + (f" (rank {RANK})" if WORLD > 1 else ""))
    trim_log(log_path, start)
    return start


def take_subset(ds, n, seed):
    """--train-subset N: a seeded random N-image subset of the train split (quick runs)."""
    x, y = ds["train"]
    if not 0 < n <= len(x):
        raise ValueError(f"--train-subset {n}: expected 1..{len(x)} (the train split size)")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    ds["train"] = (x[idx.to(x.device)], y[idx.to(y.device)])
