"""K-means units: dedup, fit/predict on blobs, joblib / pickle / .npy loading, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from echox.errors import UnitError
from echox.units.kmeans import UnitKMeans, dedup, dedup_with_counts


def _blobs(k: int = 5, dim: int = 8, per: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: (points [k*per, dim], labels [k*per], centres [k, dim])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, dim)).astype(np.float32)
    labels = np.repeat(np.arange(k), per)
    points = centres[labels] + rng.normal(scale=0.3, size=(k * per, dim)).astype(np.float32)
    return points, labels, centres


def test_dedup_and_counts() -> None:
    assert dedup([]) == []
    assert dedup([4, 4, 4, 1, 1, 4, 2]) == [4, 1, 4, 2]
    assert dedup_with_counts(np.array([4, 4, 4, 1, 1, 4, 2])) == ([4, 1, 4, 2], [3, 2, 1, 1])
    assert dedup_with_counts([7]) == ([7], [1])
    units, counts = dedup_with_counts(np.random.default_rng(0).integers(0, 3, size=500))
    assert sum(counts) == 500 and all(a != b for a, b in zip(units, units[1:]))
    with pytest.raises(UnitError, match="1-D"):
        dedup(np.zeros((2, 2)))


def test_fit_recovers_blobs() -> None:
    points, labels, centres = _blobs()
    # Features given as a list of utterances [T, D], sampled down to 600 frames.
    utts = np.array_split(points[np.random.default_rng(1).permutation(len(points))], 7)
    km = UnitKMeans.fit(utts, n_clusters=5, sample_frames=600, seed=0)
    assert (km.n_clusters, km.dim) == (5, 8)
    pred = km.predict(points)
    assert pred.dtype == np.int64 and pred.shape == (len(points),)
    # Each true blob maps to exactly one cluster, and different blobs to different clusters.
    mapping = {int(b): set(pred[labels == b].tolist()) for b in range(5)}
    assert all(len(s) == 1 for s in mapping.values())
    assert len({next(iter(s)) for s in mapping.values()}) == 5
    # Learned centroids sit on the true centres; points near a centroid map to it.
    for b in range(5):
        c = next(iter(mapping[b]))
        assert np.linalg.norm(km.centroids[c] - centres[b]) < 0.2
    near = km.centroids + 0.01
    assert km.predict(near).tolist() == list(range(5))
    # Agrees with sklearn's own predict, and accepts torch tensors.
    assert np.array_equal(pred, km.estimator.predict(points))
    assert np.array_equal(km.predict(torch.from_numpy(points)), pred)


def test_fit_errors() -> None:
    points, _, _ = _blobs(k=2, per=3)
    with pytest.raises(UnitError, match="at least n_clusters"):
        UnitKMeans.fit(points, n_clusters=10)
    with pytest.raises(UnitError, match="disagree"):
        UnitKMeans.fit([points, points[:, :4]], n_clusters=2)
    with pytest.raises(UnitError, match="no feature frames"):
        UnitKMeans.fit([], n_clusters=2)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    points, _, _ = _blobs(seed=3)
    km = UnitKMeans.fit(points, n_clusters=5, seed=0)
    km.save(tmp_path / "km.bin")
    loaded = UnitKMeans.load(tmp_path / "km.bin")
    assert np.array_equal(loaded.centroids, km.centroids)
    assert np.array_equal(loaded.predict(points), km.predict(points))


def test_load_raw_sklearn_joblib_and_pickle(tmp_path: Path) -> None:
    # Files written by plain sklearn/joblib, as the community km1000 models are.
    points, _, _ = _blobs(seed=4)
    est = MiniBatchKMeans(n_clusters=5, random_state=0, n_init=3).fit(points)
    joblib.dump(est, tmp_path / "km1000.bin")
    with open(tmp_path / "km.pkl", "wb") as f:
        pickle.dump(est, f)
    for name in ("km1000.bin", "km.pkl"):
        km = UnitKMeans.load(tmp_path / name)
        assert km.n_clusters == 5 and km.dim == 8
        assert np.allclose(km.centroids, est.cluster_centers_)
        assert np.array_equal(km.predict(points), est.predict(points))


def test_npy_centroids(tmp_path: Path) -> None:
    points, labels, centres = _blobs(seed=5)
    np.save(tmp_path / "centroids.npy", centres)
    km = UnitKMeans.load(tmp_path / "centroids.npy")
    assert km.estimator is None
    assert np.array_equal(km.predict(points), labels)
    # Saving a centroid-only model as joblib gives a real sklearn estimator with those centres.
    km.save(tmp_path / "from_npy.bin")
    est = joblib.load(tmp_path / "from_npy.bin")
    assert np.allclose(est.cluster_centers_, centres)
    assert np.array_equal(est.predict(points), labels)
    km.save(tmp_path / "again.npy")
    assert np.array_equal(np.load(tmp_path / "again.npy"), centres)


def test_dim_mismatch_and_bad_files(tmp_path: Path) -> None:
    _, _, centres = _blobs(seed=6)
    km = UnitKMeans(centres)
    with pytest.raises(UnitError, match="dim mismatch"):
        km.predict(np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(UnitError, match="2-D"):
        km.predict(np.zeros(8, dtype=np.float32))
    with pytest.raises(UnitError, match="not found"):
        UnitKMeans.load(tmp_path / "nope.bin")
    (tmp_path / "corrupt.bin").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(UnitError, match="not a readable joblib/pickle"):
        UnitKMeans.load(tmp_path / "corrupt.bin")
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy")
    with pytest.raises(UnitError, match="not a readable .npy"):
        UnitKMeans.load(tmp_path / "corrupt.npy")
    joblib.dump({"not": "kmeans"}, tmp_path / "dict.bin")
    with pytest.raises(UnitError, match="no cluster_centers_"):
        UnitKMeans.load(tmp_path / "dict.bin")
    np.save(tmp_path / "vec.npy", np.zeros(4))
    with pytest.raises(UnitError, match=r"\[K, D\]"):
        UnitKMeans.load(tmp_path / "vec.npy")


def test_non_finite_and_complex_inputs_are_refused(tmp_path: Path) -> None:
    """NaN frames would all become unit 0; complex numbers would lose their imaginary part."""
    _, _, centres = _blobs(seed=7)
    km = UnitKMeans(centres)
    frames = np.zeros((3, centres.shape[1]), dtype=np.float32)
    frames[1, 2] = np.nan
    with pytest.raises(UnitError, match="NaN or inf"):
        km.predict(frames)
    with pytest.raises(UnitError, match="real numbers"):
        km.predict(np.zeros((3, centres.shape[1]), dtype=complex))
    np.save(tmp_path / "complex.npy", centres.astype(complex))
    with pytest.raises(UnitError, match="real numbers"):
        UnitKMeans.load(tmp_path / "complex.npy")


def test_save_errors_are_one_line_and_keep_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, centres = _blobs(seed=8)
    km = UnitKMeans(centres)
    with pytest.raises(UnitError, match="cannot write the k-means file"):
        km.save(tmp_path)  # a folder
    km.save(tmp_path / "km.npy")
    before = (tmp_path / "km.npy").read_bytes()

    def full_disk(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("echox.units.kmeans.np.save", full_disk)
    with pytest.raises(UnitError, match="No space left"):
        UnitKMeans(centres + 1.0).save(tmp_path / "km.npy")
    assert (tmp_path / "km.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["km.npy"]  # no temp file left
