"""Augmentation parameters and the pure-PyTorch reference, checked against torchvision's per-image transforms."""
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

import common
from csrc.augment import (P, TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA,
                          SOLARIZE, augment_reference, blur_kernel_size)

VIEW = common.ViewProbs()
TOL = 1e-4  # max abs difference in normalized units (float32 round-off of two different formulations)


def torchvision_view(img_u8, row, size, mean, std, k):
    """One view, one image, with torchvision's functional ops: the independent reference."""
    x = img_u8.float() / 255
    t, l, h, w = (int(row[i]) for i in (TOP, LEFT, HEIGHT, WIDTH))
    x = TF.resized_crop(x, t, l, h, w, [size, size], interpolation=T.InterpolationMode.BILINEAR, antialias=False)
    if row[FLIP] > 0.5:
        x = TF.horizontal_flip(x)
    if row[JITTER] > 0.5:
        x = TF.adjust_brightness(x, float(row[BRIGHT]))
        x = TF.adjust_contrast(x, float(row[CONTRAST]))
        if x.shape[0] == 3:
            x = TF.adjust_saturation(x, float(row[SAT]))
            x = TF.adjust_hue(x, float(row[HUE]))
    if row[GRAY] > 0.5 and x.shape[0] == 3:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[BLUR] > 0.5:
        x = TF.gaussian_blur(x, [k, k], [float(row[SIGMA])] * 2)
    if row[SOLARIZE] > 0.5:
        x = TF.solarize(x, 0.5)
    return TF.normalize(x, mean, std)


def random_batch(B, C, H, W, seed, views=(VIEW, VIEW)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    return images, common.sample_params(B, H, W, C, g, views=views)


@pytest.mark.parametrize("C,H,size", [(1, 28, 28), (3, 28, 28), (1, 33, 33), (3, 64, 64), (3, 40, 24)])
def test_reference_matches_torchvision(C, H, size):
    all_on = common.ViewProbs(jitter=1, gray=0.5, blur=1, solarize=0.5)
    images, params = random_batch(12, C, H, H, seed=C * 100 + H, views=(VIEW, all_on))
    mean, std = [0.4] * C, [0.25] * C
    k = blur_kernel_size(size)
    out = augment_reference(images, params, size, mean, std)
    assert out.shape == (2, 12, C, size, size) and out.dtype == torch.float32
    for v in range(2):
        for b in range(12):
            ref = torchvision_view(images[b], params[v, b], size, mean, std, k)
            err = (out[v, b] - ref).abs().max().item()
            assert err <= TOL, f"view {v} image {b}: max abs diff {err} > {TOL}, params {params[v, b].tolist()}"


def test_reference_edge_cases_match_torchvision():
    """Full-image crop, 1-pixel crops at each corner, tiny sigma, everything off and everything on."""
    C, H = 3, 20
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (6, C, H, H), generator=g, dtype=torch.uint8)
    p = torch.zeros(1, 6, P)
    p[..., BRIGHT] = p[..., CONTRAST] = p[..., SAT] = 1.0
    p[..., SIGMA] = 1.0
    p[0, 0, [HEIGHT, WIDTH]] = H  # identity crop, nothing else: the output is the normalized input
    p[0, 1, [TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor([H - 1, H - 1, 1, 1.])  # bottom-right pixel
    p[0, 2, [TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor([0, 0, 1, H.__float__()])  # top row, full width
    p[0, 3, [TOP, LEFT, HEIGHT, WIDTH, BLUR, SIGMA]] = torch.tensor([0, 3, H, 7, 1, 1e-3])  # tiny sigma = no blur
    p[0, 4, :] = torch.tensor([2, 1, 15, 18, 1, 1, 1.3, 0.6, 1.4, -0.1, 1, 1, 2.0, 1])  # all flags on
    p[0, 5, :] = torch.tensor([0, 0, H, H, 0, 1, 0.0, 0.0, 0.0, 0.05, 0, 0, 1.0, 0])  # factors at 0
    out = augment_reference(images, p, H, [0.5] * 3, [0.5] * 3)
    assert torch.allclose(out[0, 0], (images[0].float() / 255 - 0.5) / 0.5, atol=1e-6)
    assert torch.allclose(out[0, 3], (TF.resized_crop(images[3].float() / 255, 0, 3, H, 7, [H, H], antialias=False) - 0.5) / 0.5, atol=1e-5)
    for b in range(6):
        ref = torchvision_view(images[b], p[0, b], H, [0.5] * 3, [0.5] * 3, blur_kernel_size(H))
        assert (out[0, b] - ref).abs().max() <= TOL, b


def test_params_are_reproducible_and_in_range():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = common.sample_params(500, 28, 28, 3, g1, views=(VIEW, VIEW))
    b = common.sample_params(500, 28, 28, 3, g2, views=(VIEW, VIEW))
    assert torch.equal(a, b) and a.shape == (2, 500, P) and a.dtype == torch.float32
    c = common.sample_params(500, 28, 28, 3, torch.Generator().manual_seed(4), views=(VIEW, VIEW))
    assert not torch.equal(a, c)
    t, l, h, w = a[..., TOP], a[..., LEFT], a[..., HEIGHT], a[..., WIDTH]
    for v in (t, l, h, w):
        assert torch.equal(v, v.round())  # integer-valued boxes
    assert (h >= 1).all() and (w >= 1).all() and (t >= 0).all() and (l >= 0).all()
    assert (t + h <= 28).all() and (l + w <= 28).all()
    assert ((a[..., BRIGHT] >= 0.6) & (a[..., BRIGHT] <= 1.4)).all()
    assert ((a[..., HUE] >= -0.1) & (a[..., HUE] <= 0.1)).all()
    assert ((a[..., SIGMA] >= 0.1) & (a[..., SIGMA] <= 2.0)).all()
    for col in (FLIP, JITTER, GRAY, BLUR, SOLARIZE):
        assert set(a[..., col].unique().tolist()) <= {0.0, 1.0}


def test_flag_frequencies_follow_the_probabilities():
    views = (common.ViewProbs(jitter=0.8, gray=0.2, blur=1.0, solarize=0.0),
             common.ViewProbs(jitter=0.3, gray=0.0, blur=0.1, solarize=0.2))
    p = common.sample_params(20000, 64, 64, 3, torch.Generator().manual_seed(0), views=views)
    freq = lambda v, col: p[v, :, col].mean().item()
    assert abs(freq(0, JITTER) - 0.8) < 0.02 and abs(freq(1, JITTER) - 0.3) < 0.02
    assert abs(freq(0, GRAY) - 0.2) < 0.02 and freq(1, GRAY) == 0
    assert freq(0, BLUR) == 1 and abs(freq(1, BLUR) - 0.1) < 0.02
    assert freq(0, SOLARIZE) == 0 and abs(freq(1, SOLARIZE) - 0.2) < 0.02
    assert abs(freq(0, FLIP) - 0.5) < 0.02
    gray_input = common.sample_params(1000, 28, 28, 1, torch.Generator().manual_seed(0), views=views)
    assert gray_input[..., GRAY].sum() == 0  # grayscale is an RGB-only step


def test_crop_boxes_follow_torchvision_distribution():
    """Area fraction and aspect ratio statistics match torchvision's RandomResizedCrop.get_params."""
    torch.manual_seed(0)
    img = torch.zeros(1, 64, 64)
    tv = torch.tensor([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(4000)]).float()
    ours = common.sample_params(4000, 64, 64, 1, torch.Generator().manual_seed(1), views=(VIEW,))[0]
    ours = torch.stack([ours[:, HEIGHT], ours[:, WIDTH]], 1)
    for hw in (tv, ours):
        assert (hw[:, 0] * hw[:, 1] >= 0.08 * 64 * 64 * 0.85).all()  # scale floor, up to rounding
    area = lambda hw: hw[:, 0] * hw[:, 1] / 4096
    logr = lambda hw: (hw[:, 1] / hw[:, 0]).log()
    assert abs(area(tv).mean() - area(ours).mean()) < 0.02
    assert abs(area(tv).std() - area(ours).std()) < 0.02
    assert abs(logr(tv).mean() - logr(ours).mean()) < 0.02
    assert abs(logr(tv).std() - logr(ours).std()) < 0.02
    assert logr(ours).abs().max() <= math.log(4 / 3) + 0.15


def test_reference_rejects_bad_arguments():
    images, params = random_batch(4, 1, 28, 28, seed=0)
    ok = dict(size=28, mean=[0.5], std=[0.5])
    cases = [
        ((images.float(), params), ok, "uint8"),
        ((images[0], params), ok, "uint8 tensor N x C x H x W"),
        ((torch.zeros(4, 2, 28, 28, dtype=torch.uint8), params), ok, "1 or 3 channels"),
        ((images, params[:, :3]), ok, r"params must be float32 of shape \(V, 4, 14\)"),
        ((images, params.double()), ok, "params must be float32"),
        ((images, params), dict(ok, mean=[0.5, 0.5]), "one per channel"),
        ((images, params), dict(ok, std=[0.0]), "std > 0"),
        ((images, params), dict(ok, size=0), "size >= 1"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            augment_reference(*args, **kw)
    with pytest.raises(ValueError, match="odd blur_kernel"):
        augment_reference(images, params, 28, [0.5], [0.5], blur_kernel=4)
