"""Calibration data for ``fxnorm recalibrate``: a folder of images or a ``.pt`` file of tensors.

- A folder: every image below it (``class/xxx.jpg`` subfolders or flat), sorted by path, decoded as
  RGB, resized so the shorter side is ``image_size * 256 / 224``, center-cropped to ``image_size``,
  scaled to [0, 1] and normalized with ``mean``/``std`` (ImageNet's by default). Decoded with PIL
  (which torchvision depends on); nothing is downloaded.
- A ``.pt`` file (read with ``weights_only=True``) holding a tensor, split along its first dimension
  into batches of ``batch_size``, or a list/tuple of tensors, each one batch as it is.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "calib.pt")
    >>> torch.save(torch.randn(10, 3, 8, 8), path)
    >>> data = calibration_data(path, batch_size=4)
    >>> len(data), [tuple(b.shape) for b in data]
    (3, [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)])
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import torch

from ..errors import DataError
from .console import cause_of
from .unpickling import file_cause

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderBatches",
    "TensorBatches",
    "find_images",
    "per_channel",
    "load_image",
    "calibration_data",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(folder: str) -> list[str]:
    """Every image file below ``folder`` (recursively), sorted; hidden files and folders are skipped.

    Example:
        >>> import tempfile
        >>> find_images(tempfile.mkdtemp())
        []
    """
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def _decode(path: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB, decoded with PIL (a dependency of torchvision)."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def load_image(path: str, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """One image as a normalized float tensor ``(3, image_size, image_size)`` (ImageNet-style eval crop).

    Raises:
        DataError: the file cannot be decoded.

    Example:
        >>> import torch, tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (60, 40)).save(path)
        >>> tuple(load_image(path, 32).shape)
        (3, 32, 32)
    """
    from torchvision.transforms.v2 import functional as TF

    try:
        img = _decode(path)
    except Exception as err:
        raise DataError(f"cannot read image {path}: {cause_of(err)}") from err
    resize = int(math.floor(image_size * 256 / 224))
    img = TF.resize(img, [resize], antialias=True)
    img = TF.center_crop(img, [image_size, image_size])
    x = img.to(torch.float32) / 255.0
    return TF.normalize(x, list(mean), list(std))


class ImageFolderBatches:
    """Batches of normalized images from a folder (iterable, with ``len``); decoding is lazy.

    Example:
        >>> import tempfile
        >>> batches = ImageFolderBatches([], batch_size=8)
        >>> len(batches)
        0
    """

    def __init__(self, files: Sequence[str], batch_size: int = 32, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.files = list(files)
        self.batch_size = batch_size
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Batch ``i`` (decoded now)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        chunk = self.files[i * self.batch_size:(i + 1) * self.batch_size]
        return torch.stack([load_image(f, self.image_size, self.mean, self.std) for f in chunk])


class TensorBatches:
    """Batches from tensors: one tensor split along dim 0, or a list of tensors (each a batch).

    Example:
        >>> [tuple(b.shape) for b in TensorBatches([torch.zeros(2, 3), torch.zeros(5, 3)])]
        [(2, 3), (5, 3)]
    """

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batches[i]


def per_channel(values: Sequence[float], name: str = "mean") -> tuple[float, float, float]:
    """Three values (R, G, B) from 3, or from 1 that applies to every channel; finite (``std`` positive).

    Raises:
        DataError: another number of values, NaN/Inf, or a ``std`` that is not positive.

    Example:
        >>> per_channel([0.5]), per_channel((0.1, 0.2, 0.3), "std")
        ((0.5, 0.5, 0.5), (0.1, 0.2, 0.3))
    """
    values = [float(v) for v in values]
    if len(values) not in (1, 3):
        raise DataError(f"{name} needs 3 values (R G B) or 1 for every channel, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{name} values must be finite numbers, got {values}")
    if name.lstrip("-") == "std" and any(v <= 0 for v in values):
        raise DataError(f"{name} values must be positive, got {values}")
    return (values[0], values[0], values[0]) if len(values) == 1 else (values[0], values[1], values[2])


def _check_tensor(t: object, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{where} is a {type(t).__name__}, not a tensor")
    if t.dim() == 0 or t.shape[0] == 0:
        raise DataError(f"{where} is empty (shape {tuple(t.shape)}): nothing to calibrate with")
    if not t.is_floating_point():
        raise DataError(f"{where} has dtype {t.dtype}: calibration inputs must be floating point "
                        "(normalize images before saving them)")
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{where} contains NaN or Inf")
    return t


def _tensor_batches(path: str, batch_size: int) -> TensorBatches:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read {path}: {file_cause(err)}") from err
    if isinstance(obj, torch.Tensor):
        t = _check_tensor(obj, f"the tensor in {path}")
        return TensorBatches(list(torch.split(t, batch_size)))
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise DataError(f"{path} holds an empty {type(obj).__name__}: nothing to calibrate with")
        return TensorBatches([_check_tensor(t, f"item {i} of {path}") for i, t in enumerate(obj)])
    raise DataError(f"{path} holds a {type(obj).__name__}; expected a tensor (N, ...) or a list of batch tensors")


def calibration_data(
    path: str,
    *,
    batch_size: int = 32,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ImageFolderBatches | TensorBatches:
    """The calibration batches in ``path`` (a folder of images or a ``.pt`` file), see the module doc.

    Raises:
        DataError: no such path, no image in the folder, an unreadable file, an empty or non-float
            tensor, NaN/Inf, bad ``batch_size``/``image_size``/``mean``/``std`` (one value or three each).

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "batches.pt")
        >>> torch.save([torch.randn(4, 3), torch.randn(2, 3)], path)
        >>> [len(b) for b in calibration_data(path)]
        [4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    mean, std = per_channel(mean, "mean"), per_channel(std, "std")
    if os.path.isdir(path):
        files = find_images(path)
        if not files:
            raise DataError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                            "in class subfolders too)")
        return ImageFolderBatches(files, batch_size, image_size, mean, std)
    if os.path.isfile(path):
        return _tensor_batches(path, batch_size)
    raise DataError(f"calibration data {path!r} does not exist: give a folder of images or a .pt file")
