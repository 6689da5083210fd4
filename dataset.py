"""Where the images come from: the official MedMNIST files (downloaded and MD5-checked on first use), any .npz in
their layout, or a folder in the paper's layouts (decoded once, then cached). Every source is validated and ends
as uint8 tensors on the training device: a batch is an index slice.
"""
import concurrent.futures
import glob
import hashlib
import os
import time
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import common
import dicom
import hubconf
import runs

# ------------------------------------------------------------------------------------------------ MedMNIST files
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
    runs.atomic_write(path, write)


def find_medmnist(flag, size, data_dir):
    """Path of <flag>[_size].npz in data_dir or data_dir/<flag>/, downloading it if it is in neither place."""
    if flag not in MEDMNIST_MD5:
        raise ValueError(f"--data {flag!r}: not a folder and not a MedMNIST 2D flag; known: "
                         f"{sorted(ALIASES) + sorted(MEDMNIST_MD5)}")
    if size not in SIZES:
        raise ValueError(f"--size {size}: MedMNIST files exist at {SIZES}")
    if os.path.isfile(data_dir):  # else the download's makedirs fails with "File exists", naming neither
        raise ValueError(f"--data-dir / MEDSSL_DATA_DIR {data_dir}: is a file, expected the folder that holds (or "
                         f"receives) the MedMNIST npz files")
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


# ------------------------------------------------------------------------------------------------ checks
def check_splits(arrays, source):
    """Validate a {train,val,test}_{images,labels} mapping; return uint8 N x C x H x W tensors and int64 labels."""
    out = {}
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                expected = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
                raise KeyError(f"{source}: missing key {key!r}; expected {expected}")
        x, y = np.asarray(arrays[f"{split}_images"]), np.asarray(arrays[f"{split}_labels"])
        if x.dtype != np.uint8:
            raise TypeError(f"{source}: {split}_images has dtype {x.dtype}, expected uint8")
        if x.ndim == 3:
            x = x[:, None]  # gray N x H x W -> N x 1 x H x W
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W
        else:
            raise ValueError(f"{source}: {split}_images has shape {x.shape}, "
                             f"expected N x H x W or N x H x W x C (C=1,3)")
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
    names = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(k) for k in range(n_classes)]
    for split in ("val", "test"):  # a tiny class can end up in train only (a folder's carving keeps it there)
        absent = sorted(set(range(n_classes)) - set(out[split][1].unique().tolist()))
        if absent:
            counts = ", ".join(f"{names[k]!r} ({sum(int((out[s][1] == k).sum()) for s in SPLITS)} images in all)"
                               for k in absent)
            warnings.warn(f"{source}: no {split} image of class {counts}; " + (
                f"a two-class AUC on {split} is undefined (nan): add images of it" if n_classes == 2 else
                f"the {split} AUC averages the other classes only"), stacklevel=3)
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
    except MemoryError as e:  # a header claiming more images than memory holds (corrupt, or not a MedMNIST file)
        raise ValueError(f"{path}: an array in it does not fit in memory ({e}); corrupt, or not a MedMNIST-size "
                         "file") from e


# ------------------------------------------------------------------------------------------------ image folders
FOLDER_READER = 2  # in the folder cache's key: bumped when decoding changes (2: EXIF orientation applied)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")


def _list_class_folder(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected {root}/CLASS/*.png|jpg|dcm|...)")
    files = {}
    for c in classes:
        folder = os.path.join(root, c)
        fs = sorted(os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith(".") and
                    (f.lower().endswith(IMAGE_EXTS) or dicom.is_dicom(os.path.join(folder, f))))
        if not fs:
            raise ValueError(f"{os.path.join(root, c)}: class folder has no images ({'/'.join(IMAGE_EXTS)}, or "
                             "DICOM files without an extension)")
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
    """A PIL image as 8-bit RGB (hubconf.rgb8, which a hub user's preprocessing shares), saying once per place
    when 16-bit or float images are scaled to 8 bits."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        warnings.warn(f"{im.mode} images are scaled to 8 bits " + ("by their bit depth (x / 257)" if
                      im.mode.startswith("I;16") else "by each image's range"), stacklevel=3)
    return hubconf.rgb8(im)


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
    key = hashlib.sha1(f"{root}|{size}|{seed}|{FOLDER_READER}".encode())
    for files in per_split.values():
        for f in (f for fs in files.values() for f in fs):
            st = os.stat(f)
            key.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = os.path.join(data_dir, f"{os.path.basename(root)}_{size}_s{seed}_{key.hexdigest()[:12]}.npz")
    for tmp in glob.glob(glob.escape(cache) + ".*.tmp"):  # a cache write killed midway (a live one takes seconds)
        if time.time() - os.path.getmtime(tmp) > 600:
            os.remove(tmp)
    if os.path.exists(cache):
        try:
            return load_npz(cache), cache
        except ValueError as e:  # truncated or corrupt: decode the folder again, as if there were no cache
            warnings.warn(f"{e}; decoding {root} again", stacklevel=2)
            os.remove(cache)
    classes = sorted(set().union(*per_split.values()))
    if has_splits and set(classes) - set(per_split.get("train", {})):  # labels are the train classes' indices
        raise ValueError(f"{root}: class folder(s) {', '.join(sorted(set(classes) - set(per_split['train'])))} "
                         f"not in {os.path.join(root, 'train')}: every class needs train images")

    def decode(f):  # PIL decodes and resizes outside the GIL, so threads use every core
        if dicom.is_dicom(f):  # read_dicom's errors already name the file
            return np.asarray(Image.fromarray(dicom.read_dicom(f)).convert("RGB").resize((size, size), Image.BILINEAR))
        try:
            with Image.open(f) as im:  # as a viewer shows it: a camera's EXIF orientation applied
                return np.asarray(_to_rgb8(ImageOps.exif_transpose(im)).resize((size, size), Image.BILINEAR))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{f}: unreadable image file ({type(e).__name__}: {e})") from e
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
    arrays.update({f"{s}_labels": labels[s] for s in SPLITS}, classes=np.asarray(classes))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    try:
        runs.atomic_write(cache, write)
    except OSError as e:
        warnings.warn(f"could not cache {root} as {cache} ({e}); it will be decoded again next time", stacklevel=2)
    return arrays, root


# ------------------------------------------------------------------------------------------------ the dataset
def load(data, size=28, data_dir=None, seed=0, device="cpu", host=False, subset=0):
    """data: a MedMNIST flag, a folder (load_folder) or a .npz file in the MedMNIST layout; subset N > 0: a seeded
    N-image subset of the train split (take_subset; 'id' still names the whole data). Returns
    {'train'|'val'|'test': (uint8 N x C x H x W, int64 N) on device, 'n_classes', 'channels', 'name', 'id'};
    'id' hashes the arrays themselves, so a resumed run can tell the same data under another name or path.
    host (--host-data), or images over half the GPU's free memory: the images stay in pinned CPU memory and each
    batch is copied over (labels go to the device), so the dataset's size is not limited by the GPU's memory.
    A bad source raises ValueError, TypeError, KeyError or OSError whose message names it, marked bad_data: the
    method scripts and evaluate.py print that message as one line (one_line)."""
    try:
        return _load(data, size, data_dir, seed, device, host, subset)
    except (ValueError, TypeError, KeyError, OSError) as e:
        e.bad_data = True
        raise


def one_line(e):
    """The message of an error dataset.load marked bad_data (KeyError's str() would quote it); else None."""
    if not getattr(e, "bad_data", False):
        return None
    if isinstance(e, OSError) and e.strerror:  # the file and the message, without "[Errno 40]"
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _load(data, size, data_dir, seed, device, host, subset):
    data_dir = data_dir or default_data_dir()
    if common.RANK > 0:  # torchrun: rank 0 downloads or decodes (and caches) first; the others then read its files
        common.barrier()
    if os.path.isdir(data):
        arrays, path = load_folder(data, size, data_dir, seed)
    elif data.endswith(".npz"):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"--data {data}: no such .npz file")
        arrays, path = load_npz(data), data
    else:
        path = find_medmnist(ALIASES.get(data, data), size, data_dir)
        arrays = load_npz(path)
    if common.RANK == 0:
        common.barrier()
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
        print(f"{path}: {nbytes / 2**30:.1f} GiB of images, over half the GPU's free memory: "
              "kept in pinned host memory")
    on_host = host and device.type == "cuda"
    ds = {s: (x.pin_memory() if on_host else x.to(device), y.to(device)) for s, (x, y) in splits.items()}
    name = os.path.basename(os.path.normpath(data)).removesuffix(".npz")
    ds.update(n_classes=n_classes, channels=ds["train"][0].shape[1], name=name, id=digest.hexdigest()[:16])
    if subset:
        take_subset(ds, subset, seed)
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


def take_subset(ds, n, seed):
    """--train-subset N: a seeded random N-image subset of the train split (quick runs)."""
    x, y = ds["train"]
    if not 0 < n <= len(x):
        raise ValueError(f"--train-subset {n}: expected 1..{len(x)} (the train split size)")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    ds["train"] = (x[idx.to(x.device)], y[idx.to(y.device)])
    missing = sorted(set(range(ds["n_classes"])) - set(ds["train"][1].unique().tolist()))
    if missing:  # known before training: the probes need every class (one image alone has no feature spread)
        raise ValueError(f"--train-subset {n}: the seeded subset holds no train image of class(es) "
                         f"{', '.join(map(str, missing))} of {ds['n_classes']}; the probes need every class: take "
                         "a larger subset")
