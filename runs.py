"""A run's folder and files, shared by the method files: launching a method (args checked, Ctrl-C reported), the run
folder, atomic writes, the metrics log, and the checkpoint (save_state / restore_state own its keys), so a run can
be killed at any point and resumed to the weights of an uninterrupted one. Under torchrun rank 0 alone writes.
"""
import dataclasses
import errno
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

import common
from hubconf import BACKBONE_FORMAT, load_backbone  # noqa: F401 (the backbone format and its loader: hubconf.py)


# ------------------------------------------------------------------------------------------------ launch, run folder
def launch(main, cls, method):
    """Parse and check the arguments, then main(args). Ctrl-C or SIGTERM end it with one line saying where it
    stopped and how to resume (exit code 130), not a traceback."""
    args = common.parse_args(cls)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (kill, a scheduler) becomes Ctrl-C
    try:
        main(args)
    except (ValueError, TypeError, KeyError, OSError) as e:
        import dataset  # (dataset imports runs)
        if dataset.one_line(e) is None:  # not a bad data source: a bug, whose traceback is wanted
            raise
        raise SystemExit(f"{method}: {dataset.one_line(e)}") from None
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


def run_dir(args, method):
    name = os.path.basename(os.path.normpath(args.data)).removesuffix(".npz")
    return args.out or os.path.join("runs", f"{method}-{name}-{args.size}-s{args.seed}")


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "results.json", "eval.json")


def prepare_run(args, method):
    """The run folder, made ready: the temp files of a killed save removed; a folder that holds another run refused
    unless --resume (continue it) or --overwrite (delete its files first), so checkpoint, log and results of one
    folder always belong to one run. Returns (out, checkpoint path, metrics path)."""
    out = run_dir(args, method)
    if common.RANK == 0:  # torchrun: rank 0 checks and cleans the folder while the others wait at the barrier below
        _check_run_folder(out, args, method)
    common.barrier()
    return out, os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")


_LOCKS = {}  # folder -> the open lock file of this process: each flock is held until the process exits


def lock_run_folder(out, who):
    """One process per run folder: an exclusive flock on <out>/.lock, held for the rest of this process's life and
    released by the kernel when it ends, however it ends (a SIGKILL too, so no stale lock is left). A second process
    gets one line naming the folder and the holder's pid instead of writing into the same files."""
    import fcntl
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _LOCKS:  # this process holds it already (evaluate.main called twice in one process)
        return
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"{who}: {out} is in use by another process (pid {pid}); wait for it, stop it, or give "
                         "another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    if not _LOCKS:  # closed (and so released) at exit, as the kernel would; no unclosed-file warning
        import atexit
        atexit.register(lambda: [lock.close() for lock in _LOCKS.values()])
    _LOCKS[key] = f


def _check_run_folder(out, args, method):
    lock_run_folder(out, method)  # before anything in it is cleaned or read
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


# ------------------------------------------------------------------------------------------------ files, logs
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
    if common.RANK > 0:  # torchrun: rank 0 alone writes files
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
        full = OSError(errno.ENOSPC, f"no space left on device (or over the file-size limit) while writing {path}; "
                                     f"{kept}")
        full.bad_data = True  # the user's to mend, not a bug: one line (dataset.one_line), not three tracebacks
        raise full from None
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
    if common.RANK > 0:  # torchrun: rank 0 alone writes files
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def machine():
    """This machine in one line, as every record states it: CPU model, threads, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} CPU threads, {gpu}, torch {torch.__version__}"


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


# ------------------------------------------------------------------------------------------------ checkpoints
STATE_KEYS = ("method", "args", "data_id", "epoch", "model", "optimizer", "scheduler", "gen", "torch_rng")
# Args fields that do not change what is trained or measured (compile: the same math, compiled), so a
# resumed run may give other values for these.
# The data is compared by its content (ds["id"]), so --data pneumonia and --data path/to/pneumoniamnist.npz agree.
FREE_ON_RESUME = ("data", "data_dir", "out", "eval_every", "resume", "overwrite", "compile", "host_data")
# Args fields added after checkpoints were first written, each with the value that reproduces what medssl did
# before it existed: a checkpoint without the field resumes when the run's value is that one (a method whose old
# optimizer was SGD, SimSiam, has 'sgd' as its default; the others LARS).
ADDED_FIELDS = {"optimizer": None, "bn": "joint"}  # None: the method file's own default is the old behaviour
# The augmentation's defaults by image size (common.AUGMENT) are not Args fields, so a changed default (the recipe
# search's jitter 0.8 -> 0.4) leaves the args alike: a checkpoint also keeps what its run's --min-scale, --jitter and
# --blur resolved to. One without it was written before 2026-12-05, under the table of that day (AUGMENT_BEFORE).
AUGMENT_BEFORE = {"small": dict(min_scale=0.2, jitter=0.8, blur=0), "large": dict(min_scale=0.08, jitter=0.4, blur=1)}
AUGMENT_ARGS = ("size", "min_scale", "jitter", "blur")  # the Args fields common.augment_settings resolves


def augment_of(args, table=None):
    """common.augment_settings of a run's args under `table` (common.AUGMENT); {} for a script without them."""
    if not all(hasattr(args, k) for k in AUGMENT_ARGS):
        return {}
    return common.augment_settings(*(getattr(args, k) for k in AUGMENT_ARGS), table)


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
    common.broadcast_buffers(model)
    state = {"method": method, "args": dataclasses.asdict(args), "augment": augment_of(args), "data_id": data_id,
             "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def restore_state(path, args, method, data_id, model, optimizer, scheduler, gen, log_path):
    """With --resume and a checkpoint at path: load it into the objects and return its epoch, after checking that it
    is this method's with the same configuration (every Args field but FREE_ON_RESUME, the augmentation they resolve
    to, and the same data). Else 0.
    The log keeps only the epochs the checkpoint contains (an epoch cut short is re-run)."""
    start = 0
    if args.resume and os.path.exists(path):
        try:
            ckpt = load_checkpoint(path, next(model.parameters()).device, STATE_KEYS)
        except ValueError as e:
            raise SystemExit(f"{method}: --resume: {e}") from None
        now, was = {**dataclasses.asdict(args), "method": method}, {**ckpt["args"], "method": ckpt["method"]}
        defaults = {f.name: f.default for f in dataclasses.fields(args)}
        older = {k for k, old in ADDED_FIELDS.items() if k not in was and k in now and
                 now[k] == (defaults[k] if old is None else old)}  # an older checkpoint, and this run does as it did
        diff = [f"{k}: {was.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(now) | set(was))
                if k not in FREE_ON_RESUME and k not in older and was.get(k) != now.get(k)]
        was_aug, now_aug = ckpt.get("augment", augment_of(args, AUGMENT_BEFORE)), augment_of(args)
        was_aug = was_aug if isinstance(was_aug, dict) else {"augment": was_aug}
        if all(was.get(k) == now.get(k) for k in AUGMENT_ARGS):  # the same flags, but
            diff += [f"augmentation {k}: {was_aug.get(k)!r} in the checkpoint, {now_aug.get(k)!r} now (a default in "
                     "common.AUGMENT changed since)" for k in sorted({*was_aug, *now_aug})
                     if was_aug.get(k) != now_aug.get(k)]
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
        print(f"resumed from {path} at epoch {start}" + (f" (rank {common.RANK})" if common.WORLD > 1 else "")
              + "".join(f"; {k}: not in this older checkpoint, {now[k]!r} is what that version did"
                        for k in sorted(older)))
    trim_log(log_path, start)
    return start


# ------------------------------------------------------------------------------------------------ the exported backbone


def _commit():
    """The medssl commit that made a file ('unknown' outside a git checkout; '+changes' when the tree was dirty)."""
    import subprocess
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def save_backbone(path, backbone, method, args, ds, mean, std):
    """backbone.pt: the trained backbone for any PyTorch code, without medssl's training state. Its state_dict has
    torchvision's own key names (conv1.weight, layer1.0.bn1.running_mean, ...; no fc: it is Identity), beside what
    using it needs: arch, input channels, image size, stem ('small': 3x3 stride 1, no max-pool; 'imagenet':
    torchvision's 7x7/2 + max-pool), the input normalization (mean, std per channel, on [0, 1] pixels), and where it
    came from (method, data, data_id, medssl commit). Plain tensors, strings and numbers: loads with
    weights_only=True. hubconf.py turns it back into a torchvision ResNet and its preprocessing."""
    if common.RANK > 0:
        return
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    small = tuple(backbone.conv1.kernel_size) == (3, 3)
    info = {"format": BACKBONE_FORMAT, "state_dict": state, "arch": args.arch, "in_channels": ds["channels"],
            "size": args.size, "stem": "small" if small else "imagenet", "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "method": method, "data": args.data, "data_id": ds["id"],
            "commit": _commit()}
    atomic_write(path, lambda tmp: torch.save(info, tmp))


# ------------------------------------------------------------------------------------------------ a run as a child
def die_with_parent():
    """In the child, before it runs: ask Linux to send it SIGTERM when the parent's thread that started it
    (reproduce.py, recipes.py) ends, even by SIGKILL (prctl PR_SET_PDEATHSIG), so no orphan keeps training; the
    child then stops as on Ctrl-C, keeping its last checkpoint. Elsewhere (no prctl): nothing."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


TQDM_FRAME = re.compile(r"\S+:\s+\d+%\|[^\]]*\]")  # "vicreg:   5%|▌   | 9/180 [02:34<48:55, ...]": a progress frame


def last_message(log, rc):
    """The last thing a failed run's log says that is not a progress-bar frame: the method's own message (e.g.
    "vicreg: loss is nan at ...; Try a lower --lr."), which tqdm's frames, written around it with \\r and no newline,
    would otherwise hide."""
    lines = [TQDM_FRAME.sub("", ln).strip() for ln in re.split(r"[\r\n]", log)]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else f"exit code {rc}"


def failure_reason(folder, rc):
    """Why the run in folder failed: the last message of its log.txt (last_message), else its exit code."""
    try:
        with open(os.path.join(folder, "log.txt"), errors="replace") as f:
            return last_message(f.read(), rc)
    except OSError:
        return f"exit code {rc}"


def run_child(cmd, folder, running=None, key=None):
    """Run cmd (a method file, evaluate.py) with its output appended to folder/log.txt, stopped with SIGTERM if this
    process dies first (die_with_parent). running: a dict the Popen sits in, under key, while it runs, for a signal
    handler to stop it. Returns (exit code, wall seconds)."""
    t0 = time.time()
    with open(os.path.join(folder, "log.txt"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        if running is not None:
            running[proc] = key
        rc = proc.wait()
        if running is not None:
            del running[proc]
    return rc, time.time() - t0


def curves(path):
    """metrics.jsonl -> per-epoch means of the train loss, of z_std (the projection's spread, see training()) and
    of eta_share (common.LARS; None in runs from before it was logged), and the online val kNN AUC (all empty for
    the baselines)."""
    loss, z_std, eta, knn = {}, {}, {}, {}
    for row in read_jsonl(path):
        if "train/loss" in row:
            loss.setdefault(row["epoch"] + 1, []).append(row["train/loss"])
        if "train/z_std" in row:
            z_std.setdefault(row["epoch"] + 1, []).append(row["train/z_std"])
        if "train/eta_share" in row:
            eta.setdefault(row["epoch"] + 1, []).append(row["train/eta_share"])
        if "val/knn_auc" in row:
            knn[row["epoch"] + 1] = row["val/knn_auc"]
    mean = lambda v: sum(v) / len(v) if v else None
    return {"epoch": sorted(loss), "loss": [mean(loss[e]) for e in sorted(loss)],
            "z_std": [mean(z_std.get(e)) for e in sorted(loss)], "eta_share": [mean(eta.get(e)) for e in sorted(loss)],
            "knn_epoch": sorted(knn), "knn_auc": [knn[e] for e in sorted(knn)]}
