"""Batched two-view augmentation: the params layout, the pure-PyTorch reference, and the op loader.

Every random choice is drawn beforehand (common.sample_params) into a float32 `params` tensor of shape
(V, B, P): V views of each of B images, one row of P numbers per view. The reference below and the C++/CUDA
op in this folder read only that tensor, so for the same inputs they must give the same output.

Column  name       meaning (pixel units refer to the uint8 source image)
  0     TOP        crop box top row (integer-valued)
  1     LEFT       crop box left column (integer-valued)
  2     HEIGHT     crop box height, 1..H (integer-valued)
  3     WIDTH      crop box width, 1..W (integer-valued)
  4     FLIP       1 = mirror horizontally after the crop
  5     JITTER     1 = apply the colour jitter factors below (in this fixed order: b, c, s, h)
  6     BRIGHT     brightness factor b:  x <- clamp(b x)
  7     CONTRAST   contrast factor c:    x <- clamp(c x + (1 - c) mean(gray(x)))
  8     SAT        saturation factor s:  x <- clamp(s x + (1 - s) gray(x))        (RGB only)
  9     HUE        hue shift in turns:   h <- (h + HUE) mod 1 in HSV space        (RGB only)
 10     GRAY       1 = replace RGB by its luma, 0.2989 R + 0.587 G + 0.114 B       (RGB only)
 11     BLUR       1 = Gaussian blur with the sigma below (odd kernel ~10% of the side, reflect padding)
 12     SIGMA      blur sigma in output pixels
 13     SOLARIZE   1 = x <- 1 - x where x >= 0.5
The pipeline is crop+resize (bilinear, torchvision's half-pixel convention) -> flip -> jitter -> grayscale
-> blur -> solarize -> normalize ((x - mean[c]) / std[c]). Values are in [0, 1] until the normalize.

Valid params (check_params; the C++ op checks CPU params by the same rules): every value finite; TOP, LEFT,
HEIGHT, WIDTH integers with the box inside the image (1 <= HEIGHT <= H, 0 <= TOP <= H - HEIGHT, the same for
LEFT/WIDTH and W); FLIP, JITTER, GRAY, BLUR, SOLARIZE 0 or 1; SIGMA > 0 where BLUR is 1; the factors BRIGHT,
CONTRAST, SAT >= 0 (a negative one turns the view black or inverts it: torchvision refuses it too). Whatever
params hold, neither kernel reads outside its image: they clamp the box where they form indices (augment.h,
crop_box).
"""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

P = 14
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA, SOLARIZE = range(P)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights with torchvision's rounding of R (0.2989)


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel side, about 10% of the image side (SimCLR: 23 px at 224 px; 3 px at 28 px)."""
    return 2 * int(0.05 * size) + 1


def check_inputs(images, params, size, mean, std, blur_kernel):
    """Argument checks shared by the reference and the Python wrapper; the C++ op repeats them in TORCH_CHECKs."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"augment: images must be a uint8 tensor N x C x H x W, got "
                         f"{getattr(images, 'dtype', type(images))} with shape {tuple(getattr(images, 'shape', ()))}")
    B, C, H, W = images.shape
    if C not in (1, 3) or B == 0 or H == 0 or W == 0:
        raise ValueError(f"augment: images must have 1 or 3 channels and a non-empty batch, got shape {tuple(images.shape)}")
    if params.dtype != torch.float32 or params.dim() != 3 or params.shape[1] != B or params.shape[2] != P:
        raise ValueError(f"augment: params must be float32 of shape (V, {B}, {P}), got {params.dtype} {tuple(params.shape)}")
    if params.device != images.device:
        raise ValueError(f"augment: params on {params.device} but images on {images.device}")
    if size < 1 or blur_kernel < 1 or blur_kernel % 2 == 0 or blur_kernel // 2 >= size:
        raise ValueError(f"augment: need size >= 1 and an odd blur_kernel with blur_kernel // 2 < size, "
                         f"got size={size}, blur_kernel={blur_kernel}")
    if len(mean) != C or len(std) != C or any(s <= 0 for s in std):
        raise ValueError(f"augment: mean and std need {C} entries (one per channel) and std > 0, got {mean}, {std}")


NAMES = ("TOP", "LEFT", "HEIGHT", "WIDTH", "FLIP", "JITTER", "BRIGHT", "CONTRAST", "SAT", "HUE", "GRAY", "BLUR",
         "SIGMA", "SOLARIZE")


def check_params(params, H, W):
    """Raise ValueError naming the view, sample and field of the first params value that breaks a rule above.

    One pass of vector compares; on a CUDA tensor it costs a host sync, so the training loop checks the params
    on the CPU where they are drawn (common.sample_params) and the op's CUDA path relies on the kernel's clamp.
    """
    p = params.detach().cpu()
    q = p.numpy()  # numpy: a few microseconds per op on these small arrays, where torch dispatch costs tens
    top, left, h, w = q[..., TOP], q[..., LEFT], q[..., HEIGHT], q[..., WIDTH]
    flags = q[..., [FLIP, JITTER, GRAY, BLUR, SOLARIZE]]
    with np.errstate(invalid="ignore"):  # NaN compares False: exactly what the rules want
        ok = (np.isfinite(q).all() and (q[..., :4] == np.floor(q[..., :4])).all() and (h >= 1).all()
              and (w >= 1).all() and (top >= 0).all() and (left >= 0).all() and (top + h <= H).all()
              and (left + w <= W).all() and ((flags == 0) | (flags == 1)).all()
              and ((q[..., BLUR] == 0) | (q[..., SIGMA] > 0)).all() and (q[..., [BRIGHT, CONTRAST, SAT]] >= 0).all())
    if ok:  # the usual case; below, rule by rule only to name the first row and rule that broke
        return
    box = lambda col, lo, hi: (p[..., col] >= lo) & (p[..., col] <= hi)
    flag = lambda col: (p[..., col] == 0) | (p[..., col] == 1)
    rules = [(col, torch.isfinite(p[..., col]), "a finite number") for col in range(P)]
    rules += [(col, p[..., col] == p[..., col].floor(), "an integer") for col in (TOP, LEFT, HEIGHT, WIDTH)]
    rules += [(HEIGHT, box(HEIGHT, 1, H), "1 <= HEIGHT <= image height"),
              (WIDTH, box(WIDTH, 1, W), "1 <= WIDTH <= image width"),
              (TOP, (p[..., TOP] >= 0) & (p[..., TOP] + p[..., HEIGHT] <= H), "0 <= TOP and TOP + HEIGHT <= image height"),
              (LEFT, (p[..., LEFT] >= 0) & (p[..., LEFT] + p[..., WIDTH] <= W), "0 <= LEFT and LEFT + WIDTH <= image width")]
    rules += [(col, flag(col), "0 or 1") for col in (FLIP, JITTER, GRAY, BLUR, SOLARIZE)]
    rules += [(SIGMA, (p[..., BLUR] == 0) | (p[..., SIGMA] > 0), "SIGMA > 0 where BLUR is 1")]
    rules += [(col, p[..., col] >= 0, ">= 0 (a factor)") for col in (BRIGHT, CONTRAST, SAT)]
    bad = torch.stack([~ok for _, ok, _ in rules])  # (rules, V, B)
    if bad.any():
        # report as the C++ op does: the first bad row (m = v * B + b), then the first rule it breaks
        rows = bad.any(0).flatten().nonzero()[0].item()
        v, b = divmod(rows, p.shape[1])
        col, _, expected = rules[bad[:, v, b].nonzero()[0].item()]
        raise ValueError(f"augment: params[{v}, {b}, {NAMES[col]}] = {p[v, b, col].item():g}: expected {expected}")


def _gray(x):  # (M, 3, S, S) -> (M, 1, S, S)
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def _shift_hue(x, hue):  # x (M, 3, S, S) in [0, 1], hue (M,) in turns
    # RGB -> HSV (hexcone model)
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    lo, _ = x.min(1)
    chroma = v - lo
    flat = chroma == 0  # gray pixels: hue undefined, saturation 0
    s = chroma / torch.where(flat, torch.ones_like(v), v)
    d = torch.where(flat, torch.ones_like(chroma), chroma)
    h = torch.where(v == r, (g - b) / d,
                    torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + hue[:, None, None], 1.0)
    # HSV -> RGB: each channel is v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h * 6.0, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, 1).clamp(0.0, 1.0)


def _resize_taps(start, length, out):
    """Bilinear taps for resizing a window [start, start+length) to `out` pixels (align_corners=False).

    start, length: (M,) integer-valued floats. Returns i0, i1 (M, out) absolute source indices, w (M, out) weight of i1.
    """
    scale = length / out
    src = ((torch.arange(out, device=start.device, dtype=torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.floor()
    w = src - i0
    last = (length - 1)[:, None]
    i1 = torch.minimum(i0 + 1, last)
    i0 = torch.minimum(i0, last)
    return (start[:, None] + i0).long(), (start[:, None] + i1).long(), w


def augment_reference(images, params, size, mean, std, blur_kernel=None):
    """Pure-PyTorch reference: uint8 (B, C, H, W) + params (V, B, P) -> float32 views (V, B, C, size, size).

    Batched over all V*B views with gathers and masks; no Python loop over images.
    """
    blur_kernel = blur_kernel_size(size) if blur_kernel is None else blur_kernel
    check_inputs(images, params, size, mean, std, blur_kernel)
    check_params(params, *images.shape[2:])  # else the gathers below index outside the image
    V, B, _ = params.shape
    C = images.shape[1]
    p = params.reshape(V * B, P)
    M = V * B
    src = images.float().div(255.0).repeat(V, 1, 1, 1)  # (M, C, H, W): view v of image b is row v*B + b
    on = lambda col: p[:, col] > 0.5  # (M,) bool flag per view

    # crop + resize: gather the two source rows of each output row, blend, then the same for columns
    y0, y1, wy = _resize_taps(p[:, TOP], p[:, HEIGHT], size)  # (M, S)
    x0, x1, wx = _resize_taps(p[:, LEFT], p[:, WIDTH], size)
    flip = on(FLIP)[:, None]
    x0, x1, wx = (torch.where(flip, t.flip(1), t) for t in (x0, x1, wx))  # mirror = read columns right to left
    W = src.shape[3]
    rows = lambda i: torch.gather(src, 2, i[:, None, :, None].expand(M, C, size, W))
    x = rows(y0) * (1 - wy)[:, None, :, None] + rows(y1) * wy[:, None, :, None]  # (M, C, S, W)
    cols = lambda i: torch.gather(x, 3, i[:, None, None, :].expand(M, C, size, size))
    x = cols(x0) * (1 - wx)[:, None, None, :] + cols(x1) * wx[:, None, None, :]  # (M, C, S, S)

    # colour jitter, fixed order brightness -> contrast -> saturation -> hue
    jit = on(JITTER)[:, None, None, None]
    f = lambda col: p[:, col][:, None, None, None]
    x = torch.where(jit, (x * f(BRIGHT)).clamp(0, 1), x)
    lum = _gray(x) if C == 3 else x
    m = lum.mean((1, 2, 3), keepdim=True)
    x = torch.where(jit, (f(CONTRAST) * x + (1 - f(CONTRAST)) * m).clamp(0, 1), x)
    if C == 3:
        x = torch.where(jit, (f(SAT) * x + (1 - f(SAT)) * _gray(x)).clamp(0, 1), x)
        x = torch.where(jit, _shift_hue(x, p[:, HUE]), x)
        x = torch.where(on(GRAY)[:, None, None, None], _gray(x).expand(M, 3, size, size), x)

    # Gaussian blur, separable, reflect padding; sigma is per view so the taps are per view too
    r = blur_kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / p[:, SIGMA, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (M*C, K): one 1-D kernel per view and channel
    xb = x.reshape(1, M * C, size, size)  # depthwise conv: every (view, channel) plane is its own group
    xb = F.conv2d(F.pad(xb, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=M * C)  # horizontal
    xb = F.conv2d(F.pad(xb, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=M * C)  # vertical
    xb = xb.reshape(M, C, size, size)
    x = torch.where(on(BLUR)[:, None, None, None], xb, x)

    x = torch.where(on(SOLARIZE)[:, None, None, None] & (x >= 0.5), 1 - x, x)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return ((x - mean_t) / std_t).reshape(V, B, C, size, size)


# ----------------------------------------------------------------------------------------------------------
# The compiled op (csrc/augment.cpp, csrc/augment.cu), JIT-built with ninja on first use and cached by torch.
_op = None
_op_error = None


def load_op(verbose=False):
    """Build (once per machine, cached under TORCH_EXTENSIONS_DIR) and return torch.ops.medssl.augment, or raise."""
    global _op, _op_error
    if _op is not None:
        return _op
    if _op_error is not None:
        raise _op_error
    try:
        from torch.utils.cpp_extension import load
        here = os.path.dirname(os.path.abspath(__file__))
        sources = [os.path.join(here, "augment.cpp")]
        use_cuda = torch.cuda.is_available() and os.environ.get("MEDSSL_NO_CUDA_OP") != "1"
        if use_cuda:
            sources.append(os.path.join(here, "augment.cu"))
        # -fopenmp: at::parallel_for in the CPU kernel is serial without it. -march=native: the JIT build runs on
        # the machine that uses it, so it may use all its vector units. The three float flags let GCC turn the
        # pixel loops' fminf/floorf/selects into vector instructions (the hue loop: ~30x); unlike -ffast-math they
        # do not reorder sums and do not switch the whole process to flush-to-zero.
        cflags = ["-O3", "-fopenmp", "-march=native", "-ffinite-math-only", "-fno-signed-zeros", "-fno-trapping-math"]
        load(name="medssl_augment_cuda" if use_cuda else "medssl_augment", sources=sources, is_python_module=False,
             extra_cflags=cflags, extra_ldflags=["-fopenmp"],
             extra_cuda_cflags=["-O3", "--use_fast_math"] if use_cuda else None, verbose=verbose)
        _register_fake()
        _op = torch.ops.medssl.augment.default
    except Exception as e:  # noqa: BLE001 - any build failure means "use the reference"
        _op_error = RuntimeError(f"medssl: could not build the augmentation op in csrc/: {e}")
        raise _op_error from e
    return _op


def _register_fake():
    # a shape-only kernel so torch.compile / FakeTensor tracing can see through the op
    @torch.library.register_fake("medssl::augment")
    def _(images, params, size, mean, std, blur_kernel, dtype=None):
        # the checks the kernels make that need no values: shapes, dtypes, sizes (augment.cpp, check_inputs)
        torch._check(images.dtype == torch.uint8 and images.dim() == 4, lambda: "images must be uint8 N x C x H x W")
        torch._check(images.shape[1] in (1, 3), lambda: "images must have 1 or 3 channels")
        torch._check(params.dtype == torch.float32 and params.dim() == 3 and params.shape[1] == images.shape[0]
                     and params.shape[2] == P, lambda: f"params must be float32 (V, {images.shape[0]}, {P})")
        torch._check(size >= 1 and blur_kernel % 2 == 1 and blur_kernel // 2 < size, lambda: "bad size or blur_kernel")
        torch._check(len(mean) == images.shape[1] and len(std) == images.shape[1], lambda: "one mean/std per channel")
        return images.new_empty((params.shape[0], params.shape[1], images.shape[1], size, size),
                                dtype=dtype or torch.float32)


_warned = False


def augment(images, params, size, mean, std, blur_kernel=None, dtype=torch.float32):
    """Two-view augmentation: the compiled op when it builds, else the reference with one warning.

    dtype: float32, or bfloat16 to halve what the op writes when the network runs under bf16 autocast anyway.

    MEDSSL_REQUIRE_OP=1 turns a failed build into an error (benchmarks, CI); MEDSSL_OP=0 forces the reference.
    """
    global _warned
    blur_kernel = blur_kernel_size(size) if blur_kernel is None else blur_kernel
    if os.environ.get("MEDSSL_OP", "1") != "0":
        try:
            op = load_op()
        except RuntimeError as e:
            if os.environ.get("MEDSSL_REQUIRE_OP") == "1":
                raise
            if not _warned:
                warnings.warn(f"{e}\nFalling back to the (slower) pure-PyTorch augment_reference.", stacklevel=2)
                _warned = True
        else:
            check_inputs(images, params, size, mean, std, blur_kernel)  # the op checks CPU params' values itself
            return op(images.contiguous(), params.contiguous(), size, [float(m) for m in mean],
                      [float(s) for s in std], blur_kernel, dtype)
    return augment_reference(images, params, size, mean, std, blur_kernel).to(dtype)
