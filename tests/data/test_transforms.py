"""Image transforms: the eval path vs a direct PIL + numpy oracle, input conversions, errors, the train path.

Oracle for ``test_transform``: PIL bicubic resize -> uint8 / 255 -> (x - mean) / std, computed here in numpy
(what torchvision's Resize + ToTensor + Normalize compute on a PIL image).
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mplug_fast.data import grounding_transform as G
from mplug_fast.data import transforms as T


def _rgb(h: int = 37, w: int = 53, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _oracle(img: Image.Image, R: int) -> torch.Tensor:
    a = np.asarray(img.convert("RGB").resize((R, R), Image.BICUBIC)).astype(np.float32) / 255.0
    a = (a - np.array(T.CLIP_MEAN, np.float32)) / np.array(T.CLIP_STD, np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


# ---- test transform ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("R", [16, 32, 224])
def test_test_transform_matches_pil_oracle(R):
    img = _rgb()
    out = T.test_transform(R)(img)
    assert out.shape == (3, R, R) and out.dtype == torch.float32
    torch.testing.assert_close(out, _oracle(img, R), rtol=0, atol=1e-6)


def test_constants():
    assert T.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert T.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    x = torch.rand(3, 5, 5)
    torch.testing.assert_close(T.denormalize(T.normalize(x)), x)


def test_test_transform_is_not_collected_by_pytest():
    assert T.test_transform.__test__ is False and T.TestTransform.__test__ is False


# ---- input conversions -------------------------------------------------------------------------------------


def test_modes_convert_like_official():
    rgb = _rgb()
    ref = T.test_transform(16)(rgb)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(7)  # alpha is dropped, not composited (official .convert('RGB'))
    torch.testing.assert_close(T.test_transform(16)(rgba), ref)
    grey = rgb.convert("L")
    expected_grey = T.test_transform(16)(grey.convert("RGB"))
    torch.testing.assert_close(T.test_transform(16)(grey), expected_grey)
    g = T.load_image(grey)
    assert g.mode == "RGB" and np.array_equal(np.asarray(g)[..., 0], np.asarray(grey))
    pal = rgb.convert("P")
    assert np.array_equal(np.asarray(T.load_image(pal)), np.asarray(pal.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    assert T.load_image(cmyk).mode == "RGB"
    sixteen = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert np.asarray(T.load_image(sixteen)).max() == 255 and T.load_image(sixteen).size == (5, 4)
    half = Image.fromarray(np.full((4, 5), 257 * 100, dtype=np.uint16))
    assert (np.asarray(T.load_image(half)) == 100).all()  # scaled, not saturated


def test_numpy_and_tensor_inputs_match_pil():
    rgb = _rgb()
    a = np.asarray(rgb)  # [H, W, 3] uint8
    ref = T.test_transform(16)(rgb)
    tf = T.test_transform(16)
    for x in [
        a,
        a.astype(np.float32) / 255.0,
        a.astype(np.float64) / 255.0,
        torch.from_numpy(a.copy()),  # HWC uint8
        torch.from_numpy(a.copy()).permute(2, 0, 1),  # CHW uint8
        torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0,  # CHW float
        torch.from_numpy(a.copy()).float() / 255.0,  # HWC float
        np.concatenate([a, np.full(a.shape[:2] + (1,), 9, np.uint8)], axis=2),  # RGBA
    ]:
        out = tf(x)
        assert out.shape == (3, 16, 16)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grey = np.asarray(rgb.convert("L"))
    grey_ref = tf(rgb.convert("L"))
    for x in [grey, grey[:, :, None], torch.from_numpy(grey.copy()), torch.from_numpy(grey.copy())[None]]:
        torch.testing.assert_close(tf(x), grey_ref, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        T.load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.jpg.*cannot identify"):
        T.load_image(str(bad))
    good = tmp_path / "cut.jpg"
    _rgb(64, 64).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.jpg"):
        T.load_image(truncated)
    with pytest.raises(IsADirectoryError):
        T.load_image(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        T.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="empty"):
        T.load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        T.load_image(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        T.load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="uint16"):
        T.load_image(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(TypeError, match="dtype"):
        T.load_image(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="channels"):
        T.load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="neither CHW nor HWC"):
        T.load_image(torch.zeros(5, 4, 6))
    with pytest.raises(ValueError, match="dims"):
        T.load_image(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        T.load_image(42)
    with pytest.raises(ValueError, match="image_size"):
        T.test_transform(0)


# ---- train transform ---------------------------------------------------------------------------------------


def test_random_resized_crop_params_match_torchvision_semantics():
    rng = random.Random(0)
    for _ in range(200):
        W, H = rng.randint(10, 300), rng.randint(10, 300)
        i, j, h, w = T.random_resized_crop_params(W, H, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= H and j + w <= W
    # an impossible aspect range falls back to the clamped centre crop
    i, j, h, w = T.random_resized_crop_params(400, 100, (0.99, 1.0), (1.0, 1.0), random.Random(0))
    assert (h, w) == (100, 100) and (i, j) == (0, 150)
    i, j, h, w = T.random_resized_crop_params(100, 400, (0.99, 1.0), (1.0, 1.0), random.Random(0))
    assert (h, w) == (100, 100) and (i, j) == (150, 0)


def test_train_transform_deterministic_shape_dtype():
    img = _rgb(80, 120)
    a = T.train_transform(32, seed=123)
    b = T.train_transform(32, seed=123)
    xs, ys = [a(img) for _ in range(5)], [b(img) for _ in range(5)]
    for x, y in zip(xs, ys):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.equal(xs[0], xs[1])  # the stream advances
    tf = T.train_transform(32)
    torch.testing.assert_close(tf(img, rng=random.Random(5)), tf(img, rng=random.Random(5)), rtol=0, atol=0)


def test_train_transform_without_augmentation_is_crop_resize():
    img = _rgb(60, 60)
    tf = T.train_transform(16, scale=(1.0, 1.0), hflip=False, randaugment=False, seed=0)
    # scale 1 with ratio != 1 never fits a square image except at ratio ~1; the result is a (near-)full crop
    out = tf(img)
    assert out.shape == (3, 16, 16)
    i, j, h, w = T.random_resized_crop_params(60, 60, (1.0, 1.0), (3 / 4, 4 / 3), random.Random(0))
    expected = _oracle(img.crop((j, i, j + w, i + h)), 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_flip_actually_flips():
    img = _rgb(40, 40)
    tf_flip = T.train_transform(16, scale=(1.0, 1.0), hflip=True, randaugment=False)
    tf_plain = T.train_transform(16, scale=(1.0, 1.0), hflip=False, randaugment=False)
    flipped = 0
    for k in range(20):
        x, y = tf_flip(img, rng=random.Random(k)), tf_plain(img, rng=random.Random(k))
        if torch.equal(x, y):
            continue
        torch.testing.assert_close(x, y.flip(-1), rtol=0, atol=0)  # the same crop, mirrored
        flipped += 1
    assert 3 <= flipped <= 17  # p = 0.5


def test_randaugment_args_and_ops():
    rng = random.Random(0)
    assert T.randaug_args("Brightness", 7, rng) == pytest.approx((1.36,))
    assert T.randaug_args("Sharpness", 7, rng) == pytest.approx((1.36,))
    signs = set()
    for _ in range(50):
        (v, fill) = T.randaug_args("Rotate", 7, rng)
        assert abs(v) == pytest.approx(21.0) and fill == (128, 128, 128)
        signs.add(v > 0)
    assert signs == {True, False}
    assert abs(T.randaug_args("ShearX", 7, rng)[0]) == pytest.approx(0.21)
    assert abs(T.randaug_args("TranslateY", 7, rng)[0]) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="Available"):
        T.randaug_args("Solarize", 7, rng)
    img = _rgb(24, 24)
    for name in T.RANDAUG_OPS:
        out = T.RANDAUG_FUNCS[name](img, *T.randaug_args(name, 7, random.Random(1)))
        assert out.mode == "RGB" and out.size == img.size, name


def test_randaugment_geometry_and_fill():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    rot = np.asarray(T.rotate(white, 21.0))
    assert tuple(rot[0, 0]) == (128, 128, 128) and tuple(rot[-1, -1]) == (128, 128, 128)  # grey corners
    assert tuple(rot[16, 16]) == (255, 255, 255)
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, 10] = 255  # a vertical line at x = 10
    moved = np.asarray(T.translate_x(Image.fromarray(a), 3.0))  # content moves left by 3 (official sign)
    assert (moved[:, 7] == 255).all() and (moved[:, -3:] == 128).all()
    down = np.asarray(T.translate_y(Image.fromarray(a), -2.0))  # negative offset: content moves down
    assert (down[:2] == 128).all()
    sheared = np.asarray(T.shear_x(Image.fromarray(a), 0.21))
    assert sheared.shape == a.shape
    dark = Image.new("RGB", (8, 8), (100, 50, 10))
    assert tuple(np.asarray(T.brightness(dark, 1.36))[0, 0]) == (136, 68, 13)
    ramp = Image.fromarray(np.tile(np.arange(50, 100, dtype=np.uint8), (4, 1))[..., None].repeat(3, 2))
    ac = np.asarray(T.autocontrast(ramp))
    assert ac.min() == 0 and ac.max() >= 254  # PIL (and the official table) truncate
    assert T.equalize(ramp).size == ramp.size
    with pytest.raises(ValueError, match="unknown"):
        T.RandomAugment(ops=["Nope"])


def test_randaugment_applies_ops_with_probability():
    img = _rgb(24, 24)
    ra = T.RandomAugment(2, 7)
    changed = sum(
        not np.array_equal(np.asarray(ra(img, random.Random(k))), np.asarray(img)) for k in range(60)
    )
    assert 15 < changed < 60  # P(no change) = (0.5 + 0.5 * 0.1)^2 ~ 0.3


# ---- RandomAugment ops vs numpy ports of the official OpenCV ops -------------------------------------------


def _smooth(h: int, w: int) -> np.ndarray:
    """A smooth test picture (bilinear rounding differences stay below one grey level)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [127 + 100 * np.sin(xs / 5.0 + c) * np.cos(ys / 7.0 - c) for c in range(3)]
    return np.stack(chans, -1).round().astype(np.uint8)


def _cv2_warp_affine(a: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cv2.warpAffine(a, M) semantics (forward M, pixel centres at integer coordinates, bilinear), in float;
    also the mask of output pixels whose source lies inside the image (the 1-px border rule differs)."""
    H, W = a.shape[:2]
    Ai = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    sx = Ai[0, 0] * xs + Ai[0, 1] * ys + Ai[0, 2]
    sy = Ai[1, 0] * xs + Ai[1, 1] * ys + Ai[1, 2]
    inside = (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    x0 = np.clip(np.floor(sx), 0, W - 2).astype(int)
    y0 = np.clip(np.floor(sy), 0, H - 2).astype(int)
    dx, dy = (sx - x0)[..., None], (sy - y0)[..., None]
    f = a.astype(np.float64)
    out = (
        f[y0, x0] * (1 - dx) * (1 - dy)
        + f[y0, x0 + 1] * dx * (1 - dy)
        + f[y0 + 1, x0] * (1 - dx) * dy
        + f[y0 + 1, x0 + 1] * dx * dy
    )
    return out, inside


def _rotation_matrix(deg: float, W: int, H: int) -> np.ndarray:
    """cv2.getRotationMatrix2D((W / 2, H / 2), deg, 1)."""
    al, be = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    cx, cy = W / 2, H / 2
    return np.array([[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]])


@pytest.mark.parametrize(
    "name, arg, M",
    [
        ("Rotate", 21.0, None),
        ("Rotate", -21.0, None),
        ("ShearX", 0.21, np.array([[1, 0.21, 0], [0, 1, 0]])),
        ("ShearY", -0.21, np.array([[1, 0, 0], [-0.21, 1, 0]])),
        ("TranslateX", 7.0, np.array([[1, 0, -7.0], [0, 1, 0]])),
        ("TranslateY", -7.0, np.array([[1, 0, 0], [0, 1, 7.0]])),
    ],
)
def test_affine_ops_match_official_cv2_geometry(name, arg, M):
    a = _smooth(40, 50)
    H, W = a.shape[:2]
    M = _rotation_matrix(arg, W, H) if M is None else M
    ours = np.asarray(T.RANDAUG_FUNCS[name](Image.fromarray(a), arg, (128, 128, 128))).astype(np.float64)
    ref, inside = _cv2_warp_affine(a, M)
    assert inside.mean() > 0.8
    err = np.abs(ours - ref)[inside]
    assert err.max() <= 1.0 + 1e-9, f"max |ours - cv2| = {err.max():.3f} (mean {err.mean():.3f})"
    outside = np.asarray(T.RANDAUG_FUNCS[name](Image.fromarray(a), arg, (128, 128, 128)))[~inside]
    assert (outside == 128).all(-1).mean() > 0.8  # beyond the border: the fill (cv2 blends the 1-px rim)


def test_pointwise_ops_match_official_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(30, 200, (20, 24, 3), dtype=np.uint8)
    a[..., 1] = rng.integers(0, 90, (20, 24))  # a different range per channel
    img = Image.fromarray(a)

    # autocontrast_func (cutoff 0): per channel table arange * scale + offset, truncated to uint8
    exp = np.empty_like(a)
    for c in range(3):
        ch = a[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        table = (np.arange(256) * (255 / (hi - lo)) - lo * (255 / (hi - lo))).clip(0, 255).astype(np.uint8)
        exp[..., c] = table[ch]
    assert np.abs(np.asarray(T.autocontrast(img)).astype(int) - exp).max() <= 1

    # equalize_func: PIL's algorithm ported to numpy by the official code
    exp = np.empty_like(a)
    for c in range(3):
        ch = a[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float64)
        nz = hist[hist != 0]
        step = np.sum(nz[:-1]) // 255
        if step == 0:
            exp[..., c] = ch
            continue
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        exp[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    np.testing.assert_array_equal(np.asarray(T.equalize(img)), exp)

    # brightness_func: (arange * factor).clip.astype(uint8)
    table = (np.arange(256, dtype=np.float32) * 1.36).clip(0, 255).astype(np.uint8)
    assert np.abs(np.asarray(T.brightness(img, 1.36)).astype(int) - table[a]).max() <= 1

    # sharpness_func: interior = degenerate + f * (img - degenerate), degenerate = 3x3 smoothing
    # [[1,1,1],[1,5,1],[1,1,1]] / 13
    f = a.astype(np.float64)
    k = np.ones((3, 3))
    k[1, 1] = 5
    k /= 13
    deg = sum(k[i, j] * f[i : i + f.shape[0] - 2, j : j + f.shape[1] - 2] for i in range(3) for j in range(3))
    deg = np.rint(deg)  # cv2.filter2D on uint8 rounds
    inner = (deg + 1.36 * (f[1:-1, 1:-1] - deg)).clip(0, 255)
    ours = np.asarray(T.sharpness(img, 1.36)).astype(np.float64)
    assert np.abs(ours[1:-1, 1:-1] - inner).max() <= 1.0 + 1e-9
    np.testing.assert_array_equal(ours[0], f[0])  # the border is left as is


# ---- grounding transform -----------------------------------------------------------------------------------


def _scene_with_box(W: int = 200, H: int = 120, box=(30, 20, 90, 70)) -> Image.Image:
    a = np.full((H, W, 3), 90, np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = (230, 20, 20)  # a red box on grey
    return Image.fromarray(a)


def _red_bbox(sample: G.GroundingSample, mean=T.CLIP_MEAN, std=T.CLIP_STD) -> tuple[int, int, int, int]:
    rgb = T.denormalize(sample.image, mean, std)  # [3, S, S] in [0, 1] (padding = the mean colour)
    red = (rgb[0] > 0.6) & (rgb[1] < 0.35) & sample.image_mask
    ys, xs = torch.nonzero(red, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_swap_left_right():
    assert (
        G.swap_left_right("the man on the left, right of the dog") == "the man on the right, left of the dog"
    )
    assert G.swap_left_right("leftmost bright light") == "rightmost bright light"


def test_grounding_eval_transform_resizes_pads_and_maps_the_box():
    img = _scene_with_box()
    tf = G.GroundingTransform(64)
    s = tf(img, (30, 20, 90, 70), "the red box")
    assert (
        s.image.shape == (3, 64, 64) and s.image_mask.shape == (64, 64) and s.image_mask.dtype == torch.bool
    )
    # 200 x 120 -> 64 x 38 (long side 64), centred: top = round(26 / 2 - 0.1) = 13
    assert s.image_mask.sum() == 64 * 38 and s.image_mask[13:51].all() and not s.image_mask[:13].any()
    assert (s.image[:, ~s.image_mask] == 0).all()  # zero padding (the mean colour)
    resized = np.asarray(img.resize((64, 38), Image.BILINEAR)).astype(np.float32) / 255.0
    expected = (resized - np.array(T.CLIP_MEAN, np.float32)) / np.array(T.CLIP_STD, np.float32)
    torch.testing.assert_close(s.image[:, 13:51], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    r = 64 / 200
    x0, y0, x1, y1 = 30 * r, 20 * r + 13, 90 * r, 70 * r + 13
    torch.testing.assert_close(s.box, torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 64)
    assert s.text == "the red box"
    official = G.GroundingTransform(64, mean=G.IMAGENET_MEAN, std=G.IMAGENET_STD)(img, (30, 20, 90, 70))
    assert not torch.equal(official.image, s.image)
    with pytest.raises(ValueError, match="box_xyxy"):
        tf(img, (5, 5, 1, 1))


def test_grounding_train_transform_keeps_box_on_the_object():
    img = _scene_with_box(300, 200, (100, 60, 180, 140))
    tf = G.GroundingTransform(64, train=True, color_jitter=False)
    flipped = 0
    for k in range(25):
        s = tf(img, (100, 60, 180, 140), "a red box", rng=random.Random(k))
        assert s.image.shape == (3, 64, 64) and ((s.box >= 0) & (s.box <= 1)).all()
        cx, cy, w, h = (s.box * 64).tolist()
        measured = _red_bbox(s)
        expected = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        assert max(abs(a - b) for a, b in zip(measured, expected)) <= 1.5, (k, measured, expected)
    for k in range(25):
        s = tf(img, (100, 60, 180, 140), "the box on the left", rng=random.Random(k))
        flipped += s.text == "the box on the right"
    assert 4 <= flipped <= 21
    a = tf(img, (100, 60, 180, 140), "x", rng=random.Random(3))
    b = tf(img, (100, 60, 180, 140), "x", rng=random.Random(3))
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert torch.equal(a.box, b.box)
    jitter = G.GroundingTransform(64, train=True, seed=0)
    assert jitter(img, (100, 60, 180, 140), "x").image.shape == (3, 64, 64)
