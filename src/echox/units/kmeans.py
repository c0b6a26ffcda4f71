"""K-means speech units: frame features -> cluster ids -> deduplicated unit sequences.

As in the paper, units are self-supervised frame features quantised by k-means (mHuBERT layer 11 with
1000 clusters at full scale), with consecutive duplicates removed. The community km1000 models
are joblib-pickled sklearn (MiniBatch)KMeans objects; `UnitKMeans` writes the same kind of file
and reads those, plus a plain `.npy` of centroids.

Prediction is a nearest-centroid search in numpy on the centroid matrix alone, so it works the
same for a model trained here, an old pickled estimator, or bare centroids.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from echox.errors import UnitError
from echox.fileio import atomic_open

try:  # torch is optional here; accept its tensors when it is installed
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    torch = None  # type: ignore[assignment]


ArrayLike = Union[np.ndarray, "torch.Tensor"]

# Chunk rows of the [T, K] distance matrix so predict() on long inputs stays bounded in memory.
_PREDICT_CHUNK = 8192


def dedup(units: Sequence[int] | np.ndarray) -> list[int]:
    """Drop consecutive repeats (50 Hz frames -> one unit per run), as the unit pipeline does."""
    return dedup_with_counts(units)[0]


def dedup_with_counts(units: Sequence[int] | np.ndarray) -> tuple[list[int], list[int]]:
    """Deduplicate and keep each run's length; the counts are the vocoder's duration targets."""
    arr = np.asarray(units)
    if arr.ndim != 1:
        raise UnitError(f"unit sequence must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return [], []
    starts = np.flatnonzero(np.concatenate(([True], arr[1:] != arr[:-1])))  # [R]
    counts = np.diff(np.concatenate((starts, [arr.size])))  # [R]
    return [int(u) for u in arr[starts]], [int(c) for c in counts]


def _to_numpy_2d(features: Any, what: str = "features") -> np.ndarray:
    """Turn a numpy array or torch tensor of frames into a float32 [T, D] array."""
    if torch is not None and isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise UnitError(f"{what} must be a 2-D [frames, dim] array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iuf":  # complex would lose its imaginary part
        raise UnitError(f"{what} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _check_centroids(centroids: Any, source: str) -> np.ndarray:
    """Validate a centroid matrix read from `source`; returns float32 [K, D]."""
    arr = np.asarray(centroids)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UnitError(f"{source}: centroids must be a [K, D] matrix, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise UnitError(f"{source}: centroids must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise UnitError(f"{source}: centroids contain NaN or inf")
    return arr


def _collect_frames(features: Any) -> list[np.ndarray]:
    """Accept one [N, D] array or an iterable of [T, D] arrays; check that dims agree."""
    if isinstance(features, np.ndarray) or (torch is not None and isinstance(features, torch.Tensor)):
        chunks = [_to_numpy_2d(features)]
    else:
        chunks = [_to_numpy_2d(f, what=f"features[{i}]") for i, f in enumerate(features)]
    chunks = [c for c in chunks if c.shape[0] > 0]
    if not chunks:
        raise UnitError("no feature frames to fit k-means on")
    dims = {c.shape[1] for c in chunks}
    if len(dims) != 1:
        raise UnitError(f"feature arrays disagree on the feature dim: {sorted(dims)}")
    return chunks


def _sample_frames(chunks: list[np.ndarray], sample_frames: int | None, seed: int) -> np.ndarray:
    """Uniform random frame sample without replacement over all chunks -> [N, D]."""
    lengths = np.array([c.shape[0] for c in chunks])
    total = int(lengths.sum())
    if sample_frames is None or sample_frames >= total:
        return np.concatenate(chunks, axis=0)
    if sample_frames < 1:
        raise UnitError(f"sample_frames must be >= 1, got {sample_frames}")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=sample_frames, replace=False))  # [N]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    which = np.searchsorted(offsets, picked, side="right") - 1  # chunk index per frame
    out = np.empty((sample_frames, chunks[0].shape[1]), dtype=np.float32)
    for ci in np.unique(which):
        sel = which == ci
        out[sel] = chunks[ci][picked[sel] - offsets[ci]]
    return out


def _load_pickled(path: Path) -> Any:
    """joblib.load (reads plain pickles too), with an alias for pre-0.22 sklearn module names."""
    import joblib

    try:
        return joblib.load(path)
    except ModuleNotFoundError as exc:
        # Old km models pickled under `sklearn.cluster.k_means_` (renamed to `_kmeans` in 0.22).
        if "sklearn.cluster.k_means_" not in str(exc):
            raise
        import sklearn.cluster._kmeans as kmeans_module

        sys.modules.setdefault("sklearn.cluster.k_means_", kmeans_module)
        return joblib.load(path)


class UnitKMeans:
    """Nearest-centroid quantiser for frame features (one unit id per frame).

    `estimator` is the sklearn object when there is one (trained here or loaded from a joblib
    file); `centroids` [K, D] is all that prediction needs.
    """

    def __init__(self, centroids: np.ndarray, estimator: Any | None = None) -> None:
        self.centroids = _check_centroids(centroids, "UnitKMeans")  # [K, D]
        self.estimator = estimator
        self._sq_norms = (self.centroids.astype(np.float64) ** 2).sum(axis=1)  # [K]

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def fit(
        cls,
        features: ArrayLike | Iterable[ArrayLike],
        n_clusters: int,
        sample_frames: int | None = None,
        seed: int = 0,
        progress: bool = False,
        batch_size: int = 10_000,
        max_iter: int = 100,
        n_init: int = 3,
    ) -> UnitKMeans:
        """Train MiniBatchKMeans on a random frame sample of `features`.

        Defaults follow the HuBERT k-means recipe in fairseq (MiniBatchKMeans, batch 10k,
        k-means++ init, no reassignment), with fewer inits to suit small CPU machines.
        """
        from sklearn.cluster import MiniBatchKMeans

        if n_clusters < 1:
            raise UnitError(f"n_clusters must be >= 1, got {n_clusters}")
        frames = _sample_frames(_collect_frames(features), sample_frames, seed)  # [N, D]
        if frames.shape[0] < n_clusters:
            raise UnitError(
                f"need at least n_clusters={n_clusters} frames to fit k-means, got {frames.shape[0]}"
            )
        if not np.isfinite(frames).all():
            raise UnitError("features contain NaN or inf")
        if progress:
            print(
                f"[units] k-means: K={n_clusters} on {frames.shape[0]} frames of dim {frames.shape[1]}",
                file=sys.stderr,
            )
        start = time.perf_counter()
        estimator = MiniBatchKMeans(
            n_clusters=n_clusters,
            init="k-means++",
            batch_size=min(batch_size, frames.shape[0]),
            max_iter=max_iter,
            n_init=n_init,
            reassignment_ratio=0.0,
            random_state=seed,
            compute_labels=False,
        )
        estimator.fit(frames)
        if progress:
            print(
                f"[units] k-means done in {time.perf_counter() - start:.1f}s "
                f"({estimator.n_steps_} steps)",
                file=sys.stderr,
            )
        return cls(estimator.cluster_centers_, estimator=estimator)

    def predict(self, features: ArrayLike) -> np.ndarray:
        """Nearest-centroid unit id per frame: [T, D] -> int64 [T]."""
        x = _to_numpy_2d(features)  # [T, D]
        if x.shape[1] != self.dim:
            raise UnitError(
                f"feature dim mismatch: features have dim {x.shape[1]}, "
                f"the k-means model expects {self.dim}"
            )
        if not np.isfinite(x).all():  # NaN frames would all become unit 0
            raise UnitError("features contain NaN or inf")
        out = np.empty(x.shape[0], dtype=np.int64)
        c = self.centroids  # [K, D]
        for lo in range(0, x.shape[0], _PREDICT_CHUNK):
            xb = x[lo : lo + _PREDICT_CHUNK]  # [t, D]
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row, so drop it.
            dist = self._sq_norms[None, :] - 2.0 * (xb @ c.T).astype(np.float64)  # [t, K]
            out[lo : lo + xb.shape[0]] = dist.argmin(axis=1)
        return out

    def _as_sklearn(self) -> Any:
        """The sklearn estimator; built from bare centroids when loaded from a .npy file."""
        if self.estimator is not None:
            return self.estimator
        from sklearn.cluster import KMeans

        # Fitting on the centroids themselves with init=centroids is a real (1-step) fit whose
        # result is those centroids, so the saved file is a normal, usable sklearn KMeans.
        km = KMeans(n_clusters=self.n_clusters, init=self.centroids, n_init=1, max_iter=1)
        km.fit(self.centroids)
        km.cluster_centers_ = self.centroids.copy()
        return km

    def save(self, path: str | Path) -> None:
        """Write a joblib-pickled sklearn estimator (like the km1000 files), or `.npy` centroids."""
        import joblib

        path = Path(path)
        obj = self.centroids if path.suffix == ".npy" else self._as_sklearn()
        try:  # atomically: a failed write leaves an older file at `path` whole
            with atomic_open(path, "wb") as fh:
                if path.suffix == ".npy":
                    np.save(fh, obj)
                else:
                    joblib.dump(obj, fh)
        except OSError as exc:
            raise UnitError(f"cannot write the k-means file {path}: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> UnitKMeans:
        """Read a joblib/pickle file holding an object with `cluster_centers_`, or a `.npy`.

        Pickles run code when loaded: only load k-means files from sources you trust.
        """
        path = Path(path)
        if not path.is_file():
            raise UnitError(f"k-means file not found: {path}")
        if path.suffix == ".npy":
            try:
                centroids = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise UnitError(f"{path}: not a readable .npy centroid file ({exc})") from exc
            return cls(_check_centroids(centroids, str(path)))
        try:
            obj = _load_pickled(path)
        except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways
            raise UnitError(
                f"{path}: not a readable joblib/pickle k-means file ({type(exc).__name__}: {exc})"
            ) from exc
        if isinstance(obj, np.ndarray):
            return cls(_check_centroids(obj, str(path)))
        if not hasattr(obj, "cluster_centers_"):
            raise UnitError(
                f"{path}: holds a {type(obj).__name__}, not a fitted k-means model "
                "(no cluster_centers_)"
            )
        return cls(_check_centroids(obj.cluster_centers_, str(path)), estimator=obj)

    def __repr__(self) -> str:
        return f"UnitKMeans(n_clusters={self.n_clusters}, dim={self.dim})"
