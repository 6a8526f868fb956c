import numpy as np
import pytest
import torch

from oodscale.evaluate.detectors import compute_scores, fit_features
from oodscale.evaluate.score_table import SCORE_NAMES


def _cluster(n: int = 200, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: tight clusters around +e0 and +e1 (scaled by 5)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.zeros(2, dim)
    centres[0, 0], centres[1, 1] = 5.0, 5.0
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=gen), labels


def test_logit_scores_rank_confident_above_flat():
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    emb = torch.zeros(2, 4)
    s = compute_scores(["msp", "maxlogit", "energy"], logits, emb, None, None)
    for name in ("msp", "maxlogit", "energy"):
        assert s[name][0] > s[name][1], name
    assert s["msp"][1] == pytest.approx(1 / 3)
    assert s["maxlogit"].tolist() == [5.0, 1.0]
    assert s["energy"][1] == pytest.approx(1 + np.log(3))


def test_temperature_scales_msp_and_energy():
    logits = torch.tensor([[4.0, 0.0]])
    s = compute_scores(["msp", "energy"], logits, torch.zeros(1, 2), None, None, temperature=2.0)
    assert s["msp"][0] == pytest.approx(np.exp(2) / (np.exp(2) + 1))
    assert s["energy"][0] == pytest.approx(2 * np.log(np.exp(2) + 1))


def test_maxcos():
    weights = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # C x D
    emb = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = compute_scores(["maxcos"], torch.zeros(2, 2), emb, weights, None)
    assert s["maxcos"] == pytest.approx([1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="class_weights"):
        compute_scores(["maxcos"], torch.zeros(2, 2), emb, None, None)
    with pytest.raises(ValueError, match="W.T"):
        compute_scores(["maxcos"], torch.zeros(2, 2), emb, torch.zeros(3, 2), None)


def test_knn_and_mahalanobis_rank_near_above_far():
    train, labels = _cluster()
    fitted = fit_features(train, labels, k=5)
    test = torch.zeros(2, train.shape[1])
    test[0, 0] = 5.0  # on class 0's cluster
    test[1, 2], test[1, 3] = 5.0, -5.0  # away from both clusters
    s = compute_scores(["knn", "mahalanobis"], torch.zeros(2, 2), test, None, fitted)
    assert s["knn"][0] > s["knn"][1]
    assert s["mahalanobis"][0] > s["mahalanobis"][1]
    assert np.all(s["knn"] <= 0) and np.all(s["mahalanobis"] <= 1e-9)


def test_knn_chunked_equals_unchunked_and_brute_force():
    train, labels = _cluster(n=97)
    fitted = fit_features(train, labels, k=4)
    test, _ = _cluster(n=23, seed=1)
    test = test + torch.randn(test.shape, generator=torch.Generator().manual_seed(2))
    small = compute_scores(["knn"], torch.zeros(23, 2), test, None, fitted, chunk=5)["knn"]
    whole = compute_scores(["knn"], torch.zeros(23, 2), test, None, fitted, chunk=10_000)["knn"]
    np.testing.assert_allclose(small, whole, atol=1e-6)
    a = test.numpy() / np.linalg.norm(test.numpy(), axis=1, keepdims=True)
    b = train.numpy() / np.linalg.norm(train.numpy(), axis=1, keepdims=True)
    dists = np.sort(np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2), axis=1)
    np.testing.assert_allclose(whole, -dists[:, 3], atol=1e-5)


def test_fit_features_chunked_matches_numpy():
    train, labels = _cluster(n=61)
    labels = torch.where(labels == 1, torch.tensor(7), labels)  # non-contiguous labels
    f_small = fit_features(train, labels, chunk=7)
    f_big = fit_features(train, labels, chunk=4096)
    torch.testing.assert_close(f_small.class_means, f_big.class_means)
    torch.testing.assert_close(f_small.precision, f_big.precision)
    x, y = train.double().numpy(), labels.numpy()
    means = np.stack([x[y == c].mean(axis=0) for c in (0, 7)])
    centred = x - means[(y == 7).astype(int)]
    prec = np.linalg.pinv(centred.T @ centred / len(x))
    np.testing.assert_allclose(f_small.class_means.numpy(), means, atol=1e-10)
    test = torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(3))
    got = compute_scores(["mahalanobis"], torch.zeros(5, 2), test, None, f_small, chunk=2)
    diff = test.double().numpy()[:, None, :] - means[None, :, :]
    expected = -np.einsum("ncd,de,nce->nc", diff, prec, diff).min(axis=1)
    np.testing.assert_allclose(got["mahalanobis"], expected, rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="msp"):
        compute_scores(["nope"], torch.zeros(1, 2), torch.zeros(1, 2), None, None)
    with pytest.raises(ValueError, match="fit_features"):
        compute_scores(["knn"], torch.zeros(1, 2), torch.zeros(1, 2), None, None)
    with pytest.raises(ValueError, match="k must be"):
        fit_features(torch.zeros(3, 2), torch.zeros(3), k=4)


def test_all_scores_returned_as_numpy():
    train, labels = _cluster(n=40)
    fitted = fit_features(train, labels, k=3, normed=True)
    out = compute_scores(
        SCORE_NAMES, torch.randn(6, 2), train[:6], torch.randn(2, train.shape[1]), fitted
    )
    assert set(out) == set(SCORE_NAMES)
    assert all(isinstance(v, np.ndarray) and v.shape == (6,) for v in out.values())


def test_mahalanobis_normed_reads_the_direction_not_the_norm():
    """The normalised-embedding score is Mahalanobis on unit rows: rescaling a test embedding
    (a norm no loss term trains) leaves it unchanged, while the raw score moves."""
    train, labels = _cluster(n=40)
    fitted = fit_features(train, labels, k=3, normed=True)
    test = torch.randn(4, train.shape[1], generator=torch.Generator().manual_seed(5))
    scaled = test * torch.tensor([[0.5], [2.0], [3.0], [10.0]])
    names = ["mahalanobis", "mahalanobis_normed"]
    a = compute_scores(names, torch.zeros(4, 2), test, None, fitted)
    b = compute_scores(names, torch.zeros(4, 2), scaled, None, fitted)
    np.testing.assert_allclose(a["mahalanobis_normed"], b["mahalanobis_normed"], rtol=1e-6)
    assert not np.allclose(a["mahalanobis"], b["mahalanobis"])
    unit = fit_features(torch.nn.functional.normalize(train, dim=1), labels, k=3)
    on_unit = compute_scores(["mahalanobis"], torch.zeros(4, 2),
                             torch.nn.functional.normalize(test, dim=1), None, unit)
    np.testing.assert_allclose(a["mahalanobis_normed"], on_unit["mahalanobis"], rtol=1e-6)
    with pytest.raises(ValueError, match="normed=True"):
        compute_scores(["mahalanobis_normed"], torch.zeros(4, 2), test, None,
                       fit_features(train, labels, k=3))
