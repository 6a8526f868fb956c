"""Label-mixup conditioning: soft labels between two distinct classes.

y = λ·e_a + (1−λ)·e_b with a ≠ b ("mix"), or y = e_a + e_b ("sum"). "composed" mixes the two
classes' guidance instead of their labels (Composable Diffusion, Liu et al. 2022):
ε = ε_u + w·[λ(ε_a − ε_u) + (1 − λ)(ε_b − ε_u)], two one-hot conditions weighted λ and 1 − λ.
λ comes from the configured distribution: fixed, uniform on an interval, or Beta(α, α).
"""

from __future__ import annotations

import numpy as np
import torch

from oodscale.config import LambdaConfig
from oodscale.errors import InputError


def one_hot(labels: torch.Tensor, num_classes: int, check: bool = True) -> torch.Tensor:
    """Float one-hot rows on the labels' device; `check=False` skips the range check (a host
    sync) for labels already checked when their shards were read."""
    if check and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def distinct_pairs(rng: np.random.Generator, n: int, num_classes: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n class pairs (a, b), a ≠ b, uniform over ordered pairs."""
    if num_classes < 2:
        raise InputError("label-mixup needs at least two classes")
    a = rng.integers(0, num_classes, n)
    b = (a + rng.integers(1, num_classes, n)) % num_classes
    return a, b


def sample_lambdas(rng: np.random.Generator, n: int, cfg: LambdaConfig) -> np.ndarray:
    if cfg.kind == "fixed":
        return np.full(n, cfg.value)
    if cfg.kind == "uniform":
        return rng.uniform(cfg.low, cfg.high, n)
    return rng.beta(cfg.alpha, cfg.alpha, n)


def mixup_labels(a: np.ndarray, b: np.ndarray, lam: np.ndarray, num_classes: int,
                 mode: str = "mix") -> torch.Tensor:
    """Soft label vectors (n×C) for the pairs; `sum` ignores λ."""
    ea = one_hot(torch.as_tensor(a), num_classes)
    eb = one_hot(torch.as_tensor(b), num_classes)
    if mode == "sum":
        return ea + eb
    if mode != "mix":
        raise InputError(f"unknown label-mixup mode {mode!r}; valid: mix, sum (composed "
                         f"guidance takes two labels: mixup_conditions)")
    lam_t = torch.as_tensor(lam, dtype=torch.float32)[:, None]
    return lam_t * ea + (1 - lam_t) * eb


def mixup_conditions(a: np.ndarray, b: np.ndarray, lam: np.ndarray, num_classes: int,
                     mode: str = "mix") -> tuple[torch.Tensor, torch.Tensor]:
    """The conditions a sampler guides each pair towards: soft labels n×K×C and their
    guidance weights n×K. `mix` and `sum` are one soft label of weight 1 (K = 1); `composed`
    the one-hots e_a and e_b, weighted λ and 1 − λ (K = 2)."""
    if mode != "composed":
        labels = mixup_labels(a, b, lam, num_classes, mode)
        return labels[:, None], torch.ones(len(labels), 1)
    lam_t = torch.as_tensor(lam, dtype=torch.float32)
    labels = torch.stack([one_hot(torch.as_tensor(a), num_classes),
                          one_hot(torch.as_tensor(b), num_classes)], dim=1)
    return labels, torch.stack([lam_t, 1 - lam_t], dim=1)
