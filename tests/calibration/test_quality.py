"""``adacache_fx.calibration.quality.ms_gmsd`` (MS-GMSD): 0 for identical inputs, symmetric, larger
for more noise, equal to an independent per-image, per-scale re-implementation on odd shapes and
low-precision dtypes, clear errors; and how ``calibrate`` reads its outputs as images."""
import math

import pytest
import torch

from adacache_fx.calibration import measure, quality
from adacache_fx.calibration.quality import ms_gmsd


# ----- an independent float64 re-implementation: one image, one scale at a time -----------------
# From the paper and piq's multi_scale_gmsd (chromatic for RGB): pixels on 0..255, YIQ, Prewitt
# gradients with zero padding, 2x2 means, scale weights, T = 170, alpha = 0.5, beta1..3.
def _halve(p):
    """2x2 mean of a plane; an odd side first padded with a zero row and column (both)."""
    pad = max(p.shape[0] % 2, p.shape[1] % 2)
    q = torch.zeros(p.shape[0] + pad, p.shape[1] + pad, dtype=p.dtype)
    q[:p.shape[0], :p.shape[1]] = p
    h, w = q.shape[0] // 2 * 2, q.shape[1] // 2 * 2
    return (q[0:h:2, 0:w:2] + q[1:h:2, 0:w:2] + q[0:h:2, 1:w:2] + q[1:h:2, 1:w:2]) / 4


def _gradient_magnitude(p):
    z = torch.zeros(p.shape[0] + 2, p.shape[1] + 2, dtype=p.dtype)
    z[1:-1, 1:-1] = p
    right = z[:-2, 2:] + z[1:-1, 2:] + z[2:, 2:]
    left = z[:-2, :-2] + z[1:-1, :-2] + z[2:, :-2]
    below = z[2:, :-2] + z[2:, 1:-1] + z[2:, 2:]
    above = z[:-2, :-2] + z[:-2, 1:-1] + z[:-2, 2:]
    return torch.sqrt(((right - left) / 3) ** 2 + ((below - above) / 3) ** 2)


def _reference_image(x, y):
    """MS-GMSD of two float64 images (C, H, W) on the 0..255 scale."""
    if x.shape[0] == 3:
        def yiq(v):
            r, g, b = v
            return [0.299 * r + 0.587 * g + 0.114 * b, 0.5959 * r - 0.2746 * g - 0.3213 * b,
                    0.2115 * r - 0.5227 * g + 0.3112 * b]
        px, py = yiq(x), yiq(y)
    else:
        px, py = [x[0]], [y[0]]
    total = 0.0
    for scale, weight in enumerate([0.096, 0.596, 0.289, 0.019]):
        if scale:
            px, py = [_halve(p) for p in px], [_halve(p) for p in py]
        gx, gy = _gradient_magnitude(px[0]), _gradient_magnitude(py[0])
        gms = (1.5 * gx * gy + 170) / (gx ** 2 + gy ** 2 - 0.5 * gx * gy + 170)
        total += weight * float(((gms - gms.mean()) ** 2).mean())
    d = math.sqrt(total)
    if x.shape[0] == 1:
        return d
    chroma = math.sqrt(float(((px[1] - py[1]) ** 2).mean()) + float(((px[2] - py[2]) ** 2).mean()))
    gamma = 2 / (1 + 0.32 * math.exp(-15 * d)) - 1
    return gamma * d + (1 - gamma) * 0.01 * chroma


def reference(a, b, data_range=1.0):
    """Per sample: the mean over frames of each frame's MS-GMSD."""
    a, b = a.double() * 255 / data_range, b.double() * 255 / data_range
    if a.dim() == 4:
        a, b = a[:, :, None], b[:, :, None]
    return torch.tensor([sum(_reference_image(a[n, :, f], b[n, :, f]) for f in range(a.shape[2])) / a.shape[2]
                         for n in range(a.shape[0])], dtype=torch.float64)


# ----- inputs ------------------------------------------------------------------------------------
def _smooth(shape, seed):
    """Images in [0.1, 0.9] with structure at every scale (a blurred random field)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(shape, generator=g, dtype=torch.float64)
    flat = v.reshape(-1, 1, *shape[-2:])
    flat = torch.nn.functional.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)
    return (0.1 + 0.8 * (flat - flat.amin()) / (flat.amax() - flat.amin())).reshape(shape)


def _noisy(x, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


SHAPES = [(2, 1, 37, 53), (2, 3, 37, 53), (1, 3, 64, 48), (2, 1, 1, 64, 48), (1, 3, 3, 37, 53),
          (2, 1, 3, 17, 17), (1, 3, 1, 20, 35)]


# ----- properties --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_inputs_score_zero(shape):
    x = _smooth(shape, 0)
    assert ms_gmsd(x, x.clone()).tolist() == [0.0] * shape[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_symmetric(shape):
    """The gradient similarity and the chromatic RMS are symmetric in the two images, so the
    metric is exactly symmetric (no reference/distorted asymmetry in this definition)."""
    x = _smooth(shape, 1)
    y = _noisy(x, 0.05, 2)
    assert torch.equal(ms_gmsd(x, y), ms_gmsd(y, x))


@pytest.mark.parametrize("channels", [1, 3])
def test_more_noise_scores_higher(channels):
    x = _smooth((3, channels, 2, 40, 40), 3)
    scores = [ms_gmsd(x, _noisy(x, sigma, 4)) for sigma in (0.002, 0.01, 0.03, 0.1, 0.3)]
    for lower, higher in zip(scores, scores[1:]):
        assert (lower < higher).all(), (lower, higher)


# ----- against the independent re-implementation ------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_implementation(shape):
    x = _smooth(shape, 5)
    y = _noisy(x, 0.04, 6)
    expected = reference(x, y)
    assert expected.min() > 1e-3            # a real difference, not a trivially small one
    torch.testing.assert_close(ms_gmsd(x, y), expected, rtol=1e-12, atol=1e-15)
    # another data range: the same images on 0..255
    torch.testing.assert_close(ms_gmsd(x * 255, y * 255, data_range=255), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-8), (torch.float16, 1e-4), (torch.bfloat16, 5e-4)])
@pytest.mark.parametrize("shape", [(2, 3, 3, 37, 53), (2, 1, 64, 48)])
def test_low_precision_inputs_are_scored_in_float64(dtype, tolerance, shape):
    """The input's rounding is the only error: on the rounded values the score is the float64
    reference's to 1e-12, and within the rounding's effect of the float64 inputs' score."""
    x = _smooth(shape, 7)
    y = _noisy(x, 0.04, 8)
    xl, yl = x.to(dtype), y.to(dtype)
    got = ms_gmsd(xl, yl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference(xl.double(), yl.double()), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got, reference(x, y), rtol=0, atol=tolerance)


def test_long_videos_are_scored_in_chunks_with_the_same_result(monkeypatch):
    x = _smooth((2, 3, 5, 20, 24), 9)
    y = _noisy(x, 0.05, 10)
    whole = ms_gmsd(x, y)
    monkeypatch.setattr(quality, "IMAGES_PER_CHUNK", 3)   # 10 images: chunks of 3, 3, 3, 1
    torch.testing.assert_close(ms_gmsd(x, y), whole, rtol=1e-14, atol=0)


def test_reference_model_videos_are_measured_on_0_1():
    """The examples' wrapper: videos in [-1, 1] mapped to [0, 1], the mean over the batch."""
    from examples.reference.quality import ms_gmsd as video_ms_gmsd

    x = _smooth((2, 3, 3, 32, 32), 11)
    y = _noisy(x, 0.05, 12)
    assert video_ms_gmsd(2 * x - 1, 2 * y - 1) == pytest.approx(float(reference(x, y).mean()), rel=1e-12)
    assert video_ms_gmsd(2 * x - 1, 2 * x - 1) == 0.0


# ----- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape,b_shape,kwargs,message", [
    ((1, 3, 32, 32), (1, 3, 32, 31), {}, "same shape"),
    ((3, 32, 32), (3, 32, 32), {}, r"\(B, C, H, W\) or videos"),
    ((1, 2, 32, 32), (1, 2, 32, 32), {}, "1 \\(grey\\) or 3 \\(RGB\\) channels"),
    ((1, 3, 4, 16, 32), (1, 3, 4, 16, 32), {}, "at least 17 pixels"),
    ((1, 1, 32, 16), (1, 1, 32, 16), {}, "at least 17 pixels"),
    ((0, 1, 32, 32), (0, 1, 32, 32), {}, "empty"),
    ((1, 1, 32, 32), (1, 1, 32, 32), {"data_range": 0}, "data_range"),
    ((1, 1, 32, 32), (1, 1, 32, 32), {"data_range": math.inf}, "data_range"),
    ((1, 1, 32, 32), (1, 1, 32, 32), {"data_range": True}, "data_range"),
])
def test_bad_inputs_raise_clearly(a_shape, b_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ms_gmsd(torch.zeros(a_shape), torch.zeros(b_shape), **kwargs)


def test_non_tensors_raise():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ms_gmsd([[0.0]], torch.zeros(1, 1, 32, 32))


# ----- calibrate's reading of a generation's output ---------------------------------------------
@pytest.mark.parametrize("shape,images_shape", [
    ((2, 3, 4, 20, 24), (2, 3, 4, 20, 24)),    # (B, 3, F, H, W): RGB videos as they are
    ((2, 4, 3, 20, 24), (8, 3, 20, 24)),       # (B, F, 3, H, W): diffusers "pt" frames
    ((2, 4, 20, 24, 3), (8, 3, 20, 24)),       # (B, F, H, W, 3): diffusers "np" frames
    ((2, 16, 4, 20, 24), (128, 1, 20, 24)),    # latents: every (H, W) slice a grey image
    ((20, 24), (1, 1, 20, 24)),
    ((1, 3, 4, 5, 5), None), ((2, 40, 3), None), ((40,), None),   # too small, or not images
])
def test_outputs_read_as_images(shape, images_shape):
    v = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    images = measure.as_images(v)
    assert (None if images is None else tuple(images.shape)) == images_shape
    if shape == (2, 4, 20, 24, 3):   # channels last: pixel (h, w) of frame 1 keeps its colours
        assert torch.equal(images[1, :, 5, 7], v[0, 1, 5, 7])


def test_output_measure_shifts_by_the_reference_minimum():
    """[-1, 1] videos over their range (2) give the score of the [0, 1] videos; latents too."""
    x = _smooth((1, 3, 2, 24, 24), 13)
    x[..., 0, 0] = 0.0
    x[..., 0, 1] = 1.0   # the reference spans exactly [0, 1]
    y = _noisy(x, 0.05, 14)
    expected = float(reference(x, y).mean())
    assert measure.output_ms_gmsd(2 * y - 1, 2 * x - 1, None) == pytest.approx(expected, rel=1e-12)
    assert measure.output_ms_gmsd(2 * y - 1, 2 * x - 1, 2.0) == pytest.approx(expected, rel=1e-12)
    assert measure.output_ms_gmsd(torch.zeros(1, 3, 4, 5, 5), torch.zeros(1, 3, 4, 5, 5), None) is None
