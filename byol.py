"""BYOL: "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
Grill, Strub, Altche, Tallec, Richemond, et al., NeurIPS 2020, arXiv 2006.07733.

Loss: L = 2 - 2 cos(p, sg(z')) with p = q(g(f(x1))) from the online network and z' = g'(f'(x2)) from the target
network (an EMA of the online one), symmetrized over the two views; no negatives.

Run:
    python byol.py --data pneumonia                   # PneumoniaMNIST 28 px, ResNet-18
    python byol.py --data breast --size 64 --epochs 50
    python byol.py --data ../shared/data/chest_xray_224 --size 64 --arch resnet50
Writes checkpoint.pt (target network included), metrics.jsonl and results.json to runs/byol-<data>-<size>-s<seed>/.
"""
import copy
import dataclasses
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import dataset
import evaluate
import runs


# ------------------------------------------------------------------------------------------------ 1. arguments
@dataclasses.dataclass
class Args:
    # common to every method
    data: str = "pneumonia"  # MedMNIST flag (pneumonia, breast, or e.g. dermamnist) or a folder in the paper's layout
    size: int = 28  # image side in pixels: picks the MedMNIST file (28, 64, 128, 224) or resizes a folder
    data_dir: str = ""  # where npz files live / are downloaded / are cached; default $MEDSSL_DATA_DIR or ./data
    arch: str = "resnet18"  # resnet18 or resnet50 (the paper's)
    epochs: int = 100  # passes over the training split
    batch_size: int = 256  # images per step (each gives two views)
    lr: float = 1.0  # learning rate for a batch of 256, scaled linearly (LARS: solo-learn's CIFAR recipe)
    optimizer: str = "lars"  # lars (layer-wise trust ratio; biases and norms plain) or sgd (momentum 0.9)
    bn: str = "per-view"  # batch-norm statistics: per-view (each view alone, as the official code) or joint (one batch)
    weight_decay: float = 1e-5  # L2 on weight matrices (LARS leaves biases and norm layers alone)
    warmup_epochs: int = 10  # linear LR warmup before the cosine decay
    seed: int = 0  # seeds the model init, the batch order and every augmentation parameter
    train_subset: int = 0  # use a random N-image subset of the train split (0 = all)
    eval_every: int = 5  # epochs between kNN scores on the val split
    finetune_epochs: int = 0  # at the end, also fine-tune end to end for N epochs (0: skip)
    min_scale: float = 0.0  # smallest random crop, as a fraction of the image area (0: by --size, common.AUGMENT)
    jitter: float = -1.0  # colour-jitter strength s: brightness, contrast, saturation s, hue s/4 (-1: by --size)
    blur: int = -1  # Gaussian blur with the method's probabilities: 1 on, 0 off (-1: by --size)
    out: str = ""  # run folder; default runs/<method>-<data>-<size>-s<seed>
    resume: bool = False  # continue from <out>/checkpoint.pt
    overwrite: bool = False  # replace the run already in --out instead of refusing to touch it
    compile: str = "none"  # torch.compile the backbone: none, default or reduce-overhead (CUDA graphs); bench.py
    host_data: bool = False  # keep the images in pinned CPU memory, copy each batch (auto when they do not fit)
    # BYOL
    ema_decay: float = 0.99  # base EMA rate of the target network, raised to 1 on a cosine schedule (paper: 0.996)
    proj_hidden: int = 4096  # projector and predictor hidden width (the paper's)
    proj_dim: int = 256  # D, width of the projection z and of the prediction p (the paper's)


# what the method's own fields may hold, checked with common.RULES (the shared ones) before any work starts
RULES = {"ema_decay": (lambda v: 0 <= v <= 1, "0..1"), "proj_hidden": common.COUNT, "proj_dim": common.COUNT}
METHOD = "byol"
VIEWS = (common.ViewProbs(jitter=0.8, gray=0.2, blur=1.0, solarize=0.0),  # the paper's asymmetric views: always
         common.ViewProbs(jitter=0.8, gray=0.2, blur=0.1, solarize=0.2))  # blur the first, sometimes solarize the 2nd


# ------------------------------------------------------------------------------------------------ 2. method
class Projector(nn.Module):
    """g(h) and the predictor q(z) share this shape: Linear-BN-ReLU-Linear."""

    def __init__(self, dim, hidden, out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, h):
        return self.net(h)


Predictor = Projector  # q: the online network's extra head, which makes it asymmetric with the target


def loss_fn(p, z):
    """2 - 2 cos(p, z), averaged over the batch. p: (B, d) online predictions; z: (B, d) target projections."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def ema_rate(step, total_steps, base):
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: from the base rate at step 0 up to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta for every parameter; buffers (BN running stats) are copied."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(tau).add_(o.detach(), alpha=1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# ------------------------------------------------------------------------------------------------ 3. setup
def main(args):
    rank, world, device = common.init_distributed()  # torchrun: this process's rank and GPU (alone: 0, 1)
    out, ckpt_path, log_path = runs.prepare_run(args, METHOD)  # refuses a folder that holds another run
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # CPU stream for batch order and augmentation params

    ds = dataset.load(args.data, args.size, args.data_dir, args.seed, device, args.host_data, args.train_subset)
    images = ds["train"][0]  # uint8 (N, C, H, W) on the device (or in host memory): batches are index slices
    N, C, H, W = images.shape
    mean, std = dataset.channel_stats(images)
    B = min(args.batch_size, N)
    steps = N // B  # drop the ragged last batch: BN and the loss want full batches
    mine = common.rank_slice(B)  # torchrun: this rank's rows of every global batch of B (alone: all of them)
    cuda = device.type == "cuda"  # on a GPU: bf16 autocast fed bf16 views
    view_dtype = torch.bfloat16 if cuda else torch.float32
    layout = torch.channels_last  # NHWC convolutions: faster on GPUs, and measured faster on the CPU (bench.py)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    aug = common.augmentation(args.size, VIEWS, args.min_scale, args.jitter, args.blur)  # crop, jitter, blur

    backbone, dim = common.make_backbone(args.arch, C, args.size)
    projector = Projector(dim, args.proj_hidden, args.proj_dim)
    predictor = Predictor(args.proj_dim, args.proj_hidden, args.proj_dim)
    online = nn.ModuleDict({"backbone": backbone, "projector": projector})  # the part the target tracks
    target = copy.deepcopy(online).requires_grad_(False)  # trained by ema_update only, never by gradients
    model = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor,
                           "target": target}).to(device)
    model = common.distribute(model)  # torchrun on GPUs: batch norm over the global batch (SyncBatchNorm)
    if args.bn == "per-view":  # each view normalized with its own batch statistics, as one call per view would be
        common.per_view_batchnorm(model, 2)
    if args.compile != "none":  # compiled on the first step, then reused; for GPUs (BENCHMARKS.md)
        backbone.compile(mode=args.compile)
    model = model.to(memory_format=layout)
    trained = [p for name, p in model.named_parameters() if not name.startswith("target.")]
    optimizer = common.make_optimizer(args.optimizer, trained, args.lr * B / 256, args.weight_decay)
    scheduler = common.warmup_cosine(optimizer, args.warmup_epochs * steps, args.epochs * steps)

    # --resume: continue from the checkpoint, which must come from the same configuration; else start at epoch 0
    start = runs.restore_state(ckpt_path, args, METHOD, ds["id"], model, optimizer, scheduler, gen, log_path)

    # -------------------------------------------------------------------------------------------- 4. training loop
    bar = tqdm(total=args.epochs * steps, initial=start * steps, desc=METHOD, unit="step", disable=rank > 0)
    for epoch in range(start, args.epochs):
        model.train()
        perm = torch.randperm(N, generator=gen).to(images.device)
        for step in range(steps):
            t0 = time.perf_counter()
            idx = perm[step * B:(step + 1) * B][mine]  # every rank draws the same global batch, keeps its rows
            params = common.sample_params(B, H, W, C, gen, **aug)[:, mine].to(device, non_blocking=True)
            batch = images[idx].to(device, non_blocking=True)  # uint8 (B, C, H, W); a copy only with host data
            x1, x2 = common.augment(batch, params, args.size, mean, std, dtype=view_dtype)  # (B, C, S, S) each
            x = torch.cat([x1, x2]).contiguous(memory_format=layout)  # both views in one call: (2B, C, S, S)
            with autocast:
                h = backbone(x)  # (2B, dim) representation
                z = projector(h)  # (2B, proj_dim) projection
                p = predictor(z)  # (2B, proj_dim) prediction of the target's projection
                with torch.no_grad():  # stop-gradient: the target only provides regression targets
                    z_t = target["projector"](target["backbone"](x))  # (2B, proj_dim)
            p1, p2 = p.float().chunk(2)
            z1, z2 = z_t.float().chunk(2)
            loss = loss_fn(p1, z2) + loss_fn(p2, z1)  # each view predicts the other view's target projection

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(model)  # torchrun: the mean gradient over ranks, as DDP
            optimizer.step()
            scheduler.step()
            tau = ema_rate(epoch * steps + step, args.epochs * steps, args.ema_decay)
            ema_update(target, online, tau)

            # collapse monitor: std over the batch of the unit-norm projection, ~1/sqrt(d) when healthy, 0 if collapsed
            z_std = F.normalize(z.detach().float(), dim=1).std(0).mean()
            eta = common.eta_share(optimizer, z_std)  # LARS: the share of weight tensors whose step eta set
            loss_value, z_std, eta = torch.stack([loss.detach(), z_std, eta]).tolist()  # the step's one host sync
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint (epoch {epoch}) is {ckpt_path}" if epoch else "no checkpoint yet"
                raise SystemExit(f"{METHOD}: loss is {loss_value} at epoch {epoch + 1} step {step + 1}; stopped, "
                                 f"{kept}. Try a lower --lr.")
            img_per_s = B / (time.perf_counter() - t0)  # images of the global batch per second
            runs.log_jsonl(log_path, {"epoch": epoch, "step": epoch * steps + step, "train/loss": loss_value,
                                      "train/lr": scheduler.get_last_lr()[0], "train/img_per_s": img_per_s,
                                      "train/z_std": z_std, "train/eta_share": eta})
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{img_per_s:.0f}", epoch=epoch + 1)
            bar.update()

        if rank == 0 and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):  # monitor: once
            knn = evaluate.knn_eval(backbone, ds, mean, std)
            runs.log_jsonl(log_path, {"epoch": epoch, "val/knn_acc": knn["acc"], "val/knn_auc": knn["auc"]})
            bar.write(f"epoch {epoch + 1}: val kNN acc {knn['acc']:.4f} auc {knn['auc']:.4f}")
            if z_std < 0.1 / math.sqrt(z.shape[1]):  # the last step's z_std, under a tenth of "spread out": say so
                bar.write(f"epoch {epoch + 1}: z_std {z_std:.4f} < 0.1/sqrt(D): the projections are collapsing")
        runs.save_state(ckpt_path, args, METHOD, ds["id"], epoch + 1, model, optimizer, scheduler, gen)
    bar.close()

    # -------------------------------------------------------------------------------------------- 5. evaluation
    if rank > 0:  # torchrun: rank 0 alone evaluates and writes the results
        return None
    exported = os.path.join(out, "backbone.pt")  # the backbone alone, for other code (hubconf.py, README)
    runs.save_backbone(exported, backbone, METHOD, args, ds, mean, std)
    results = {"method": METHOD, "data": args.data, "size": args.size, "epochs": args.epochs,
               **evaluate.evaluate(backbone, ds, mean, std, seed=args.seed, finetune_epochs=args.finetune_epochs)}
    evaluate.print_table({f"{METHOD} ({ds['name']}, {args.size}px)": results})
    runs.write_json(os.path.join(out, "results.json"), results)
    print(f"backbone for your own code: {exported} (torch.hub.load(..., 'backbone', weights=...): see hubconf.py)")
    return results


if __name__ == "__main__":
    runs.launch(main, Args, METHOD)  # parses and checks the args; Ctrl-C ends with a one-line note
