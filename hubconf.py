"""torch.hub entry points: a backbone pre-trained with medssl, as a plain torchvision ResNet, in other code.

    import torch
    net = torch.hub.load("path/to/medssl", "backbone", source="local", weights="runs/simclr-.../backbone.pt")
    x = net.preprocess(images)          # PIL images, uint8 arrays (H, W[, C]) or uint8 tensors -> (N, C, S, S) float
    features = net(x)                   # (N, 512) for a ResNet-18: feed them to your own head
Every run writes backbone.pt beside its checkpoint (runs.save_backbone): torchvision's key names, the stem, the
channel count, the trained image size and the input normalization, so net.preprocess gives the backbone what it
was trained on. With no weights: an untrained backbone of the given arch, channels and size (normalization 0.5/0.5).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

# Self-contained on purpose: torch.hub imports this file into the caller's program, where names like `common` or
# `runs` may already be the caller's own modules. medssl's code imports from here (runs.load_backbone, dataset).
dependencies = ["torch", "torchvision", "numpy", "PIL"]
BACKBONE_FORMAT = "medssl-backbone/1"
BACKBONE_KEYS = ("format", "state_dict", "arch", "in_channels", "size", "stem", "mean", "std", "method", "data",
                 "data_id", "commit")


def resnet(arch, channels, stem):
    """A torchvision ResNet with fc = Identity and medssl's stem: 'small' (3x3 stride 1, no max-pool: images <= 64
    px, what common.make_backbone trains) or 'imagenet' (torchvision's 7x7/2 + max-pool)."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    small = stem == "small"
    net.conv1 = nn.Conv2d(channels, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
    if small:
        net.maxpool = nn.Identity()
    return net


def load_backbone(path):
    """backbone.pt -> (torchvision ResNet with fc = Identity and the stored weights, in eval mode; its info dict
    without the state_dict). One ValueError naming the file for anything that is not a medssl backbone."""
    try:
        info = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad or truncated file
        raise ValueError(f"{path}: not a readable backbone file ({type(e).__name__}: {e})") from None
    missing = [k for k in BACKBONE_KEYS if not isinstance(info, dict) or k not in info]
    if missing or info.get("format") != BACKBONE_FORMAT:
        hint = " (a checkpoint.pt: use the backbone.pt beside it)" if isinstance(info, dict) and "model" in info else ""
        missing = missing or [f"format {BACKBONE_FORMAT}"]
        raise ValueError(f"{path}: not a medssl backbone file{hint}; missing {missing}")
    if info["arch"] not in ("resnet18", "resnet50") or info["stem"] not in ("small", "imagenet"):
        raise ValueError(f"{path}: arch {info['arch']!r} / stem {info['stem']!r}: expected resnet18 or resnet50, "
                         "small or imagenet")
    net = resnet(info["arch"], int(info["in_channels"]), info["stem"])
    fit = f"weights do not fit a {info['arch']} with {info['in_channels']} input channels and the {info['stem']} stem"
    try:
        result = net.load_state_dict(info["state_dict"], strict=False)
    except RuntimeError as e:  # a tensor of another shape (e.g. a 5x5 conv1, 3 channels for 1)
        raise ValueError(f"{path}: {fit}: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: {fit} (missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return net.eval(), {k: v for k, v in info.items() if k != "state_dict"}


def rgb8(im):
    """A PIL image as 8-bit RGB, as medssl's folder loader reads images: 16-bit ones (X-ray, MRI exports) scaled by
    their bit depth (x / 257), 32-bit integer and float ones by their own min..max (PIL's convert would clip them
    at 255); NaN or infinite pixels refused."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():  # a float TIFF with NaN or inf: no 8-bit image to make of it
            raise ValueError(f"{int((~np.isfinite(a)).sum())} NaN or infinite pixels")
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (a.min(), max(a.max(), a.min() + 1))
        im = Image.fromarray(np.round((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


class Preprocess:
    """Images -> the normalized float batch (N, C, S, S) the backbone was trained on: S = the trained size, C its
    channel count, (x / 255 - mean) / std per channel. PIL images and uint8 arrays are resized as medssl's folder
    loader does (PIL bilinear, from RGB; a 1-channel backbone takes the luminance of colour images); uint8 tensors
    (C, H, W) or (N, C, H, W) already of C channels are resized, if they must be, with antialiased bilinear."""

    def __init__(self, size, channels, mean, std):
        self.size, self.channels = int(size), int(channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _one(self, x):
        """One PIL image, uint8 array or (C, H, W) uint8 tensor -> (C, S, S) uint8, as dataset.load_folder reads."""
        if torch.is_tensor(x):
            return x
        im = x if isinstance(x, Image.Image) else Image.fromarray(np.asarray(x))
        a = np.asarray(rgb8(im).resize((self.size, self.size), Image.BILINEAR))  # (S, S, 3)
        if self.channels == 1:  # gray images are R = G = B: channel 0, as the loader keeps; colour: luminance
            same = (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
            a = a[..., :1] if same else np.asarray(Image.fromarray(a).convert("L"))[..., None]
        return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)  # a writable copy of PIL's buffer

    def __call__(self, images):
        if isinstance(images, (Image.Image, np.ndarray)) or (torch.is_tensor(images) and images.dim() == 3):
            images = [images]
        if not torch.is_tensor(images):  # a list of PIL images / arrays / (C, H, W) tensors
            images = torch.stack([self._one(x) for x in images])
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images: expected uint8 (N, {self.channels}, H, W), PIL images or uint8 arrays; got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.float() / 255
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std


def backbone(weights=None, arch="resnet18", channels=1, size=28):
    """A torchvision ResNet (fc = Identity, eval mode) with medssl's weights from `weights` (a run's backbone.pt),
    or untrained with the given arch, channels and size. Attributes: .preprocess (Preprocess for its input) and
    .medssl (what backbone.pt says: method, data, size, stem, mean, std, commit)."""
    if weights:
        try:
            net, info = load_backbone(weights)
        except ValueError as e:
            raise ValueError(f"torch.hub backbone: {e}") from None
    else:
        net = resnet(arch, channels, "small" if size <= 64 else "imagenet")
        info = {"arch": arch, "in_channels": channels, "size": size, "mean": [0.5] * channels,
                "std": [0.5] * channels, "method": "untrained"}
        net.eval()
    net.preprocess = Preprocess(info["size"], info["in_channels"], info["mean"], info["std"])
    net.medssl = info
    return net


def preprocess(weights=None, channels=1, size=28):
    """The Preprocess of a backbone.pt (or of an untrained backbone of this channel count and size) alone."""
    return backbone(weights, channels=channels, size=size).preprocess
