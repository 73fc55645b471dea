"""A folder of PNG images, one subfolder per class, read with Pillow and augmented per sample.

The layout is the usual one (``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*.png``);
``shapes`` draws such a folder of coloured shapes when ``<root>`` has none, so the example runs
as it is. Augmentation draws from torch's RNG, which the trainer seeds per rank, epoch and
DataLoader worker: a run's augmentations are the same every time it runs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

CLASSES = ("square", "ring", "cross", "bar")
"""The shapes; each image has one, of random colour, size and place on a random background."""
IMAGE_SIZE = 16


def _draw(shape: str, rng: random.Random) -> Image.Image:
    """One ``IMAGE_SIZE`` square RGB image of ``shape``."""
    background = tuple(rng.randrange(0, 96) for _ in range(3))
    colour = tuple(rng.randrange(128, 256) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    size = rng.randint(7, 11)
    left, top = rng.randint(1, IMAGE_SIZE - size - 1), rng.randint(1, IMAGE_SIZE - size - 1)
    box = (left, top, left + size, top + size)
    middle_x, middle_y = left + size // 2, top + size // 2
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=2)
    elif shape == "cross":
        draw.line((left, middle_y, left + size, middle_y), fill=colour, width=2)
        draw.line((middle_x, top, middle_x, top + size), fill=colour, width=2)
    else:  # a horizontal bar: a flip leaves every class what it is
        draw.rectangle((left, middle_y - 1, left + size, middle_y + 1), fill=colour)
    return image


def draw_folder(root: Path, per_class: dict[str, int], seed: int) -> None:
    """``per_class[split]`` PNG images of every class under ``root/<split>/<class>/``.

    Drawn in a folder of this process's own, renamed to ``root`` when complete: several
    ranks may draw at once, the first rename wins, and no rank ever sees a partial folder.
    """
    rng = random.Random(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    drawing = root.with_name(f".{root.name}.drawing-{os.getpid()}")
    for split, count in per_class.items():
        for shape in CLASSES:
            folder = drawing / split / shape
            folder.mkdir(parents=True)
            for index in range(count):
                _draw(shape, rng).save(folder / f"{index:04d}.png")
    try:
        drawing.rename(root)
    except OSError:  # another rank's folder got there first: the same images
        shutil.rmtree(drawing)


def augment(image: torch.Tensor, pad: int = 2, noise: float = 0.05) -> torch.Tensor:
    """A random horizontal flip, a random crop of the image padded by ``pad``, Gaussian noise."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    size = image.shape[-1]
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad), mode="replicate")
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    image = padded[:, top:top + size, left:left + size]
    return image + noise * torch.randn_like(image)


class ImageFolder(Dataset):
    """``(image, label)`` pairs from ``<root>/<class>/*.png``; images ``(3, H, W)`` in [0, 1].

    ``task`` and ``model_hints`` tell the trainer the validation metrics to compute and the
    built-in ``cnn`` its input channels, image size and number of classes.
    """

    task = "classification"

    def __init__(self, root: Path, augmented: bool) -> None:
        self.classes = sorted(path.name for path in root.iterdir() if path.is_dir())
        self.files = [(path, label) for label, name in enumerate(self.classes)
                      for path in sorted((root / name).glob("*.png"))]
        if not self.files:
            raise ValueError(f"no PNG files under {root}/<class>/")
        self.augmented = augmented
        with Image.open(self.files[0][0]) as first:
            self.model_hints = {"in_channels": 3, "image_size": first.width,
                                "num_classes": len(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        with Image.open(path) as image:
            pixels = numpy.asarray(image.convert("RGB"), dtype=numpy.float32) / 255.0
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        return (augment(tensor) if self.augmented else tensor), label


def shapes(root: str = "data/shapes", train_per_class: int = 100, val_per_class: int = 25,
           seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
    """(training, validation) image folders under ``root``, drawn first if missing; training
    images are augmented, validation images are not."""
    folder = Path(root)
    if not folder.exists():
        draw_folder(folder, {"train": train_per_class, "val": val_per_class}, seed)
    return ImageFolder(folder / "train", augmented=True), ImageFolder(folder / "val", augmented=False)
