"""The embedded default: real images that scikit-learn and scikit-image ship, no download.

ID data is scikit-learn's handwritten digits; OOD test sets are crops of the textures and photos
the two packages ship, the four noise kinds of the OE paper, and an open-set split of the digits
(held-out classes as near-OOD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from oodscale.runtime import derive_seed

TEXTURES = ("brick", "grass", "gravel", "text", "page", "checkerboard", "microaneurysms")
PHOTOS = ("camera", "coffee", "chelsea", "astronaut", "rocket", "coins", "moon", "clock",
          "china", "flower")
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
        raise ValueError(f"data.id_classes {unknown} out of range: digits has classes 0..9")
    mask = np.isin(labels, keep)
    remap = {c: i for i, c in enumerate(keep)}
    tr_x, te_x, tr_y, te_y = train_test_split(
        images[mask], labels[mask], test_size=test_fraction, stratify=labels[mask],
        random_state=seed)
    names = [str(c) for c in keep]
    to_id = np.vectorize(remap.__getitem__, otypes=[np.int64])
    held = Split(images[~mask], np.full((~mask).sum(), -1), [])
    return Split(tr_x, to_id(tr_y), names), Split(te_x, to_id(te_y), names), held


def openset_rest(held: Split, n: int, seed: int) -> Split:
    """The held-out images the open-set test set did not draw: its validation pool, disjoint
    from every test image (the same draw as `builtin_ood`'s, so the test set is unchanged)."""
    order = np.random.default_rng(derive_seed(seed, "ood", "openset")).permutation(len(held.images))
    rest = np.sort(order[n:])
    return Split(held.images[rest], held.labels[rest], [])


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


def _digits_pick(n: int, seed: int, purpose: str) -> np.ndarray:
    """Sorted indices of the `digits` OOD set: the test set's n, or for validation n of the
    images the test set did not draw (disjoint: the same digits, never the same image)."""
    order = np.random.default_rng(derive_seed(seed, "ood", "digits")).permutation(1797)
    if purpose == "ood":
        return np.sort(order[:n])
    rest = order[n:]
    if len(rest) < n:
        raise ValueError(f"scikit-learn's 1,797 digits hold too few images for a {n}-image test "
                         "set and a validation set beside it: lower data.ood_samples (at most "
                         "898) or drop digits from data.val_ood_sets")
    pick = np.random.default_rng(derive_seed(seed, purpose, "digits")).permutation(rest)
    return np.sort(pick[:n])


def _source_image(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def crops(names: tuple[str, ...], n: int, size: int, channels: int,
          rng: np.random.Generator) -> np.ndarray:
    """n random square crops (side 24..min(H,W)/2) of the named images, resized."""
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
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_SETS)}")
    return (x * 255).round().astype(np.uint8)


def builtin_ood(name: str, n: int, size: int, channels: int, seed: int,
                held_out: Split | None, purpose: str = "ood") -> np.ndarray:
    """The images of one built-in OOD set, drawn from a seed derived from its name and purpose
    (`ood` for the test sets, `ood-val` for their validation counterparts)."""
    rng = np.random.default_rng(derive_seed(seed, purpose, name))
    makers: dict[str, Callable[[], np.ndarray]] = {
        "textures": lambda: crops(TEXTURES, n, size, channels, rng),
        "photos": lambda: crops(PHOTOS, n, size, channels, rng),
        "digits": lambda: np.stack([resize(im, size, channels) for im in
                                    _digit_images()[_digits_pick(n, seed, purpose)]]),
    }
    if name in makers:
        return makers[name]()
    if name in NOISE_SETS:
        return noise(name, n, size, channels, rng)
    if name == "openset":
        if held_out is None or len(held_out.images) == 0:
            if purpose != "ood":
                raise ValueError("no held-out image is left for the open-set validation set "
                                 "(the test set drew them all): lower data.ood_samples or "
                                 "drop openset from data.val_ood_sets")
            raise ValueError("the 'openset' OOD set needs held-out classes: set data.id_classes "
                             "to a subset of the classes")
        pick = rng.permutation(len(held_out.images))[:n]
        return held_out.images[np.sort(pick)]
    raise ValueError(f"unknown built-in OOD set {name!r}; valid: textures, photos, digits, "
                     f"{', '.join(NOISE_SETS)}, openset")
