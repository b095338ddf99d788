"""Data with a super-class -> sub-class hierarchy and a held-out *novel* sub-class per super-class (seed 000).

Two sources:

* **Procedural** (default, offline): shape families are the super-classes and their variants the
  sub-classes; colour, background, texture noise, position, size and a small rotation are nuisances.
  The last variant of each family is *novel*: it never appears in train/val/test and is served by
  ``novel_dataset()``, so one can ask whether a backbone places an unseen variant near its siblings.
  Every image is drawn from a generator seeded by (seed, split, index): no files, identical every run.
* **Folders of generated images** (``root=``): ``root/<sub-class>/*.png`` (or ``root/train|test/...``) plus a
  ``hierarchy_file`` (JSON ``{"sub": "super"}`` or two-column CSV ``sub,super``) and optionally
  ``novel_classes``, the sub-classes to hold out.

Labels are sub-class indices (over all sub-classes, novel ones included, so that a novel sample keeps a
valid id); batches also carry ``superclass``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.base import BaseDataModule, Splits, TransformDataset
from datamodules.folder import FileSource, FolderDataModule

#: super-class -> its sub-classes; the last one of each family is the novel one.
SHAPE_FAMILIES: dict[str, list[str]] = {
    "ellipse": ["circle", "wide_ellipse", "tall_ellipse", "ring"],
    "polygon": ["triangle", "square", "pentagon", "hexagon"],
    "star": ["star4", "star5", "star6", "star8"],
    "stripes": ["horizontal", "vertical", "diagonal", "checker"],
}


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float, inner: float | None = None):
    """Vertices of a regular polygon (or a star when ``inner`` radius is given)."""
    points, count = [], sides * (2 if inner else 1)
    for i in range(count):
        r = radius if (inner is None or i % 2 == 0) else radius * inner
        theta = angle + 2 * math.pi * i / count - math.pi / 2
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def draw_shape(variant: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of ``variant`` with random nuisances (colour, background, position, scale, rotation, noise)."""
    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    angle = rng.uniform(-0.25, 0.25)  # small rotation: tall vs wide must stay distinguishable
    if variant in ("circle", "wide_ellipse", "tall_ellipse", "ring"):
        rx, ry = {"circle": (1, 1), "wide_ellipse": (1.25, 0.6), "tall_ellipse": (0.6, 1.25), "ring": (1, 1)}[variant]
        box = (cx - radius * rx, cy - radius * ry, cx + radius * rx, cy + radius * ry)
        if variant == "ring":
            draw.ellipse(box, outline=colour, width=max(2, size // 12))
        else:
            draw.ellipse(box, fill=colour)
    elif variant in ("triangle", "square", "pentagon", "hexagon"):
        sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[variant]
        draw.polygon(_polygon(cx, cy, radius, sides, angle), fill=colour)
    elif variant.startswith("star"):
        draw.polygon(_polygon(cx, cy, radius, int(variant[4:]), angle, inner=0.45), fill=colour)
    else:
        period = max(4, int(size * rng.uniform(0.12, 0.2)))
        width = period // 2
        for offset in range(-size, 2 * size, period):
            if variant == "horizontal":
                draw.rectangle((0, offset, size, offset + width), fill=colour)
            elif variant == "vertical":
                draw.rectangle((offset, 0, offset + width, size), fill=colour)
            elif variant == "diagonal":
                draw.line((offset, 0, offset + size, size), fill=colour, width=width)
        if variant == "checker":
            for y in range(0, size, period):
                for x in range(0, size, period):
                    if (x // period + y // period) % 2 == 0:
                        draw.rectangle((x, y, x + period - 1, y + period - 1), fill=colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


class ProceduralSource:
    """``per_class`` images of each of ``sub_classes``; image i is drawn from a generator seeded by (seed, i)."""

    def __init__(self, sub_classes: list[int], names: list[str], super_of: list[int], per_class: int,
                 seed: int, image_size: int):
        self.items = [(c, j) for c in sub_classes for j in range(per_class)]
        self.names, self.super_of, self.seed, self.image_size = names, super_of, seed, image_size

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        """Every item's sub-class, without drawing its image (for stratified splits)."""
        return [label for label, _ in self.items]

    def __getitem__(self, i: int):
        label, _ = self.items[i]
        rng = np.random.default_rng((self.seed, i))
        return draw_shape(self.names[label], rng, self.image_size), label, self.super_of[label]


def read_hierarchy_file(path: str | Path, sub_classes: list[str]) -> dict[str, str]:
    """Sub-class -> super-class from JSON or two-column CSV; every sub-class must be named, no unknown ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hierarchy file {path} does not exist")
    if path.suffix.lower() == ".json":
        mapping = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    else:
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and not row[0].startswith("#")]
        if rows and rows[0][:2] == ["sub", "super"] or rows and rows[0][:2] == ["subclass", "superclass"]:
            rows = rows[1:]
        mapping = {row[0].strip(): row[1].strip() for row in rows}
    unknown = sorted(set(mapping) - set(sub_classes))
    if unknown:
        raise ValueError(f"hierarchy file {path} names classes that have no image folder: {unknown[:10]}")
    missing = sorted(set(sub_classes) - set(mapping))
    if missing:
        raise ValueError(f"hierarchy file {path} gives no super-class for: {missing[:10]}")
    return mapping


class SyntheticHierarchyDataModule(BaseDataModule):
    """Sub-classes inside super-classes, with held-out novel sub-classes.

    Args:
        root: Folder of generated images (``root/<sub-class>/...``); None uses the procedural generator.
        hierarchy_file: With ``root``: JSON or CSV mapping each sub-class to its super-class.
        novel_classes: With ``root``: the sub-classes to hold out as novel (default none).
        per_class_train: Procedural: training images per known sub-class.
        per_class_test: Procedural: test (and novel) images per sub-class.
        image_size: Procedural: side of the drawn images before resizing to the backbone's input size.
        on_bad_image: With ``root``: ``"error"`` or ``"skip"`` (see FolderDataModule).
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(
        self,
        root: str | None = None,
        hierarchy_file: str | None = None,
        novel_classes: list[str] | None = None,
        per_class_train: int = 60,
        per_class_test: int = 20,
        image_size: int = 64,
        on_bad_image: str = "error",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root, self.hierarchy_file, self.image_size = root, hierarchy_file, image_size
        self.per_class_train, self.per_class_test = per_class_train, per_class_test
        if root is None:
            self.superclass_names = list(SHAPE_FAMILIES)
            self.class_names = [v for variants in SHAPE_FAMILIES.values() for v in variants]
            self.superclass_of = [s for s, variants in enumerate(SHAPE_FAMILIES.values()) for _ in variants]
            self.novel_class_names = [variants[-1] for variants in SHAPE_FAMILIES.values()]
            self._folder = None
        else:
            if hierarchy_file is None:
                raise ValueError("a folder of generated images needs hierarchy_file (sub-class -> super-class)")
            self._folder = FolderDataModule(root, on_bad_image=on_bad_image, seed=self.seed, val_fraction=0.0)
            self.class_names = list(self._folder.class_names)
            mapping = read_hierarchy_file(hierarchy_file, self.class_names)
            self.superclass_names = sorted(set(mapping.values()))
            self.superclass_of = [self.superclass_names.index(mapping[c]) for c in self.class_names]
            self.novel_class_names = list(novel_classes or [])
            unknown = sorted(set(self.novel_class_names) - set(self.class_names))
            if unknown:
                raise ValueError(f"novel_classes not among the sub-class folders of {root}: {unknown}")
            self.decode = self._folder.decode
            self.collate_fn = self._folder.collate_fn
        self.num_classes = len(self.class_names)
        self.novel_classes = [self.class_names.index(c) for c in self.novel_class_names]

    def load_splits(self) -> Splits:
        if self._folder is None:
            known = [c for c in range(self.num_classes) if c not in self.novel_classes]
            make = lambda classes, per, split: ProceduralSource(  # noqa: E731
                classes, self.class_names, self.superclass_of, per, (self.seed, split), self.image_size)
            self._novel = make(self.novel_classes, self.per_class_test, 2)
            return Splits(train=make(known, self.per_class_train, 0), test=make(known, self.per_class_test, 1))
        splits = self._folder.load_splits()
        novel = set(self.novel_classes)

        def keep(sources, novel_side: bool) -> FileSource:
            samples = [source[i][:2] for source in sources for i in range(len(source))
                       if (source[i][1] in novel) == novel_side]
            return FileSource(samples, self.superclass_of)

        self._novel = keep([splits.train, splits.test], True)
        val = keep([splits.val], False) if splits.val is not None else None
        return Splits(train=keep([splits.train], False), test=keep([splits.test], False), val=val)

    def novel_dataset(self) -> TransformDataset:
        """Images of the held-out novel sub-classes (never seen in training), un-augmented."""
        self.sources  # noqa: B018  -- builds self._novel
        return TransformDataset(self._novel, self.eval_transform(), self.decode)

    def novel_dataloader(self):
        return self.make_loader(self.novel_dataset())
