"""Supervised from scratch: the baseline that sees every train label. The same backbone, augmentation (one of
SimCLR's views per image) and steps as the self-supervised methods; what the labels buy over them is the question.

Loss: L = -(1/B) sum_i log softmax(W h_i)[y_i], cross-entropy of a linear head W on the representation h = f(x).
The val AUC is scored after every epoch (and before the first): the "supervised" protocol reports the test
metrics of the best-val epoch; the frozen-feature protocols score the last epoch's backbone, as for every method.

Run:
    python supervised.py --data pneumonia                 # PneumoniaMNIST 28 px, ResNet-18
    python supervised.py --data breast --epochs 100 --batch-size 64
    diff simclr.py supervised.py                          # what labels change
Writes checkpoint.pt, metrics.jsonl and results.json to runs/supervised-<data>-<size>-s<seed>/ (see --out).
"""
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
    batch_size: int = 256  # images per step (one view each)
    lr: float = 0.1  # learning rate for a batch of 256, scaled linearly (SGD: the usual ResNet recipe)
    optimizer: str = "sgd"  # lars (layer-wise trust ratio; biases and norms plain) or sgd (momentum 0.9)
    weight_decay: float = 5e-4  # L2 on all weights (SGD)
    warmup_epochs: int = 0  # linear LR warmup before the cosine decay
    seed: int = 0  # seeds the model init, the batch order and every augmentation parameter
    train_subset: int = 0  # use a random N-image subset of the train split (0 = all)
    finetune_epochs: int = 0  # at the end, also fine-tune end to end for N epochs (0: skip)
    min_scale: float = 0.0  # smallest random crop, as a fraction of the image area (0: by --size, common.AUGMENT)
    jitter: float = -1.0  # colour-jitter strength s: brightness, contrast, saturation s, hue s/4 (-1: by --size)
    blur: int = -1  # Gaussian blur with the method's probabilities: 1 on, 0 off (-1: by --size)
    out: str = ""  # run folder; default runs/<method>-<data>-<size>-s<seed>
    resume: bool = False  # continue from <out>/checkpoint.pt
    overwrite: bool = False  # replace the run already in --out instead of refusing to touch it
    compile: str = "none"  # torch.compile the backbone: none, default or reduce-overhead (CUDA graphs); bench.py
    host_data: bool = False  # keep the images in pinned CPU memory, copy each batch (auto when they do not fit)


RULES = {}  # no fields of its own: common.RULES checks them all
METHOD = "supervised"
VIEWS = (common.ViewProbs(jitter=0.8, gray=0.2, blur=0.5, solarize=0.0),)  # one of SimCLR's views per image


# ------------------------------------------------------------------------------------------------ 2. method
def loss_fn(logits, y):
    """logits: (B, K) head outputs, y: (B,) labels in 0..K-1 -> the mean cross-entropy."""
    return F.cross_entropy(logits, y)


def score(backbone, head, ds, mean, std):
    """The model as it stands (eval mode): ((val AUC, val balanced accuracy), test class probabilities (N, K))."""
    val = evaluate.metrics(ds["val"][1], evaluate.head_probs(backbone, head, ds, mean, std, "val"))
    return (val["auc"], val["balanced_acc"]), evaluate.head_probs(backbone, head, ds, mean, std, "test")


# ------------------------------------------------------------------------------------------------ 3. setup
def main(args):
    rank, world, device = common.init_distributed()  # torchrun: this process's rank and GPU (alone: 0, 1)
    out, ckpt_path, log_path = runs.prepare_run(args, METHOD)  # refuses a folder that holds another run
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # CPU stream for batch order and augmentation params

    ds = dataset.load(args.data, args.size, args.data_dir, args.seed, device, args.host_data, args.train_subset)
    images, labels = ds["train"]  # uint8 (N, C, H, W) on the device (or in host memory); (N,) labels
    N, C, H, W = images.shape
    mean, std = dataset.channel_stats(images)
    B = min(args.batch_size, N)
    steps = max(1, N // B)  # drop the ragged last batch
    mine = common.rank_slice(B)  # torchrun: this rank's rows of every global batch of B (alone: all of them)
    cuda = device.type == "cuda"  # on a GPU: bf16 autocast fed bf16 views
    view_dtype = torch.bfloat16 if cuda else torch.float32
    layout = torch.channels_last  # NHWC convolutions: faster on GPUs, and measured faster on the CPU (bench.py)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    aug = common.augmentation(args.size, VIEWS, args.min_scale, args.jitter, args.blur)  # crop, jitter, blur

    backbone, dim = common.make_backbone(args.arch, C, args.size)
    head = nn.Linear(dim, ds["n_classes"])  # W: the classifier the labels train
    model = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    model = common.distribute(model)  # torchrun on GPUs: batch norm over the global batch (SyncBatchNorm)
    if args.compile != "none":  # compiled on the first step, then reused; for GPUs (BENCHMARKS.md)
        backbone.compile(mode=args.compile)
    model = model.to(memory_format=layout)
    optimizer = common.make_optimizer(args.optimizer, model.parameters(), args.lr * B / 256, args.weight_decay)
    scheduler = common.warmup_cosine(optimizer, args.warmup_epochs * steps, args.epochs * steps)

    # --resume: continue from the checkpoint, which must come from the same configuration; else start at epoch 0
    start = runs.restore_state(ckpt_path, args, METHOD, ds["id"], model, optimizer, scheduler, gen, log_path)
    # the best-val epoch so far and its test probabilities, kept beside the checkpoint (epoch 0: the untrained model)
    best_path, best = os.path.join(out, "best.pt"), None
    if rank == 0 and start == 0:
        val, probs = score(backbone, head, ds, mean, std)
        best = {"epoch": 0, "val": list(val), "probs": probs}
    elif rank == 0:
        if not os.path.exists(best_path):
            raise SystemExit(f"{METHOD}: --resume: {best_path} (the best-val epoch so far) is missing; start again "
                             "with --overwrite")
        best = torch.load(best_path, weights_only=True)

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
            (x,) = common.augment(batch, params, args.size, mean, std, dtype=view_dtype)  # (B, C, S, S), one view
            x = x.contiguous(memory_format=layout)
            with autocast:
                h = backbone(x)  # (B, dim) representation
                logits = head(h)  # (B, K) class scores
            loss = loss_fn(logits.float(), labels[idx.to(labels.device)].to(device))  # this rank's rows

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            common.average_gradients(model)  # torchrun: the mean gradient over ranks, as DDP
            optimizer.step()
            scheduler.step()

            loss_value = loss.item()  # the step's one host sync
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint (epoch {epoch}) is {ckpt_path}" if epoch else "no checkpoint yet"
                raise SystemExit(f"{METHOD}: loss is {loss_value} at epoch {epoch + 1} step {step + 1}; stopped, "
                                 f"{kept}. Try a lower --lr.")
            img_per_s = B / (time.perf_counter() - t0)  # images of the global batch per second
            runs.log_jsonl(log_path, {"epoch": epoch, "step": epoch * steps + step, "train/loss": loss_value,
                                      "train/lr": scheduler.get_last_lr()[0], "train/img_per_s": img_per_s})
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{img_per_s:.0f}", epoch=epoch + 1)
            bar.update()

        if rank == 0:  # every epoch: the val split picks the epoch whose test metrics are reported
            val, probs = score(backbone, head, ds, mean, std)
            runs.log_jsonl(log_path, {"epoch": epoch, "val/auc": val[0], "val/balanced_acc": val[1]})
            bar.write(f"epoch {epoch + 1}: val AUC {val[0]:.4f}")
            if list(val) > best["val"]:  # ties keep the earlier epoch
                best = {"epoch": epoch + 1, "val": list(val), "probs": probs}
            runs.atomic_write(best_path, lambda tmp: torch.save(best, tmp))  # before the checkpoint that needs it
        runs.save_state(ckpt_path, args, METHOD, ds["id"], epoch + 1, model, optimizer, scheduler, gen)
    bar.close()

    # -------------------------------------------------------------------------------------------- 5. evaluation
    if rank > 0:  # torchrun: rank 0 alone evaluates and writes the results
        return None
    y_test = ds["test"][1]
    supervised = {**evaluate.metrics(y_test, best["probs"]),
                  "auc_ci95": evaluate.bootstrap_auc(y_test, best["probs"], seed=args.seed),
                  "epoch": best["epoch"], "epochs": args.epochs, "val_auc": best["val"][0]}
    exported = os.path.join(out, "backbone.pt")  # the backbone alone, for other code (hubconf.py, README)
    runs.save_backbone(exported, backbone, METHOD, args, ds, mean, std)
    results = {"method": METHOD, "data": args.data, "size": args.size, "epochs": args.epochs, "supervised": supervised,
               **evaluate.evaluate(backbone, ds, mean, std, seed=args.seed, finetune_epochs=args.finetune_epochs)}
    evaluate.print_table({f"{METHOD} ({ds['name']}, {args.size}px)": results})
    runs.write_json(os.path.join(out, "results.json"), results)
    print(f"backbone for your own code: {exported} (torch.hub.load(..., 'backbone', weights=...): see hubconf.py)")
    return results


if __name__ == "__main__":
    runs.launch(main, Args, METHOD)  # parses and checks the args; Ctrl-C ends with a one-line note
