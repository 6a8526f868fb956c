"""The embedded default: real images that scikit-learn and scikit-image ship, no download.

ID data is scikit-learn's handwritten digits; OOD test sets are crops of the textures and photos
the two packages ship, the four noise kinds of the OE paper, and an open-set split of the digits
(held-out classes as near-OOD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from oodscale.errors import InputError
from oodscale.runtime import derive_seed

# Every image the two packages ship in their wheels (scikit-image's others download on first
# use): the more distinct sources a set of crops has, the less it measures one picture.
TEXTURES = ("brick", "grass", "gravel", "text", "page", "checkerboard", "microaneurysms", "cell",
            "immunohistochemistry", "hubble_deep_field")
PHOTOS = ("camera", "coffee", "chelsea", "astronaut", "rocket", "coins", "moon", "clock",
          "china", "flower", "retina", "stereo_motorcycle")
CROP_SOURCES = {"textures": TEXTURES, "photos": PHOTOS}
NOISE_SETS = ("gaussian", "uniform", "rademacher", "blobs")


@dataclass
class Split:
    """Images (N×H×W×C uint8) with ID labels relabelled to 0..K-1 and their class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


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


def noise(kind: str, n: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Noise images as in the OE paper: Gaussian, uniform, Rademacher and blobs."""
    shape = (n, size, size, channels)
    if kind == "gaussian":
        x = np.clip(rng.normal(0.5, 0.25, shape), 0, 1)
    elif kind == "uniform":
        x = rng.uniform(0, 1, shape)
    elif kind == "rademacher":
        x = rng.integers(0, 2, shape).astype(float)  # ±1 mapped onto the pixel range
    elif kind == "blobs":
        smooth = ndimage.gaussian_filter(rng.binomial(1, 0.7, shape).astype(float),
                                         sigma=(0, 1.0, 1.0, 0))
        x = (smooth > 0.75).astype(float)
    else:
        raise InputError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_SETS)}")
    return (x * 255).round().astype(np.uint8)


def source_count(name: str, images: int) -> str:
    """How many distinct source images an OOD set of `images` images holds, for the report."""
    if name in CROP_SOURCES:
        return f"{min(images, len(CROP_SOURCES[name]))} shipped images"
    if name in NOISE_SETS:
        return "generated"
    return f"{images} images"


def builtin_ood(name: str, n: int | None, size: int, channels: int, seed: int,
                held_out: Split | None, purpose: str = "ood", val_n: int = 300) -> np.ndarray:
    """The images of one built-in OOD set, drawn from a seed derived from its name and purpose
    (`ood` for the test sets, `ood-val` for their validation counterparts).

    Sets of real images (openset, digits) take at most `n` images, every one for None; sets made
    here (crops, noise) take exactly `n`. `val_n` is the `digits` validation pool.
    """
    rng = np.random.default_rng(derive_seed(seed, purpose, name))
    if name in CROP_SOURCES or name in NOISE_SETS:
        if n is None:
            raise InputError(f"the {name!r} OOD set is generated: give it an image count")
        if name in NOISE_SETS:
            return noise(name, n, size, channels, rng)
        return crops(CROP_SOURCES[name], n, size, channels, rng)
    if name == "digits":
        return np.stack([resize(im, size, channels) for im in
                         _digit_images()[_digits_pick(n, seed, purpose, val_n)]])
    if name == "openset":
        if held_out is None or len(held_out.images) == 0:
            if purpose != "ood":
                raise InputError("no held-out image is left for the open-set validation set: "
                                 "raise data.val_fraction or drop openset from "
                                 "data.val_ood_sets")
            raise InputError("the 'openset' OOD set needs held-out classes: set data.id_classes "
                             "to a subset of the classes")
        pick = rng.permutation(len(held_out.images))[:n]
        return held_out.images[np.sort(pick)]
    raise InputError(f"unknown built-in OOD set {name!r}; valid: textures, photos, digits, "
                     f"{', '.join(NOISE_SETS)}, openset")
