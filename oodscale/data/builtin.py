"""The embedded default: real images that scikit-learn and scikit-image ship, no download.

ID data is scikit-learn's handwritten digits; OOD test sets are crops of the textures and photos
the two packages ship, the four noise kinds of the OE paper, and an open-set split of the digits
(held-out classes as near-OOD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from oodscale.data.ood_table import OOD_SETS, check_ood_set
from oodscale.data.splits import PreparedID, Split, Splits, write_in_memory
from oodscale.errors import InputError
from oodscale.lazy import load
from oodscale.runtime import derive_seed

if TYPE_CHECKING:
    from oodscale.config import ExperimentConfig
    from oodscale.runtime import RunLayout

# Every image the two packages ship in their wheels (scikit-image's others download on first
# use): the more distinct sources a set of crops has, the less it measures one picture.
TEXTURES = ("brick", "grass", "gravel", "text", "page", "checkerboard", "microaneurysms", "cell",
            "immunohistochemistry", "hubble_deep_field")
PHOTOS = ("camera", "coffee", "chelsea", "astronaut", "rocket", "coins", "moon", "clock",
          "china", "flower", "retina", "stereo_motorcycle")
CROP_SOURCES = {"textures": TEXTURES, "photos": PHOTOS}


def resize(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """H×W(×C) uint8 → size×size×channels uint8, gray or RGB as asked."""
    pil = Image.fromarray(image)
    pil = pil.convert("L" if channels == 1 else "RGB")
    out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


def digits_splits(image_size: int, channels: int, test_fraction: float, seed: int,
                  id_classes: list[int] | None) -> tuple[Split, Split, Split]:
    """(ID train, ID test, held-out classes) from scikit-learn's digits, stratified and fixed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images = np.stack([resize(im, image_size, channels) for im in _digit_images()])
    labels = load_digits().target.astype(np.int64)
    keep = sorted(set(range(10)) if id_classes is None else set(id_classes))
    unknown = [c for c in keep if not 0 <= c <= 9]
    if unknown:
        raise InputError(f"data.id_classes {unknown} out of range: digits has classes 0..9")
    mask = np.isin(labels, keep)
    remap = {c: i for i, c in enumerate(keep)}
    tr_x, te_x, tr_y, te_y = train_test_split(
        images[mask], labels[mask], test_size=test_fraction, stratify=labels[mask],
        random_state=seed)
    names = [str(c) for c in keep]
    to_id = np.vectorize(remap.__getitem__, otypes=[np.int64])
    held = Split(images[~mask], np.full((~mask).sum(), -1), [])
    return Split(tr_x, to_id(tr_y), names), Split(te_x, to_id(te_y), names), held


def digits_source_splits(cfg: ExperimentConfig) -> Splits:
    """The `digits` data source's splits: ID train and test (each capped per class as the
    config says), the held-out classes' test images and their validation pool."""
    train, test, held = digits_splits(cfg.data.image_size, cfg.data.channels,
                                      cfg.data.test_fraction, cfg.seed, cfg.data.id_classes)
    for name, split, cap in (("train", train, cfg.data.max_train_per_class),
                             ("test", test, cfg.data.max_test_per_class)):
        keep = cap_per_class(split.labels, cap, derive_seed(cfg.seed, "cap", name))
        split.images, split.labels = split.images[keep], split.labels[keep]
    return train, test, *held_out_validation(held, cfg.data.val_fraction, cfg.seed)


def prepare_digits(cfg: ExperimentConfig, layout: RunLayout, force: bool) -> PreparedID:
    """The `digits` row of oodscale.data.source_table."""
    return write_in_memory(cfg, layout, force, digits_source_splits(cfg))


def held_out_validation(held: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(test, validation) halves of the held-out classes' images: `fraction` of them (the
    ID validation split's share, at least one) for validation, every other one for the
    open-set test set."""
    order = np.random.default_rng(derive_seed(seed, "ood", "openset")).permutation(len(held.images))
    n_val = max(1, round(fraction * len(order))) if fraction else 0
    val, test = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (Split(held.images[test], held.labels[test], []),
            Split(held.images[val], held.labels[val], []))


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices keeping at most `cap` images of each class, drawn by a fixed seed."""
    if cap is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _digit_images() -> np.ndarray:
    """scikit-learn's 1,797 digits as 8×8 uint8 (its 0..16 levels stretched to 0..255)."""
    from sklearn.datasets import load_digits

    return (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)


def _digits_pick(n: int | None, seed: int, purpose: str, val_n: int) -> np.ndarray:
    """Sorted indices of the `digits` OOD set. The first `val_n` images of a fixed draw are the
    validation set's pool whether or not one is made; the test set takes the others (at most
    `n`, every one for None), so the two never share an image."""
    order = np.random.default_rng(derive_seed(seed, "ood", "digits")).permutation(1797)
    if not 0 < val_n < len(order):
        raise InputError(f"data.val_ood_samples={val_n} leaves no digit for the test set: "
                         "lower it (scikit-learn ships 1,797 digits)")
    pool = order[:val_n] if purpose != "ood" else order[val_n:]
    return np.sort(pool[:n])


def _source_image(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def crops(names: tuple[str, ...], n: int, size: int, channels: int,
          rng: np.random.Generator) -> np.ndarray:
    """n random square crops (side 24..min(H,W)/2) of the named images in turn, resized."""
    sources = [_source_image(name) for name in names]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        side = int(rng.integers(min(24, min(h, w)), max(25, min(h, w) // 2) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(resize(np.ascontiguousarray(src[y:y + side, x:x + side]), size, channels))
    return np.stack(out)


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.clip(rng.normal(0.5, 0.25, shape), 0, 1)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(0, 1, shape)


def _rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 2, shape).astype(float)  # ±1 mapped onto the pixel range


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.binomial(1, 0.7, shape).astype(float),
                                     sigma=(0, 1.0, 1.0, 0))
    return (smooth > 0.75).astype(float)


NOISE_KINDS = {"gaussian": _gaussian, "uniform": _uniform, "rademacher": _rademacher,
               "blobs": _blobs}


def noise(kind: str, n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Noise images as in the OE paper: Gaussian, uniform, Rademacher and blobs."""
    if kind not in NOISE_KINDS:
        raise InputError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    x = NOISE_KINDS[kind](rng, (n, size, size, channels))
    return (x * 255).round().astype(np.uint8)


def source_count(name: str, images: int) -> str:
    """How many distinct source images an OOD set of `images` images holds, for the report."""
    if name in CROP_SOURCES:
        return f"{min(images, len(CROP_SOURCES[name]))} shipped images"
    if OOD_SETS[name].made_here:
        return "generated"
    return f"{images} images"


@dataclass(frozen=True)
class OODRequest:
    """What one built-in OOD set is drawn for; `rng` is seeded by (run seed, purpose, name)."""

    name: str
    n: int | None  # images; None = every one the pool holds (sets of real images only)
    size: int
    channels: int
    seed: int
    purpose: str  # `ood` (test set) or `ood-val` (its validation counterpart)
    held_out: Split | None  # the ID source's held-out classes, where it keeps them
    val_n: int  # the `digits` validation pool
    rng: np.random.Generator


def crop_set(req: OODRequest) -> np.ndarray:
    """The `textures` and `photos` rows: crops of the images the packages ship."""
    return crops(CROP_SOURCES[req.name], req.n, req.size, req.channels, req.rng)


def noise_set(req: OODRequest) -> np.ndarray:
    """The noise rows (`gaussian`, `uniform`, `rademacher`, `blobs`)."""
    return noise(req.name, req.n, req.size, req.channels, req.rng)


def digits_set(req: OODRequest) -> np.ndarray:
    """The `digits` row: scikit-learn's digits (OOD for another ID source)."""
    pick = _digits_pick(req.n, req.seed, req.purpose, req.val_n)
    return np.stack([resize(im, req.size, req.channels) for im in _digit_images()[pick]])


def openset_set(req: OODRequest) -> np.ndarray:
    """The `openset` row: the ID source's held-out classes."""
    held_out = req.held_out
    if held_out is None or len(held_out.images) == 0:
        if req.purpose != "ood":
            raise InputError("no held-out image is left for the open-set validation set: "
                             "raise data.val_fraction or drop openset from data.val_ood_sets")
        raise InputError("the 'openset' OOD set needs held-out classes: set data.id_classes "
                         "to a subset of the classes")
    pick = req.rng.permutation(len(held_out.images))[:req.n]
    return held_out.images[np.sort(pick)]


def builtin_ood(name: str, n: int | None, size: int, channels: int, seed: int,
                held_out: Split | None, purpose: str = "ood", val_n: int = 300) -> np.ndarray:
    """The images of one built-in OOD set (its row of oodscale.data.ood_table), drawn from a
    seed derived from its name and purpose (`ood` for the test sets, `ood-val` for their
    validation counterparts).

    Sets of real images (openset, digits) take at most `n` images, every one for None; sets made
    here (crops, noise) take exactly `n`. `val_n` is the `digits` validation pool.
    """
    check_ood_set(name)
    spec = OOD_SETS[name]
    if spec.made_here and n is None:
        raise InputError(f"the {name!r} OOD set is generated: give it an image count")
    rng = np.random.default_rng(derive_seed(seed, purpose, name))
    return load(spec.draw)(OODRequest(name, n, size, channels, seed, purpose, held_out, val_n,
                                      rng))
