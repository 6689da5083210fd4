"""Plumbing the method files share for the training step: the Args parser and its checks, the device and the
torchrun helpers, augmentation parameters (the op is csrc/augment.py), the backbone, LARS and the LR schedule.
Where the images come from is dataset.py; a run's folder, checkpoints and logs are runs.py. Nothing method-specific
lives here: the losses, heads and loops are in the method files.
"""
import argparse
import dataclasses
import functools
import inspect
import math
import os
import re
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import hubconf

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
    errors = check_args(args, {**RULES, **getattr(sys.modules[cls.__module__], "RULES", {})})  # + the method's own
    if errors:
        parser.error("\n  " + "\n  ".join(errors))  # usage + every bad field, exit code 2
    return args


# What a field may hold: (test, what is expected). The comparisons are written so that NaN fails them.
POSITIVE = (lambda v: 0 < v < math.inf, "> 0")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, ">= 0")
COUNT = (lambda v: v >= 1, ">= 1")
ANY = (lambda v: True, "any")


def one_of(*choices):
    return lambda v: v in choices, ", ".join(choices[:-1]) + " or " + choices[-1]


# The fields every method file shares; each method file's RULES, beside its Args, adds its own fields (a test checks
# that every field has a rule). --epochs 0 is refused: there is nothing to pre-train.
RULES = {
    "data": (lambda v: v != "", "a MedMNIST flag, a folder or an .npz file"),
    "size": (lambda v: 8 <= v <= 1024, "8..1024 pixels"),
    "arch": one_of("resnet18", "resnet50"),
    "epochs": COUNT,
    "batch_size": (lambda v: v >= 2, ">= 2 (batch norm and the losses need two images)"),
    "lr": POSITIVE,
    "optimizer": one_of("lars", "sgd"),
    "bn": one_of("joint", "per-view"),
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "0 <= seed < 2**63"),
    "train_subset": (lambda v: v >= 0, ">= 0 (0: the whole train split)"),
    "eval_every": COUNT,
    "finetune_epochs": (lambda v: v >= 0, ">= 0"),
    "min_scale": (lambda v: 0 <= v <= 1, "0 (by size) or a fraction in (0, 1]"),
    "jitter": (lambda v: v == -1 or 0 <= v <= 1, "-1 (by size) or 0..1"),
    "blur": (lambda v: v in (-1, 0, 1), "-1 (by size), 0 or 1"),
    "compile": one_of("none", "default", "reduce-overhead", "max-autotune"),
    **{k: ANY for k in ("data_dir", "out", "resume", "overwrite", "host_data")},
}


def check_args(args, rules=RULES):
    """One message per Args field that breaks its entry in rules, plus the cross-field rules."""
    errors = [f"--{k.replace('_', '-')} {v!r}: expected {rules[k][1]}" for k, v in vars(args).items()
              if k in rules and not rules[k][0](v)]
    out = getattr(args, "out", "")
    longest = max((len(part.encode()) for part in os.path.abspath(out).split(os.sep)), default=0) if out else 0
    if longest > 255:  # every Linux and macOS file system's NAME_MAX: refused now, not after the training
        errors.append(f"--out {out[:40]!r}...: a name in it is {longest} bytes long, over the file systems' 255")
    if hasattr(args, "resume") and out and os.path.exists(out) and not os.path.isdir(out):  # a run folder's --out
        errors.append(f"--out {out!r}: is a file, expected a run folder")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        errors.append("--resume and --overwrite: pick one (continue the run in --out, or replace it)")
    return errors


# ------------------------------------------------------------------------------------------------ device, torchrun
# Under torchrun every process runs the same method file; these few helpers are all that differs. RANK and WORLD
# stay 0 and 1 in a plain `python simclr.py` run, where each of them is a no-op.
def get_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def per_view_batchnorm(model, views):
    """Batch-norm statistics per view: every BatchNorm layer of model normalizes each of the `views` equal chunks of
    its batch (the views, concatenated) with that chunk's own mean and variance, and updates its running statistics
    once per chunk, exactly as if each view went through the network in a call of its own, as the official Barlow
    Twins, SimSiam, VICReg and (mmselfsup's fixed) BYOL code do; the loop still makes one call. In eval mode: plain."""
    def split(bn, forward, x):
        return torch.cat([forward(c) for c in x.chunk(views)]) if bn.training else forward(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = functools.partial(split, m, m.forward)  # an instance attribute: deepcopy keeps it per copy
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


# ------------------------------------------------------------------------------------------------ augmentation params
@dataclasses.dataclass
class ViewProbs:
    """Per-view probabilities of the SimCLR recipe (BYOL passes asymmetric ones)."""
    jitter: float = 0.8
    gray: float = 0.2
    blur: float = 0.5
    solarize: float = 0.0


# Augmentation strength by image size. The ImageNet recipe (crops down to 8% of the area, Gaussian blur, jitter 0.4)
# erases most of a 28 px image; the small-image crop and blur were chosen on the val split (results/ABLATION.md), the
# jitter by the recipe search at the cpu budget (results/RECIPES.md: 0.4 beat 0.8 for five methods, tied for one).
# On gray images (X-rays, ultrasound) "colour" jitter is brightness and contrast only: saturation, hue and grayscale
# are identities on one channel.
AUGMENT = {"small": dict(min_scale=0.2, jitter=0.4, blur=0), "large": dict(min_scale=0.08, jitter=0.4, blur=1)}


def augment_settings(size, min_scale=0.0, jitter=-1.0, blur=-1, table=None):
    """min_scale, jitter and blur from --min-scale, --jitter and --blur where given (> 0, >= 0, >= 0), else the
    table's (AUGMENT's) values for the size (small: <= 64 px)."""
    d = (table or AUGMENT)["small" if size <= 64 else "large"]
    return dict(min_scale=min_scale or d["min_scale"], jitter=d["jitter"] if jitter < 0 else jitter,
                blur=d["blur"] if blur < 0 else blur)


def augmentation(size, views, min_scale=0.0, jitter=-1.0, blur=-1):
    """The sample_params keywords of a run: the method's views, crop scale and jitter strength (augment_settings)."""
    a = augment_settings(size, min_scale, jitter, blur)
    s = a["jitter"]
    views = tuple(dataclasses.replace(v, blur=v.blur if a["blur"] else 0.0) for v in views)
    return dict(views=views, scale=(a["min_scale"], 1.0), strength=(s, s, s, s / 4))


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
    pick = lambda t, fb: torch.where(first >= 0, t.gather(1, first.clamp(min=0)[:, None])[:, 0],
                                     torch.tensor(float(fb)))
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
    # hubconf.resnet builds it, so a backbone.pt loads into exactly this network (a 7x7/2 conv + max-pool would
    # shrink 28 px to 7 px before the first block: the small stem for <= 64 px)
    net = hubconf.resnet(arch, channels, "small" if size <= 64 else "imagenet")
    dim = net.inplanes  # torchvision's ResNet: the width after layer4, what fc took (512 or 2048)
    return net, dim


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is scaled by a layer-wise trust ratio (You et al. 2017,
    arXiv 1708.03888), as the BYOL and Barlow Twins papers train. For a weight w with gradient g:

        trust = eta ||w|| / (||g|| + wd ||w||)           with clip_lr: trust = min(trust / lr, 1)   (solo-learn)
        buf <- momentum buf + trust (g + wd w);   w <- w - lr buf

    so a layer moves by about eta of its own norm per step whatever its gradient's scale (with clip_lr: never
    faster than plain SGD at the scheduled lr). 1-D parameters (biases, BN weights) are excluded from weight decay
    and adaptation, as in those papers: a plain momentum-SGD step. After each step, eta_share (a 0-dim tensor, no
    host sync) is the share of weight tensors whose step eta set (trust < 1 with clip_lr): near 1, the LR no longer
    sets how far the layers move, only eta does; near 0, LARS is plain SGD.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the torch.optim contract (L-BFGS-style callers); the method files pass none
            with torch.enable_grad():
                loss = closure()
        by_eta, adapted = 0, 0  # weight tensors whose step eta set (a tensor sum: no host sync), of those adapted
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
                    ratio = (w_norm > 0) & (g_norm > 0)
                    g = g.add(w, alpha=wd) * torch.where(ratio, trust, 1.0)
                    by_eta, adapted = by_eta + (ratio & (trust < 1.0 if group["clip_lr"] else True)), adapted + 1
                buf = self.state[w].get("momentum_buffer")
                if buf is None:
                    buf = self.state[w]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                w.add_(buf, alpha=-lr)
        if adapted:
            self.eta_share = by_eta.float() / adapted
        return loss


def eta_share(optimizer, like):
    """The share of weight tensors whose last step LARS's eta set (LARS.eta_share), as a 0-dim tensor of `like`'s
    dtype and device, for the step's one host sync; 0 for plain SGD, whose steps the LR alone sets."""
    share = getattr(optimizer, "eta_share", None)
    return like.new_zeros(()) if share is None else share.to(like)


def make_optimizer(name, params, lr, weight_decay):
    """--optimizer: 'lars' (LARS above: the long-schedule recipes of the methods' papers and solo-learn) or 'sgd'
    (momentum 0.9, weight decay on every parameter: lightly's CIFAR-10 benchmarks). params: parameters or groups."""
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"--optimizer {name!r}: expected lars or sgd")


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
