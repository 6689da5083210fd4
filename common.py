"""Plumbing shared by the method files: args, seeding, data, augmentation parameters, backbone, LR schedule,
checkpoints and logging. Nothing method-specific lives here: the losses, heads and loops are in the method files.
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torchvision

from csrc.augment import P, TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA, SOLARIZE
from csrc.augment import augment, blur_kernel_size  # noqa: F401  (re-exported for the method files)

# ------------------------------------------------------------------------------------------------ args
def parse_args(cls, argv=None):
    """A dataclass -> argparse bridge: every field becomes --field-name with its type, default, and as help the
    comment that follows it in the source (so the Args class stays the one place that documents an option)."""
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
    return cls(**vars(parser.parse_args(argv)))


def get_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dir(args, method):
    name = os.path.basename(os.path.normpath(args.data))
    return args.out or os.path.join("runs", f"{method}-{name}-{args.size}-s{args.seed}")


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
    """Stream url to path.part with a progress bar, check the MD5, then rename: no half-written file is left."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = md5sum(tmp)
        if got != md5:
            raise ValueError(f"downloaded {url} has MD5 {got}, expected the official {md5}; the file was deleted")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def check_splits(arrays, source, multi_label_ok=False):
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
    n_classes = int(out["train"][1].max()) + 1
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


def _stratified_split(labels, frac, gen):
    """Seeded per-class split of indices: (kept, carved) with round(frac * n_c) (>= 1 when n_c >= 2) carved per class."""
    keep, carve = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = max(1, round(frac * len(idx))) if len(idx) >= 2 else 0
        carve.append(idx[:n]), keep.append(idx[n:])
    return torch.cat(keep).sort().values, torch.cat(carve).sort().values


def load_folder(root, size, data_dir, seed=0):
    """Paper layouts PATH/{train,val,test}/CLASS/* or PATH/CLASS/*, resized to size x size -> (arrays, source).

    The arrays are cached as <data_dir>/<folder>_<size>_s<seed>.npz so the second run starts at once; a read-only
    data_dir (CI mounts the shared data so) only costs the cache, with a warning.
    """
    from PIL import Image, UnidentifiedImageError
    root = os.path.normpath(root)
    cache = os.path.join(data_dir, f"{os.path.basename(root)}_{size}_s{seed}.npz")
    if os.path.exists(cache):
        return load_npz(cache), cache
    has_splits = os.path.isdir(os.path.join(root, "train"))
    per_split = {s: _list_class_folder(os.path.join(root, s)) for s in SPLITS
                 if os.path.isdir(os.path.join(root, s))} if has_splits else {"train": _list_class_folder(root)}
    classes = sorted(set().union(*per_split.values()))
    imgs, labels = {}, {}
    for split, files in per_split.items():
        xs, ys = [], []
        for c, fs in files.items():
            for f in fs:
                try:
                    with Image.open(f) as im:
                        xs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
                except (UnidentifiedImageError, OSError, ValueError) as e:
                    raise ValueError(f"{f}: unreadable image file ({e})") from e
                ys.append(classes.index(c))
        imgs[split], labels[split] = np.stack(xs), np.asarray(ys, dtype=np.int64)
    # carve the missing splits from train, seeded and stratified (paper: 10% val; 20% test where absent)
    gen = torch.Generator().manual_seed(seed)
    for split, frac in (("test", 0.2), ("val", 0.1)):
        if split not in imgs:
            keep, carve = (t.numpy() for t in _stratified_split(torch.from_numpy(labels["train"]), frac, gen))
            imgs[split], labels[split] = imgs["train"][carve], labels["train"][carve]
            imgs["train"], labels["train"] = imgs["train"][keep], labels["train"][keep]
    # keep 1 channel when every image is gray (R == G == B), as X-rays are; else RGB
    gray = all((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all() for x in imgs.values())
    arrays = {f"{s}_images": imgs[s][..., 0] if gray else imgs[s] for s in SPLITS}
    arrays.update({f"{s}_labels": labels[s] for s in SPLITS})
    tmp = None
    try:
        os.makedirs(data_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=data_dir)
        os.close(fd)
        np.savez(tmp, classes=np.asarray(classes), **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not cache {root} as {cache} ({e}); it will be decoded again next time", stacklevel=2)
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return arrays, root


def load_dataset(data, size=28, data_dir=None, seed=0, device="cpu"):
    """Returns {'train'|'val'|'test': (uint8 N x C x H x W, int64 N) on device, 'n_classes', 'channels', 'name'}."""
    data_dir = data_dir or default_data_dir()
    if os.path.isdir(data):
        arrays, path = load_folder(data, size, data_dir, seed)
    else:
        path = find_medmnist(ALIASES.get(data, data), size, data_dir)
        arrays = load_npz(path)
    splits, n_classes = check_splits(arrays, path)
    ds = {s: (x.to(device), y.to(device)) for s, (x, y) in splits.items()}
    if ds["train"][0].shape[-1] != size or ds["train"][0].shape[-2] != size:
        raise ValueError(f"{path}: images are {tuple(ds['train'][0].shape[-2:])}, expected --size {size}")
    ds.update(n_classes=n_classes, channels=ds["train"][0].shape[1], name=os.path.basename(os.path.normpath(data)))
    return ds


def channel_stats(images):
    """Per-channel mean and std of uint8 images in [0, 1] units, for the normalize step."""
    x = images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return x.mean(1).tolist(), x.std(1).clamp(min=1e-3).tolist()


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
    return p


# ------------------------------------------------------------------------------------------------ backbone, optimizer
def make_backbone(arch, channels, size, imagenet=None):
    """torchvision ResNet with its first conv taking `channels`; a 3x3 stride-1 stem without max-pool for <= 64 px.

    imagenet: a state dict from evaluate.imagenet_weights(). The network then keeps the architecture those
    weights were trained with (7x7/2 stem + max-pool) and sees its input resized to `size`, e.g. 224 (as in
    MedMNIST v2's "ResNet (224)" protocol); for 1 channel the first conv is summed over RGB, which gives a gray
    image the response the RGB filters give the same image with three equal channels.
    Returns (backbone, feature_dim); the classification head is replaced by Identity, so backbone(x) is h.
    """
    if arch not in ("resnet18", "resnet50"):
        raise ValueError(f"--arch {arch!r}: expected resnet18 or resnet50")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if imagenet is not None:
        if channels not in (1, 3):
            raise ValueError(f"ImageNet weights take 1 or 3 channels; the data has {channels}")
        w = imagenet["conv1.weight"]  # (64, 3, 7, 7)
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        net.load_state_dict({**imagenet, "conv1.weight": w.sum(1, keepdim=True) if channels == 1 else w})
        return nn.Sequential(nn.Upsample(size=(size, size), mode="bilinear", align_corners=False), net), dim
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
def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable medssl checkpoint ({type(e).__name__}: {e})") from e


def write_text(path, text):
    """Write to path.tmp, then rename: a reader never sees a half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def log_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_log(path, start_epoch):
    """On resume, drop metrics rows of epochs that the checkpoint does not contain (they will be re-run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) < start_epoch]
    write_text(path, "".join(keep))


def take_subset(ds, n, seed):
    """--train-subset N: a seeded random N-image subset of the train split (quick runs)."""
    x, y = ds["train"]
    if not 0 < n <= len(x):
        raise ValueError(f"--train-subset {n}: expected 1..{len(x)} (the train split size)")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].to(x.device)
    ds["train"] = (x[idx], y[idx])
