"""Image loading and the official mPLUG image transforms (fidelity §7), on Pillow + torch (no torchvision).

    test_transform(R)    Resize((R, R), bicubic) -> ToTensor -> Normalize(CLIP mean/std)      (every eval)
    train_transform(R)   RandomResizedCrop(R, scale, bicubic) -> RandomHorizontalFlip(0.5)
                         -> RandomAugment(N=2, M=7) -> ToTensor -> Normalize(CLIP mean/std)
                         scale (0.2, 1.0) for pre-training, (0.5, 1.0) (the default) for fine-tuning

``test_transform`` is pixel-for-pixel what torchvision computes on a PIL image: torchvision's PIL
``Resize`` is ``img.resize((W, H), BICUBIC)``, ``ToTensor`` is ``uint8 / 255`` and ``Normalize`` is
``(x - mean) / std``. ``train_transform`` reproduces torchvision's ``RandomResizedCrop.get_params`` (10 tries,
area scale, log-uniform aspect ratio in (3/4, 4/3), centre-crop fallback) drawing from a ``random.Random``
instead of torch's RNG.

RandomAugment (the official ``dataset/randaugment.py``, shared with ALBEF/BLIP): two ops drawn with
replacement from the ten below, each applied with probability 0.5, at magnitude M = 7 of MAX_LEVEL = 10:

    Identity, AutoContrast, Equalize       no argument
    Brightness, Sharpness                  factor (M/10)*1.8 + 0.1 = 1.36 (always > 1: never inverted)
    ShearX, ShearY                         (M/10)*0.3 = 0.21, sign random
    TranslateX, TranslateY                 (M/10)*10 = 7 px, sign random
    Rotate                                 (M/10)*30 = 21 degrees, sign random
    fill of the uncovered area             (128, 128, 128); affine ops resample bilinearly

The official ops are written with OpenCV on numpy arrays; ours are the PIL equivalents (``ImageOps``,
``ImageEnhance``, ``Image.transform``/``rotate``), which the official code documents as its own reference
("same output as PIL..."). The affine warps use cv2's geometry (pixel centres at integer coordinates; PIL
puts them at +0.5, so shear and rotation carry a half-pixel correction). Differences left: the 1-px image
border (cv2 blends edge pixels with the fill, PIL replicates them; sharpness leaves the border unfiltered in
both), cv2's 1/32-pixel fixed-point interpolation, and rounding (+-1 grey level).

Caveats:
    * The horizontal flip flips the image only; for VQA the question is not changed (as in the official code).
      ``GroundingTransform`` (TransVG's pipeline, in ``grounding_transform.py``) swaps left/right in the text.
    * ``load_image`` does not apply EXIF orientation (nor does the official ``Image.open(p).convert('RGB')``).
    * RNG: with ``seed=None`` the transforms draw from Python's global ``random`` module, which the PyTorch
      DataLoader reseeds in every worker; a fixed ``seed`` makes a private ``random.Random`` (every DataLoader
      worker then gets a copy of the same stream -- pass ``rng=`` per call to control it exactly).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel statistics (all official transforms)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RANDAUG_MAX_LEVEL = 10  # official MAX_LEVEL
RANDAUG_FILL = (128, 128, 128)  # official replace_value
ImageLike = str | Path | Image.Image | np.ndarray | Tensor
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ---- loading -----------------------------------------------------------------------------------------------


def _open_path(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"image path {str(path)!r} is a directory, expected an image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated/corrupt data fails here with the path in the message
            return _pil_to_rgb(im)
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {str(path)!r}: PIL cannot identify it as an image ({e})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: as an error
        raise ValueError(f"cannot read image {str(path)!r}: over PIL's decompression-bomb limit ({e})") from e
    except (OSError, SyntaxError) as e:  # truncated files raise OSError; some broken headers SyntaxError
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB' with ``convert('RGB')`` (official); 16-bit grey is first scaled to 8 bit."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image is empty: size {img.width}x{img.height} (width x height)")
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert('RGB') would saturate every value above 255 (an all-white picture); use the full range.
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.rint(a / 257.0).astype(np.uint8), mode="L").convert("RGB")
    # RGBA/LA/P with transparency: the alpha channel is dropped, not composited (as the official code does).
    return img.convert("RGB")


def _array_to_pil(a: np.ndarray, layout: str) -> Image.Image:
    """HWC / HW numpy array (uint8, or float in [0, 1]) -> RGB PIL image."""
    if a.ndim not in (2, 3):
        raise ValueError(f"image array must have 2 (HW) or 3 ({layout}) dims, got shape {list(a.shape)}")
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image array of shape {list(a.shape)} has {a.shape[2]} channels in the last axis; expected "
            f"{layout} with 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image is empty: array shape {list(a.shape)}")
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("float image contains NaN or inf")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; divide 0..255 data by 255 "
                f"or pass uint8"
            )
        u8 = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)  # rounded (torchvision truncates)
    else:
        raise TypeError(f"image array dtype must be uint8 or float (values in [0, 1]), got {a.dtype}")
    if u8.ndim == 3 and u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    mode = "L" if u8.ndim == 2 else ("RGB" if u8.shape[2] == 3 else "RGBA")
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(u8), mode=mode))


def load_image(image: ImageLike) -> Image.Image:
    """Any supported image input as an RGB PIL image.

    Args:
        image: one of
            * a path (str or Path) to a file PIL can read;
            * a PIL image of any mode: converted with ``convert('RGB')`` like the official code, so RGBA/LA
              and transparent palettes lose their alpha (not composited on white), CMYK/YCbCr/L/P are
              converted;
              16-bit grey ('I;16*') is scaled by 1/257 first (``convert`` would saturate it at 255);
            * a numpy array HWC (C = 1, 3 or 4) or HW, uint8 or float in [0, 1] (rounded to uint8);
            * a torch tensor CHW or HWC (C = 1, 3 or 4) or HW, uint8 or float in [0, 1]. A 3-D tensor whose
              first dim is 1, 3 or 4 is read as CHW (torch's convention), otherwise as HWC.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unreadable/corrupt file or one over PIL's decompression-bomb limit
            (``Image.MAX_IMAGE_PIXELS``; the message names the path and PIL's reason), empty image, wrong
            shape, float values outside [0, 1].
        TypeError: unsupported input type or dtype.
    """
    if isinstance(image, (str, Path)):
        return _open_path(Path(image))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, "HWC")
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.bool or not (t.dtype == torch.uint8 or t.is_floating_point()):
            raise TypeError(f"image tensor dtype must be uint8 or float (values in [0, 1]), got {t.dtype}")
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)  # CHW -> HWC
        elif t.dim() == 3 and t.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"image tensor of shape {list(t.shape)} is neither CHW nor HWC with 1, 3 or 4 channels"
            )
        if t.is_floating_point():
            t = t.float()
        return _array_to_pil(t.numpy(), "CHW or HWC")
    raise TypeError(
        f"unsupported image type {type(image).__name__}; pass a path, a PIL image, a numpy array or a tensor"
    )


# ---- tensor conversion -------------------------------------------------------------------------------------


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1] (torchvision ``ToTensor``: uint8 / 255)."""
    a = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def normalize(x: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """(x - mean) / std per channel. x: [3, H, W] or [B, 3, H, W] float. Returns a new tensor."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """Inverse of ``normalize`` (for viewing): x * std + mean."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (the square side in pixels), got {image_size!r}")
    return image_size


def make_rng(seed: int | random.Random | None) -> random.Random | Any:
    """A random transform's RNG: the global ``random`` module for None (the DataLoader reseeds it in every
    worker), ``seed`` itself when it is a ``random.Random``, else a private ``random.Random(seed)``."""
    if seed is None:
        return random
    return seed if isinstance(seed, random.Random) else random.Random(seed)


# ---- test transform ----------------------------------------------------------------------------------------


class TestTransform:
    """Resize((R, R), bicubic) -> ToTensor -> Normalize(CLIP): any image input -> float32 [3, R, R]."""

    __test__ = False  # not a pytest test class

    def __init__(self, image_size: int):
        self.image_size = check_size(image_size)

    def __call__(self, image: ImageLike) -> Tensor:
        img = load_image(image)
        R = self.image_size
        return normalize(to_tensor(img.resize((R, R), Image.Resampling.BICUBIC)))  # [3, R, R]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


test_transform = TestTransform  # the official evaluation transform (fidelity §7), by its official name


# ---- RandomResizedCrop -------------------------------------------------------------------------------------


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random | Any,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: crop (top i, left j, height h, width w) of the image.

    Ten tries: area fraction ~ U(scale), aspect ratio w/h ~ exp(U(log ratio)); a try succeeds when the crop
    fits, and its position is uniform. Otherwise a centre crop clamped to the ratio range (or the whole
    image).
    ``rng`` needs ``uniform`` and ``randint`` (a ``random.Random`` or the ``random`` module).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)  # inclusive bounds: torch.randint(0, height - h + 1)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---- RandomAugment ops (PIL equivalents of the official OpenCV ops) ----------------------------------------


def _affine(img: Image.Image, inverse: tuple[float, ...], fill: tuple[int, int, int]) -> Image.Image:
    # PIL's AFFINE data maps each output point (x, y) to the input (a x + b y + c, d x + e y + f), in PIL's
    # continuous coordinates (pixel i covers [i, i + 1)); cv2 puts pixel i's centre at i, i.e. pil = cv + 0.5.
    return img.transform(
        img.size, Image.Transform.AFFINE, inverse, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def identity(img: Image.Image) -> Image.Image:
    return img


def autocontrast(img: Image.Image) -> Image.Image:
    """Per channel, stretch [min, max] to [0, 255] (official ``autocontrast_func``, cutoff 0)."""
    return ImageOps.autocontrast(img, cutoff=0)


def equalize(img: Image.Image) -> Image.Image:
    """Per-channel histogram equalisation (official ``equalize_func`` mimics ``ImageOps.equalize``)."""
    return ImageOps.equalize(img)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Pixel values times ``factor``, clipped (official ``brightness_func``)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the 3x3 smoothed image (kernel 1/13 [[1,1,1],[1,5,1],[1,1,1]]), border kept (official)."""
    return ImageEnhance.Sharpness(img).enhance(factor)


def shear_x(img: Image.Image, factor: float, fill: tuple[int, int, int] = RANDAUG_FILL) -> Image.Image:
    """Official forward map x' = x + factor*y (cv2 coordinates), i.e. input x = x' - factor*y'."""
    return _affine(img, (1.0, -factor, 0.5 * factor, 0.0, 1.0, 0.0), fill)  # +0.5f: cv2 -> PIL coordinates


def shear_y(img: Image.Image, factor: float, fill: tuple[int, int, int] = RANDAUG_FILL) -> Image.Image:
    """Official forward map y' = y + factor*x (cv2 coordinates)."""
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.5 * factor), fill)


def translate_x(img: Image.Image, offset: float, fill: tuple[int, int, int] = RANDAUG_FILL) -> Image.Image:
    """Official forward map x' = x - offset: content moves left by ``offset`` px."""
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0), fill)


def translate_y(img: Image.Image, offset: float, fill: tuple[int, int, int] = RANDAUG_FILL) -> Image.Image:
    """Official forward map y' = y - offset: content moves up by ``offset`` px."""
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset), fill)


def rotate(img: Image.Image, degrees: float, fill: tuple[int, int, int] = RANDAUG_FILL) -> Image.Image:
    """Counter-clockwise rotation about cv2's centre (W/2, H/2) in cv2 coordinates, same size, bilinear."""
    center = (img.width / 2 + 0.5, img.height / 2 + 0.5)  # cv2's (W/2, H/2) in PIL coordinates
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, center=center, fillcolor=fill)


RANDAUG_FUNCS: dict[str, Callable[..., Image.Image]] = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}
RANDAUG_OPS: tuple[str, ...] = tuple(RANDAUG_FUNCS)  # the official ten, in the official order
# the ops with a random sign: their value at level 1 (official translate_const = 10)
RANDAUG_SIGNED = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 10.0, "TranslateY": 10.0, "Rotate": 30.0}


def randaug_args(name: str, magnitude: float, rng: random.Random | Any) -> tuple:
    """The official ``arg_dict[name](level)``: the op's arguments at ``magnitude`` (sign from ``rng``)."""
    level = magnitude / RANDAUG_MAX_LEVEL
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)  # 1.36 at M = 7; never inverted
    if name not in RANDAUG_SIGNED:
        raise ValueError(f"unknown RandomAugment op {name!r}. Available: {', '.join(RANDAUG_OPS)}")
    v = level * RANDAUG_SIGNED[name]
    return (-v if rng.random() < 0.5 else v, RANDAUG_FILL)


class RandomAugment:
    """Official ``RandomAugment(N, M, isPIL=True, augs=RANDAUG_OPS)`` on PIL images.

    Draws ``n`` op names with replacement; each is applied with probability ``prob`` (0.5) at magnitude ``m``.
    """

    def __init__(self, n: int = 2, m: float = 7, ops: Sequence[str] = RANDAUG_OPS, prob: float = 0.5):
        unknown = [o for o in ops if o not in RANDAUG_FUNCS]
        if unknown:
            raise ValueError(f"unknown RandomAugment op(s) {unknown}. Available: {', '.join(RANDAUG_OPS)}")
        if not ops:
            raise ValueError("RandomAugment needs at least one op")
        self.n, self.m, self.ops, self.prob = n, m, tuple(ops), prob

    def __call__(self, img: Image.Image, rng: random.Random | Any = random) -> Image.Image:
        for name in [rng.choice(self.ops) for _ in range(self.n)]:
            if rng.random() > self.prob:  # official: skip when np.random.random() > prob
                continue
            img = RANDAUG_FUNCS[name](img, *randaug_args(name, self.m, rng))
        return img

    def __repr__(self) -> str:
        return f"RandomAugment(n={self.n}, m={self.m}, ops={list(self.ops)}, prob={self.prob})"


# ---- train transform ---------------------------------------------------------------------------------------


class TrainTransform:
    """RandomResizedCrop(R, scale, bicubic) -> hflip(0.5) -> RandomAugment(2, 7) -> ToTensor -> Normalize.

    ``scale``: the crop's area fraction, (0.2, 1.0) in pre-training, (0.5, 1.0) in fine-tuning. Call as
    ``tf(image)`` (draws from the transform's RNG) or ``tf(image, rng=random.Random(k))`` (exact control).
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        randaugment: bool = True,
        seed: int | random.Random | None = None,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.image_size = check_size(image_size)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1 (area fractions), got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.randaugment = RandomAugment(2, 7) if randaugment else None
        self.rng = make_rng(seed)

    def augment(self, image: ImageLike, rng: random.Random | Any | None = None) -> Image.Image:
        """The random PIL part (crop, flip, RandomAugment): any image -> RGB PIL image R x R."""
        rng = self.rng if rng is None else rng
        img = load_image(image)
        R = self.image_size
        i, j, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
        img = img.crop((j, i, j + w, i + h)).resize((R, R), Image.Resampling.BICUBIC)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return img

    def __call__(self, image: ImageLike, rng: random.Random | Any | None = None) -> Tensor:
        return normalize(to_tensor(self.augment(image, rng)))  # [3, R, R]

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, randaugment={self.randaugment})"
        )


train_transform = TrainTransform  # the official training transform (fidelity §7), by its official name
