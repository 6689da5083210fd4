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
import torch.nn.functional as F
from PIL import Image

import common
import dataset
import runs

dependencies = ["torch", "torchvision", "numpy", "PIL"]


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
        a = np.asarray(dataset._to_rgb8(im).resize((self.size, self.size), Image.BILINEAR))  # (S, S, 3)
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
            net, info = runs.load_backbone(weights)
        except ValueError as e:
            raise ValueError(f"torch.hub backbone: {e}") from None
    else:
        net, _ = common.make_backbone(arch, channels, size)
        info = {"arch": arch, "in_channels": channels, "size": size, "mean": [0.5] * channels,
                "std": [0.5] * channels, "method": "untrained"}
        net.eval()
    net.preprocess = Preprocess(info["size"], info["in_channels"], info["mean"], info["std"])
    net.medssl = info
    return net


def preprocess(weights=None, channels=1, size=28):
    """The Preprocess of a backbone.pt (or of an untrained backbone of this channel count and size) alone."""
    return backbone(weights, channels=channels, size=size).preprocess
