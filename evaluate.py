"""Evaluation protocols (weighted kNN, linear probe at 1/10/100% labels, end-to-end fine-tune), their metrics
(ACC, ROC AUC, weighted F1, balanced accuracy), and the two baselines that need no training (the untrained backbone,
ImageNet transfer); the supervised-from-scratch baseline is a training script, supervised.py.

As a module, the method files call `evaluate(backbone, ds, mean, std)` at the end and `knn_eval` during training.
As a script:
    python evaluate.py --checkpoint runs/simclr-pneumonia-28-s0/checkpoint.pt   # a trained backbone
    python evaluate.py --data pneumonia --init random                           # the untrained baseline
    python evaluate.py --data pneumonia --init imagenet [--weights FILE]        # ImageNet transfer
Add --finetune-epochs N for the end-to-end protocol.
Each prints a table and writes JSON (eval.json beside the checkpoint; else runs/<init>-<data>-<size>-s<seed>/results.json).
"""
import copy
import dataclasses
import os

import torch
import torch.nn.functional as F
import torchvision

import common
import dataset
import runs


# ------------------------------------------------------------------------------------------------ features
@torch.no_grad()
def extract_features(backbone, images, mean, std, batch_size=512):
    """uint8 (N, C, H, W) -> float32 features (N, D), backbone in eval mode (BN uses its running stats)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device  # images may be in host memory (--host-data): batches go over
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    feats = []
    for i in range(0, len(images), batch_size):
        x = (images[i:i + batch_size].to(device, non_blocking=True).float() / 255 - m) / s
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC, as in training (bench.py: faster)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats)


# ------------------------------------------------------------------------------------------------ classifiers
def knn_predict(train_f, train_y, test_f, n_classes, k=200, temperature=0.1, chunk=1024):
    """Weighted cosine kNN (Wu et al. 2018): class score = sum over the k nearest of exp(cos / T). Returns probs."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))  # small datasets: never ask for more neighbours than there are
    out = []
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # (n, k)
        w = (sim / temperature).exp()
        scores = torch.zeros(len(sim), n_classes, device=sim.device).scatter_add_(1, train_y[idx], w)
        out.append(scores / scores.sum(1, keepdim=True))
    return torch.cat(out)


def fit_logistic(x, y, n_classes, wd, max_iter=300):
    """Multinomial logistic regression, mean CE + wd/2 ||W||^2, full-batch L-BFGS. Returns (W, b)."""
    W = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * wd * (W * W).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(train_f, train_y, val_f, val_y, test_f, n_classes, wds=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    """Linear probe on standardized frozen features; L2 strength chosen by val AUC. Returns the test probabilities,
    {'wd', 'val_auc'} and the probe as an nn.Linear on the raw features (the standardization folded in)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp(min=1e-6)  # train statistics only: no test leakage
    norm = lambda f: (f - mu) / sd
    best = None
    for wd in wds:
        W, b = fit_logistic(norm(train_f), train_y, n_classes, wd)
        score = metrics(val_y, (norm(val_f) @ W + b).softmax(1))["auc"]
        if best is None or score > best[0]:
            best = (score, wd, W, b)
    val_auc, wd, W, b = best
    head = torch.nn.Linear(W.shape[0], n_classes).to(W.device)
    with torch.no_grad():  # (f - mu) / sd @ W + b  ==  f @ (W / sd) + (b - (mu / sd) @ W)
        head.weight.copy_((W / sd[:, None]).T)
        head.bias.copy_(b - (mu / sd) @ W)
    return (norm(test_f) @ W + b).softmax(1), {"wd": wd, "val_auc": val_auc}, head


# ------------------------------------------------------------------------------------------------ metrics
def _ranks(x):
    """Average ranks (1-based) with ties sharing the mean of their positions."""
    uniq, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inv]


def binary_auc(y, score):
    """ROC AUC = P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney U). NaN if one class."""
    y = y.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(score.double())
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y, probs):
    """ROC AUC of probs (N, K) for labels y (N,): binary, or the macro one-vs-rest mean over present classes."""
    if probs.shape[1] == 2:
        return binary_auc(y == 1, probs[:, 1])
    aucs = [binary_auc(y == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < int((y == c).sum()) < len(y)]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def metrics(y, probs):
    """y (N,) int64, probs (N, K) -> acc, auc (binary, or macro one-vs-rest), f1_weighted, balanced_acc."""
    y, probs = y.cpu(), probs.float().cpu()
    K = probs.shape[1]
    pred = probs.argmax(1)
    f1, recalls = 0.0, []
    for c in range(K):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        support = tp + fn
        if support:
            f1 += support / len(y) * (2 * tp / (2 * tp + fp + fn))
            recalls.append(tp / support)
    return {"acc": float((pred == y).float().mean()), "auc": auc(y, probs), "f1_weighted": f1,
            "balanced_acc": sum(recalls) / len(recalls)}


def bootstrap_auc(y, probs, n=1000, seed=0):
    """95% percentile interval of the test AUC over n bootstrap resamples of the test set (resamples that lose a
    class are redrawn), for runs with one seed: the spread the test set's finite size alone puts on the AUC."""
    y, probs = y.cpu(), probs.float().cpu()
    g = torch.Generator().manual_seed(seed)
    aucs = []
    while len(aucs) < n:
        idx = torch.randint(0, len(y), (len(y),), generator=g)
        if len(y[idx].unique()) == len(y.unique()):
            aucs.append(auc(y[idx], probs[idx]))
    return torch.tensor(aucs).quantile(torch.tensor([0.025, 0.975])).tolist()


# ------------------------------------------------------------------------------------------------ protocols
KS = (5, 10, 20, 50, 100, 200)


def knn_select(train_f, train_y, val_f, val_y, n_classes, ks=KS):
    """k for the kNN classifier, chosen on the val split: the best balanced accuracy (a majority-class vote scores
    1/K on it, whatever the class sizes), ties broken by AUC, then by the smaller k. -> (k, val metrics)."""
    ks = [k for k in ks if k <= len(train_f)] or [len(train_f)]  # never more neighbours than train images
    scored = [(metrics(val_y, knn_predict(train_f, train_y, val_f, n_classes, k=k)), k) for k in ks]
    m, k = max(scored, key=lambda t: (t[0]["balanced_acc"], t[0]["auc"], -t[1]))
    return k, m


def knn_eval(backbone, ds, mean, std):
    """Online monitor during training: kNN on the val split (train split as memory bank, k chosen on val)."""
    f = {s: extract_features(backbone, ds[s][0], mean, std) for s in ("train", "val")}
    k, m = knn_select(f["train"], ds["train"][1], f["val"], ds["val"][1], ds["n_classes"])
    return {**m, "k": k}


def label_subset(y, fraction, seed):
    """Indices of a seeded, stratified `fraction` of the labels y: round(fraction * n_c) per class, at least one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction}: expected 0 < fraction <= 1")
    return dataset.stratified_sample(y.cpu(), fraction, torch.Generator().manual_seed(seed))[0].to(y.device)


def embed_2d(f, y, n=1000, seed=0):
    """A 2-D picture of features f (N, D): their first two principal components, for at most n seeded points."""
    idx = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x = f.cpu()[idx].double()
    x = x - x.mean(0)
    _, _, V = torch.linalg.svd(x, full_matrices=False)  # rows of V: principal directions, by variance
    xy = x @ V[:2].T  # (n, 2)
    return {"xy": [[round(a, 4), round(b, 4)] for a, b in xy.tolist()], "y": y.cpu()[idx].tolist()}


def evaluate(backbone, ds, mean, std, fractions=(0.01, 0.1), seed=0, finetune_epochs=0):
    """Every protocol on the test split: {'knn': {...}, 'linear': {..., 'wd': chosen L2}}, for each label fraction
    f < 1 'linear_<f*100>pct' (the probe trained on a stratified f of the train labels), 'finetune' if
    finetune_epochs > 0, and 'embedding' (2-D PCA of the test features, for the figures)."""
    f = {s: extract_features(backbone, ds[s][0], mean, std) for s in dataset.SPLITS}
    y = {s: ds[s][1] for s in dataset.SPLITS}
    K = ds["n_classes"]
    test = lambda probs: {**metrics(y["test"], probs), "auc_ci95": bootstrap_auc(y["test"], probs, seed=seed)}
    k, val = knn_select(f["train"], y["train"], f["val"], y["val"], K)
    out = {"knn": {**test(knn_predict(f["train"], y["train"], f["test"], K, k=k)), "k": k, "val_auc": val["auc"]}}
    probs, info, head = linear_probe(f["train"], y["train"], f["val"], y["val"], f["test"], K)
    out["linear"] = {**test(probs), **info}
    for frac in fractions:
        idx = label_subset(y["train"], frac, seed)
        probs, info, _ = linear_probe(f["train"][idx], y["train"][idx], f["val"], y["val"], f["test"], K)
        out[f"linear_{frac * 100:g}pct"] = {**test(probs), **info, "n_labels": len(idx)}
    if finetune_epochs:  # LP-FT: the fine-tune starts from the linear probe's head
        out["finetune"] = finetune(backbone, head, ds, mean, std, finetune_epochs, seed=seed)
    out["embedding"] = embed_2d(f["test"], y["test"], seed=seed)
    return out


CROP_FLIP = common.ViewProbs(jitter=0.0, gray=0.0, blur=0.0, solarize=0.0)


@torch.no_grad()
def head_probs(net, head, ds, mean, std, split):
    """Class probabilities of backbone + linear head on a split (eval mode)."""
    return head(extract_features(net, ds[split][0], mean, std)).softmax(1)


def train_with_labels(net, head, ds, mean, std, epochs, lr, backbone_lr_scale, batch_size, seed, view):
    """Backbone + linear head trained on the train labels with cross-entropy (SGD, momentum 0.9, cosine LR), one
    augmented view per image per step (the crop scale of the image size, common.AUGMENT); the backbone's LR is
    lr * backbone_lr_scale. Both are trained in place. The val AUC is measured after every epoch (and before the
    first, epoch 0); returns the test metrics of the best-val epoch (val AUC, then val balanced accuracy), with that
    epoch and its val AUC. The fine-tune protocol's loop (supervised.py, the baseline, is written out as a method)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = ds["train"]
    N, C, H, W = x.shape
    device = next(net.parameters()).device  # x may be in host memory (--host-data)
    aug = common.augmentation(H, (view,))
    net.to(memory_format=torch.channels_last)  # NHWC convolutions, as in the method files
    B = min(batch_size, N)
    steps = max(1, N // B)
    opt = torch.optim.SGD([{"params": net.parameters(), "lr": lr * backbone_lr_scale}, {"params": head.parameters()}],
                          lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = common.warmup_cosine(opt, 0, epochs * steps)
    best = None
    for epoch in range(epochs + 1):
        if epoch:  # epoch 0 only scores the starting point (for LP-FT: the linear probe itself)
            net.train()
            perm = torch.randperm(N, generator=gen).to(x.device)
            for step in range(steps):
                idx = perm[step * B:(step + 1) * B]
                params = common.sample_params(len(idx), H, W, C, gen, **aug).to(device)
                (xb,) = common.augment(x[idx].to(device, non_blocking=True), params, H, mean, std)  # one view
                xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = head(net(xb)).float()
                loss = F.cross_entropy(logits, y[idx.to(y.device)])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"cross-entropy loss is {loss.item()}: try a lower learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        val = metrics(ds["val"][1], head_probs(net, head, ds, mean, std, "val"))
        score = (val["auc"], val["balanced_acc"])  # AUC first; equal AUCs (e.g. 1.0 on easy data): the better threshold
        if best is None or score > best[0]:  # full ties keep the earlier epoch
            best = (score, epoch, head_probs(net, head, ds, mean, std, "test"))
    net.eval()
    (val_auc, _), epoch, probs = best
    return {**metrics(ds["test"][1], probs), "auc_ci95": bootstrap_auc(ds["test"][1], probs, seed=seed),
            "epoch": epoch, "epochs": epochs, "val_auc": val_auc}


def finetune(backbone, head, ds, mean, std, epochs, lr=0.05, backbone_lr_scale=0.1, batch_size=128, seed=0):
    """End-to-end fine-tuning (the paper's third protocol) as LP-FT (Kumar et al. 2022, arXiv 2202.10054): a copy
    of the backbone (the caller's stays as it was) with the linear probe's head as the starting head, so the first
    steps refine the probe instead of pushing a random head's gradients into the features; crop + flip only (a
    colour change could erase a diagnostic cue); the backbone at a tenth of the head's LR. Reports the test metrics
    of the epoch with the best val AUC (0: the probe was not improved on)."""
    return train_with_labels(copy.deepcopy(backbone), copy.deepcopy(head), ds, mean, std, epochs, lr,
                             backbone_lr_scale, batch_size, seed, CROP_FLIP)


# ------------------------------------------------------------------------------------------------ baselines
IMAGENET = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}  # torchvision's weight enums


def imagenet_backbone(arch, channels, size, weights):
    """torchvision's ResNet with ImageNet weights (a state dict from imagenet_weights), in the architecture they
    were trained with (7x7/2 stem + max-pool), seeing its input resized to `size`, e.g. 224 (MedMNIST v2's "ResNet
    (224)" protocol). For 1 channel the first conv is summed over RGB, which gives a gray image the response the RGB
    filters give the same image with three equal channels. Returns (backbone, feature_dim), like make_backbone."""
    if channels not in (1, 3):
        raise ValueError(f"ImageNet weights take 1 or 3 channels; the data has {channels}")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = torch.nn.Identity()
    w = weights["conv1.weight"]  # (64, 3, 7, 7)
    net.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    net.load_state_dict({**weights, "conv1.weight": w.sum(1, keepdim=True) if channels == 1 else w})
    return torch.nn.Sequential(torch.nn.Upsample(size=(size, size), mode="bilinear", align_corners=False), net), dim


def imagenet_weights(arch, path=None, download=True):
    """torchvision's ImageNet-1k weights for `arch` (without the fc head), from `path`, else from the torch hub
    cache (<torch hub dir>/checkpoints/, where torchvision itself keeps them), else downloaded there if allowed.
    Loaded with weights_only=True; a missing, unreadable or mismatched file raises an error saying what to do."""
    if arch not in IMAGENET:
        raise ValueError(f"--arch {arch!r}: ImageNet weights exist for {', '.join(IMAGENET)}")
    url = getattr(torchvision.models, IMAGENET[arch]).DEFAULT.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if path is None and not os.path.exists(cached):
        how = (f"download {url} to {cached} on a machine with a network (or any copy of torchvision's {arch} "
               f"ImageNet weights), or pass --weights PATH")
        if not download:
            raise FileNotFoundError(f"ImageNet weights for {arch} not found at {cached}: {how}")
        try:
            torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - offline, proxy, hash mismatch: all end the same way
            raise FileNotFoundError(f"ImageNet weights for {arch} not found at {cached} and could not be "
                                    f"downloaded ({type(e).__name__}: {e}): {how}") from e
    path = path or cached
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: could not load as a weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    ref = getattr(torchvision.models, arch)(weights=None).state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of torchvision's {arch}, found {type(state).__name__}")
    missing = [k for k in ref if not k.startswith("fc.") and k not in state]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or wrong:
        raise ValueError(f"{path}: not torchvision {arch} weights: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f", wrong shape {[(k, tuple(state[k].shape)) for k in wrong[:3]]}")
    return {k: state[k] for k in ref if not k.startswith("fc.")}


def print_table(rows):
    """rows: {name: results dict} -> a fixed-width table of the test metrics."""
    cols = ("acc", "auc", "f1_weighted", "balanced_acc")
    print(f"{'model':28s} {'protocol':12s} " + " ".join(f"{c:>12s}" for c in cols))
    for name, res in rows.items():
        for proto in [k for k in res if k in ("knn", "finetune", "supervised") or k.startswith("linear")]:
            print(f"{name:28s} {proto:12s} " + " ".join(f"{res[proto][c]:12.4f}" for c in cols))


@dataclasses.dataclass
class Args:
    checkpoint: str = ""  # a method's checkpoint.pt (its args say data, size, arch)
    backbone: str = ""  # a run's backbone.pt (what hubconf.py loads; it says data, size, arch)
    init: str = "random"  # with neither: the untrained backbone (random) or torchvision's ImageNet weights (imagenet)
    # given here, else the checkpoint's, else the default in brackets
    data: str = ""  # MedMNIST flag, folder or .npz (pneumonia)
    size: int = 0  # image side in pixels (28)
    data_dir: str = ""  # where the data lives ($MEDSSL_DATA_DIR or ./data)
    arch: str = ""  # resnet18 or resnet50 (resnet18)
    seed: int = -1  # seeds the label fractions, the fine-tune and the bootstrap (0)
    train_subset: int = -1  # use a random N-image subset of the train split (0 = all)
    # the baselines and the protocols
    weights: str = ""  # --init imagenet: a torchvision weights file (default: the torch hub cache, downloaded there)
    imagenet_size: int = 224  # --init imagenet: the side images are resized to (the weights' training resolution)
    batch_size: int = 256  # the study's batch size, kept in its command line for one configuration (nothing trains)
    finetune_epochs: int = 0  # also fine-tune end to end for N epochs (0: skip)
    out: str = ""  # the JSON file (default: eval.json beside the checkpoint, or runs/<init>-<data>-<size>-s<seed>/)


# what evaluate's fields may hold (empty, 0 or -1: "the checkpoint's, else the default"), beside common.RULES
RULES = {"init": common.one_of("random", "supervised", "imagenet"), "data": common.ANY,
         "size": (lambda v: v == 0 or 8 <= v <= 1024, "0 (the checkpoint's) or 8..1024 pixels"),
         "arch": (lambda v: v in ("", "resnet18", "resnet50"), "resnet18 or resnet50 (empty: the checkpoint's)"),
         "seed": (lambda v: -1 <= v < 2 ** 63, ">= -1"),
         "train_subset": (lambda v: v >= -1, ">= -1 (-1: the checkpoint's, 0: the whole train split)"),
         "imagenet_size": common.COUNT, "batch_size": common.COUNT, "finetune_epochs": (lambda v: v >= 0, ">= 0"),
         **{k: common.ANY for k in ("checkpoint", "backbone", "weights", "data_dir", "out")}}


def main(argv=None):
    cli = common.parse_args(Args, argv)
    if cli.init == "supervised" and not (cli.checkpoint or cli.backbone):
        raise SystemExit("evaluate.py --init supervised: the supervised baseline is a training script now: python "
                         "supervised.py --data ... (same options as the methods; it evaluates itself)")
    device = common.get_device()
    if cli.checkpoint and cli.backbone:
        raise SystemExit("--checkpoint and --backbone: give one")
    exported = None
    if cli.backbone:  # the exported backbone: evaluated like a checkpoint, with the data and size it names
        try:
            exported, info = runs.load_backbone(cli.backbone)
        except ValueError as e:
            raise SystemExit(f"evaluate.py --backbone: {e}") from None
        ckpt = {"args": {k: info[k] for k in ("data", "size", "arch")}, "method": info["method"]}
        cli.checkpoint = cli.backbone
    else:
        try:
            ckpt = runs.load_checkpoint(cli.checkpoint) if cli.checkpoint else {"args": {}}
        except ValueError as err:  # truncated, not a checkpoint: it names the file
            raise SystemExit(f"evaluate.py --checkpoint: {str(err).splitlines()[0][:300]}") from None
    # given here, else the checkpoint's, else the default: field -> (its value when not given, the default)
    fallback = {"data": ("", "pneumonia"), "size": (0, 28), "arch": ("", "resnet18"), "seed": (-1, 0),
                "data_dir": ("", ""), "train_subset": (-1, 0)}
    data, size, arch, seed, data_dir, subset = (getattr(cli, k) if getattr(cli, k) != unset else
                                                ckpt["args"].get(k, default) for k, (unset, default) in fallback.items())
    method = ckpt.get("method", "ssl") if cli.checkpoint else cli.init
    if cli.checkpoint and arch != ckpt["args"].get("arch", arch):
        raise SystemExit(f"--arch {arch}: {cli.checkpoint} holds a {ckpt['args']['arch']} backbone")
    try:  # fail before loading any data, with the message alone (it says how to get the weights)
        weights = imagenet_weights(arch, cli.weights or None) if method == "imagenet" else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"evaluate.py --init imagenet: {e}") from e
    ds = dataset.load(data, size, data_dir, seed, device, subset=subset)
    torch.manual_seed(seed)
    if weights is not None:
        backbone, dim = imagenet_backbone(arch, ds["channels"], cli.imagenet_size, weights)
    else:
        backbone, dim = common.make_backbone(arch, ds["channels"], size)
    if exported is not None:
        if exported.conv1.in_channels != ds["channels"]:
            raise SystemExit(f"--backbone {cli.backbone}: takes {exported.conv1.in_channels}-channel images, "
                             f"{data} has {ds['channels']}")
        backbone = exported
    elif cli.checkpoint:
        prefix = "backbone."
        try:
            backbone.load_state_dict({k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
        except (RuntimeError, AttributeError) as e:  # missing or extra keys, other shapes, a model that is no dict
            keys = list(ckpt["model"]) if isinstance(ckpt["model"], dict) else []
            why = (f"no '{prefix}' keys in its model ({len(keys)} keys{', e.g. ' + repr(keys[0]) if keys else ''})"
                   if not any(k.startswith(prefix) for k in keys) else str(e).splitlines()[-1].strip()[:300])
            raise SystemExit(f"evaluate.py --checkpoint {cli.checkpoint}: its backbone does not fit a {arch} for "
                             f"{ds['channels']}-channel {size} px images: {why}") from None
    broken = [k for k, v in backbone.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a run saved after its weights blew up: the probe's L-BFGS would fail on NaN features
        raise SystemExit(f"evaluate.py --checkpoint {cli.checkpoint}: non-finite backbone weights in {broken[0]}"
                         f"{f' and {len(broken) - 1} more tensors' if len(broken) > 1 else ''}; nothing to evaluate")
    out = cli.out or (os.path.join(os.path.dirname(cli.checkpoint), "eval.json") if cli.checkpoint else
                      os.path.join("runs", f"{cli.init}-{ds['name']}-{size}-s{seed}", "results.json"))
    if os.path.isdir(out):  # checked before the evaluation runs, not after it
        raise SystemExit(f"evaluate.py --out {out}: is a folder, expected the path of a JSON file")
    try:
        runs.lock_run_folder(os.path.dirname(os.path.abspath(out)), "evaluate.py")  # one process per run folder
    except OSError as e:
        raise SystemExit(f"evaluate.py --out {out}: cannot write there ({e.strerror or e})") from None
    backbone.to(device)
    mean, std = dataset.channel_stats(ds["train"][0])
    res = {"method": method, "data": data, "size": size, "epochs": ckpt.get("epoch", 0) if cli.checkpoint else 0}
    res.update(evaluate(backbone, ds, mean, std, seed=seed, finetune_epochs=cli.finetune_epochs))
    print_table({f"{method} ({ds['name']}, {size}px)": res})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runs.write_json(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, KeyError, OSError) as e:
        if dataset.one_line(e) is None:  # not a bad data source: a bug, whose traceback is wanted
            raise
        raise SystemExit(f"evaluate.py: {dataset.one_line(e)}") from None
