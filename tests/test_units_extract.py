"""Unit extraction: HuBERT / Whisper-layer features, k-means units, cached corpus extraction."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echox.audio import load_audio, save_audio
from echox.errors import AudioError, ResolveError, UnitError
from echox.hub import resolve
from echox.units.extract import (
    CACHE_META,
    FeatureExtractor,
    HubertFeatures,
    UnitCacheWarning,
    UnitExtractor,
    UnitSequence,
    WhisperLayerFeatures,
    extract_corpus,
    sample_features,
    train_kmeans_on_corpus,
)
from echox.units.kmeans import UnitKMeans

SR = 16000


def tones(seconds: float, seed: int = 0) -> np.ndarray:
    """Piecewise tones plus a little noise: structured enough for k-means to find runs."""
    rng = np.random.default_rng(seed)
    n = int(SR * seconds)
    seg = SR // 5
    t = np.arange(n) / SR
    freqs = np.repeat(rng.choice([200.0, 500.0, 1200.0, 3000.0], size=n // seg + 1), seg)[:n]
    wav = 0.3 * np.sin(2 * np.pi * freqs * t) + 0.01 * rng.standard_normal(n)
    return wav.astype(np.float32)


def _save_hubert(folder: Path, stable_layer_norm: bool) -> Path:
    """A tiny random HuBERT: 320x conv downsampling (50 Hz) in 3 small conv layers."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if stable_layer_norm else "group",
        do_stable_layer_norm=stable_layer_norm,
    )
    torch.manual_seed(0)
    HubertModel(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        do_normalize=stable_layer_norm, return_attention_mask=stable_layer_norm
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hubert_group(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_hubert(tmp_path_factory.mktemp("hubert_group"), stable_layer_norm=False)


@pytest.fixture(scope="module")
def hubert_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_hubert(tmp_path_factory.mktemp("hubert_layer"), stable_layer_norm=True)


@pytest.fixture(scope="module")
def whisper_feats() -> WhisperLayerFeatures:
    return WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, device="cpu")


# ----------------------------------------------------------------------------- HuBERT


def test_hubert_shape_frame_rate_and_layers(hubert_group: Path) -> None:
    f1 = HubertFeatures(hubert_group, layer=1, device="cpu")
    f2 = HubertFeatures(hubert_group, layer=2, device="cpu")
    assert f1.frame_rate == 50.0 and f1.dim == 32
    wavs = [tones(1.0), tones(0.53, seed=1)]
    out1, out2 = f1(wavs), f2(wavs)
    for w, a in zip(wavs, out1):
        assert a.dtype == np.float32 and a.shape[1] == 32
        assert abs(a.shape[0] - w.size / 320) <= 2
    assert out1[0].shape[0] == f1.num_frames(16000) == 50
    assert not np.allclose(out1[0], out2[0], atol=1e-3)  # different layers differ
    # the chosen layer is the model's own hidden_states[layer]
    with torch.no_grad():
        ref = f2.model(torch.from_numpy(wavs[1])[None], output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(out2[1], ref[0].numpy(), atol=1e-5)


def test_hubert_group_norm_batch_equals_single(hubert_group: Path) -> None:
    f = HubertFeatures(hubert_group, layer=1, device="cpu")
    assert not f.use_mask and not f.do_normalize  # as its preprocessor config says
    wavs = [tones(0.4), tones(1.1, seed=2)]
    batched = f(wavs)
    for w, b in zip(wavs, batched):  # one forward per utterance: padding never enters
        np.testing.assert_allclose(b, f([w])[0], atol=1e-5)


def test_hubert_layer_norm_masked_batch(hubert_layer: Path) -> None:
    f = HubertFeatures(hubert_layer, layer=2, device="cpu")
    assert f.use_mask and f.do_normalize
    wavs = [tones(0.4), tones(1.1, seed=2)]
    batched = f(wavs)  # one padded batch with an attention mask
    single = f([wavs[0]])[0]
    assert batched[0].shape == single.shape == (f.num_frames(wavs[0].size), 32)
    np.testing.assert_allclose(batched[0], single, atol=1e-4)
    # do_normalize: per-utterance zero mean / unit variance removes a DC offset and the scale
    np.testing.assert_allclose(f([5 * wavs[0] + 0.2])[0], single, atol=1e-4)


def test_hubert_follows_preprocessor_do_normalize(hubert_layer: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no_norm"
    shutil.copytree(hubert_layer, folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "do_normalize": False}))
    f = HubertFeatures(folder, layer=2, device="cpu")
    assert not f.do_normalize and f.use_mask
    w = tones(0.6)
    assert not np.allclose(f([w + 0.2])[0], f([w])[0], atol=1e-3)  # the raw offset is seen


def test_hubert_bad_input(hubert_group: Path, tmp_path: Path) -> None:
    with pytest.raises(UnitError, match="layer 5 out of range"):
        HubertFeatures(hubert_group, layer=5, device="cpu")
    f = HubertFeatures(hubert_group, layer=0, device="cpu")
    with pytest.raises(UnitError, match="receptive field"):
        f([np.zeros(100, np.float32)])
    with pytest.raises(UnitError, match="NaN"):
        f([np.full(1000, np.nan, np.float32)])
    with pytest.raises(UnitError, match="not a HuBERT"):
        HubertFeatures(resolve("builtin:tiny-random-whisper"), layer=1)


# ----------------------------------------------------------------------------- Whisper


def test_whisper_layer_frames(whisper_feats: WhisperLayerFeatures) -> None:
    f = whisper_feats
    assert f.frame_rate == 50.0 and f.dim == 32 and f.window_samples == 3 * SR
    lengths = [16000, 16161, 3 * SR - 1, 3 * SR, 333]
    out = f([tones(n / SR, seed=i) for i, n in enumerate(lengths)])
    assert [a.shape for a in out] == [(math.ceil(n / 320), 32) for n in lengths]


def test_whisper_layer_matches_full_encoder() -> None:
    """Dropping the layers after `layer` leaves hidden_states[layer] unchanged."""
    from echox.model.encoder import LogMelFrontEnd, WhisperSpeechEncoder

    folder = resolve("builtin:tiny-random-whisper")
    full = WhisperSpeechEncoder.from_folder(folder).eval()
    front = LogMelFrontEnd(folder, full.num_mel_bins, full.window_frames)
    wav = tones(1.2)
    with torch.no_grad():
        ref = full.whisper(front([wav]).features, output_hidden_states=True).hidden_states
    for layer in (0, 1, 2):
        got = WhisperLayerFeatures(folder, layer=layer, device="cpu")([wav])[0]
        np.testing.assert_allclose(got, ref[layer][0, : got.shape[0]].numpy(), atol=1e-5)


def test_whisper_longer_than_window() -> None:
    wav = tones(7.3)  # window is 3 s
    strict = WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, on_too_long="error")
    with pytest.raises(UnitError, match="longer than the Whisper window"):
        strict([tones(1.0), wav])
    split = WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, on_too_long="split")
    out = split([wav, tones(0.5)])
    assert out[0].shape[0] == math.ceil(wav.size / 320)
    assert out[1].shape[0] == math.ceil(0.5 * SR / 320)
    first = split([wav[: 3 * SR]])[0]  # the first window is encoded on its own
    np.testing.assert_allclose(out[0][: first.shape[0]], first, atol=1e-5)
    with pytest.raises(UnitError, match="out of range"):
        WhisperLayerFeatures("builtin:tiny-random-whisper", layer=3)


def test_whisper_shorter_window() -> None:
    """`window_seconds` pads to a shorter window: same frame counts, longer clips split at it,
    the window in the cache key (its features differ: Whisper attends to the padding), so the extractor's fingerprint differs."""
    native = WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1)
    short = WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, window_seconds=1.0)
    assert short.window_samples == SR and native.window_samples == 3 * SR
    assert short.describe()["window_seconds"] == 1.0 and "window_seconds" not in native.describe()
    same = WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, window_seconds=3.0)
    assert same.describe() == native.describe()  # the native window: older caches stay valid
    wav = tones(2.5)
    a, b = native([wav])[0], short([wav])[0]
    assert a.shape == b.shape == (math.ceil(wav.size / 320), 32)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(b[:50], short([wav[:SR]])[0], atol=1e-5)  # whole 1 s windows
    with pytest.raises(UnitError, match="window_seconds"):
        WhisperLayerFeatures("builtin:tiny-random-whisper", layer=1, window_seconds=9.0)
    km = UnitKMeans.fit(a, n_clusters=4, seed=0, n_init=1)
    assert UnitExtractor(short, km).fingerprint() != UnitExtractor(native, km).fingerprint()


# ----------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def kmeans(whisper_feats: WhisperLayerFeatures) -> UnitKMeans:
    feats = whisper_feats([tones(2.0, seed=s) for s in range(3)])
    return UnitKMeans.fit(feats, n_clusters=6, seed=0, n_init=1)


def test_unit_extractor_end_to_end(whisper_feats: WhisperLayerFeatures, kmeans: UnitKMeans) -> None:
    wavs = [tones(1.5, seed=7), tones(2.2, seed=8)]
    seqs = UnitExtractor(whisper_feats, kmeans)(wavs)
    frames = whisper_feats(wavs)
    for seq, f in zip(seqs, frames):
        assert seq.frame_rate == 50.0
        assert seq.num_frames == f.shape[0]  # counts sum to the frame count
        assert len(seq.units) < f.shape[0]  # dedup shortened it
        assert all(a != b for a, b in zip(seq.units, seq.units[1:]))
        np.testing.assert_array_equal(seq.frames(), kmeans.predict(f))
    raw = UnitExtractor(whisper_feats, kmeans, deduplicate=False)(wavs[:1])[0]
    assert raw.counts == [1] * frames[0].shape[0]
    assert raw.units == kmeans.predict(frames[0]).tolist()
    with pytest.raises(UnitError, match="does not match the k-means dim"):
        UnitExtractor(whisper_feats, UnitKMeans(np.zeros((4, 7), np.float32)))


def test_unit_sequence_validation() -> None:
    with pytest.raises(UnitError):
        UnitSequence([1, 2], [3], 50.0)
    with pytest.raises(UnitError):
        UnitSequence([1], [0], 50.0)
    s = UnitSequence([4, 9], [2, 3], 50.0)
    assert s.duration == pytest.approx(0.1)
    assert UnitSequence.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# ----------------------------------------------------------------------------- corpus


class CountingFeatures(FeatureExtractor):
    """Delegates to real features and records how many waveforms it was asked for."""

    def __init__(self, inner: FeatureExtractor) -> None:
        self.inner = inner
        self.seen = 0

    @property
    def frame_rate(self) -> float:
        return self.inner.frame_rate

    @property
    def dim(self) -> int:
        return self.inner.dim

    def describe(self) -> dict:
        return self.inner.describe()

    def __call__(self, wavs):
        self.seen += len(wavs)
        return self.inner(wavs)


@pytest.fixture
def corpus(tmp_path: Path) -> list[tuple[str, Path]]:
    items = []
    for i in range(5):
        p = save_audio(tmp_path / "wav" / f"u{i}.wav", tones(0.5 + 0.3 * i, seed=i), SR)
        items.append((f"utt/{i}", p))
    return items


def test_extract_corpus_cache_and_resume(
    corpus: list[tuple[str, Path]], whisper_feats: WhisperLayerFeatures, kmeans: UnitKMeans,
    tmp_path: Path,
) -> None:
    counting = CountingFeatures(whisper_feats)
    ex = UnitExtractor(counting, kmeans)
    cache = tmp_path / "cache"
    first = extract_corpus(corpus[:3], ex, cache, batch_size=2, progress=False)
    assert counting.seen == 3 and list(first) == ["utt/0", "utt/1", "utt/2"]
    assert (cache / CACHE_META).is_file()
    # resume: only the two new utterances are computed
    second = extract_corpus(corpus, ex, cache, batch_size=2, progress=False)
    assert counting.seen == 5 and list(second) == [i for i, _ in corpus]
    assert all(second[k] == first[k] for k in first)
    direct = UnitExtractor(whisper_feats, kmeans)([load_audio(corpus[4][1])])[0]
    assert second["utt/4"] == direct
    # everything cached now
    assert extract_corpus(corpus, ex, cache, progress=False) == second and counting.seen == 5
    # a corrupt file is recomputed with a warning
    victim = next(p for p in cache.rglob("*.json") if p.name != CACHE_META)
    victim.write_text('{"id": "utt/')
    with pytest.warns(UnitCacheWarning, match="unreadable"):
        again = extract_corpus(corpus, ex, cache, progress=False)
    assert counting.seen == 6 and again == second
    # an id whose clip was spoken anew (a rebuilt corpus) is recomputed, not read from the cache
    save_audio(corpus[1][1], tones(1.4, seed=9), SR)
    report: dict[str, int] = {}
    fresh = extract_corpus(corpus, ex, cache, progress=False, report=report)
    assert counting.seen == 7 and fresh["utt/1"] != second["utt/1"]
    assert report == {"cached": 4, "computed": 1, "dropped": 0}
    assert fresh["utt/1"] == UnitExtractor(whisper_feats, kmeans)([load_audio(corpus[1][1])])[0]
    # an entry written before the audio digest was kept is still read
    entry = next(p for p in cache.rglob("*.json") if '"utt/2"' in p.read_text())
    entry.write_text(json.dumps({k: v for k, v in json.loads(entry.read_text()).items()
                                 if k != "audio_sha256"}))
    assert extract_corpus(corpus, ex, cache, progress=False) == fresh and counting.seen == 7
    # an entry edited to units outside the k-means (or run lengths that do not fit) is
    # recomputed: it went into the output as it was
    k = kmeans.n_clusters
    for units, counts in (([-7, 1], [1, 1]), ([k, 1], [1, 1]), ([1, 2], [1]), ([1, 2], [0, 1])):
        d = json.loads(entry.read_text())
        entry.write_text(json.dumps({**d, "units": units, "counts": counts}))
        seen = counting.seen
        with pytest.warns(UnitCacheWarning, match="unreadable"):
            assert extract_corpus(corpus, ex, cache, progress=False) == fresh
        assert counting.seen == seen + 1
    # another k-means may not reuse the folder
    other = UnitExtractor(whisper_feats, UnitKMeans(kmeans.centroids[::-1].copy()))
    with pytest.raises(UnitError, match="another extractor"):
        extract_corpus(corpus, other, cache, progress=False)


def test_extract_corpus_bad_items(
    corpus: list[tuple[str, Path]], whisper_feats: WhisperLayerFeatures, kmeans: UnitKMeans,
    tmp_path: Path,
) -> None:
    ex = UnitExtractor(whisper_feats, kmeans)
    with pytest.raises(UnitError, match="duplicate utterance id"):
        extract_corpus([corpus[0], corpus[0]], ex, tmp_path / "c1", progress=False)
    missing = [corpus[0], ("gone", tmp_path / "nope.wav")]
    with pytest.raises(AudioError, match="not found"):
        extract_corpus(missing, ex, tmp_path / "c2", progress=False)
    # that run failed before any unit: its folder binds no extractor (another k-means, as a
    # user fixing the command might give, was refused "another extractor")
    assert not list((tmp_path / "c2").glob("??/*.json"))
    other = UnitExtractor(whisper_feats, UnitKMeans(kmeans.centroids[::-1].copy()))
    assert list(extract_corpus(corpus[:1], other, tmp_path / "c2", progress=False)) == [corpus[0][0]]
    with pytest.raises(UnitError, match="another extractor"):  # now it holds units of `other`
        extract_corpus(corpus[:1], ex, tmp_path / "c2", progress=False)
    report: dict[str, int] = {}
    with pytest.warns(UserWarning, match="skipping 'gone'"):
        out = extract_corpus(missing, ex, tmp_path / "c3", progress=False, on_error="skip",
                             report=report)
    assert list(out) == [corpus[0][0]]
    assert report == {"cached": 0, "computed": 1, "dropped": 1}


def test_sample_features_and_train_kmeans(
    corpus: list[tuple[str, Path]], whisper_feats: WhisperLayerFeatures, tmp_path: Path
) -> None:
    a = sample_features(corpus, whisper_feats, max_frames=60, seed=3)
    b = sample_features(corpus, whisper_feats, max_frames=60, seed=3)
    assert a.shape == (60, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    everything = sample_features(corpus, whisper_feats, max_frames=10**6)
    total = sum(math.ceil((0.5 + 0.3 * i) * SR / 320) for i in range(5))
    assert everything.shape == (total, 32)
    out = tmp_path / "km.joblib"
    km = train_kmeans_on_corpus(
        corpus, whisper_feats, n_clusters=5, max_frames=100, out_path=out, progress=False
    )
    assert km.n_clusters == 5 and km.dim == 32
    np.testing.assert_array_equal(UnitKMeans.load(out).centroids, km.centroids)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_whisper_tiny_en_layer_features() -> None:
    try:
        folder = resolve("openai/whisper-tiny.en")
    except ResolveError as exc:
        pytest.skip(f"packaged Whisper tiny.en does not resolve here: {exc}")
    f = WhisperLayerFeatures(folder, layer=2, device="cpu")
    assert f.dim == 384 and f.window_samples == 30 * SR
    wavs = [tones(1.37), tones(2.0, seed=1)]
    out = f(wavs)
    assert [a.shape for a in out] == [(math.ceil(w.size / 320), 384) for w in wavs]
    assert all(np.isfinite(a).all() for a in out)


def test_extract_corpus_a_clip_too_short_for_hubert(hubert_group: Path, tmp_path: Path) -> None:
    """One clip shorter than HuBERT's receptive field stopped the whole extraction, even with
    on_error="skip", naming only its place in the batch ("waveform 1")."""
    feats = HubertFeatures(hubert_group, layer=1, device="cpu")
    ex = UnitExtractor(feats, UnitKMeans(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)))
    items = []
    for name, wav in (("a", tones(0.5)), ("tiny", np.full(100, 0.1, np.float32)), ("b", tones(0.7, seed=1))):
        save_audio(tmp_path / f"{name}.wav", wav, SR)
        items.append((name, tmp_path / f"{name}.wav"))
    with pytest.raises(UnitError, match=r"^'tiny': 100 samples is shorter than the model's receptive field$"):
        extract_corpus(items, ex, tmp_path / "c1", batch_size=3, progress=False)
    report: dict[str, int] = {}
    with pytest.warns(UserWarning, match="skipping 'tiny'"):
        out = extract_corpus(items, ex, tmp_path / "c2", batch_size=3, progress=False,
                             on_error="skip", report=report)
    assert list(out) == ["a", "b"] and report == {"cached": 0, "computed": 2, "dropped": 1}
    assert out["b"] == ex([load_audio(tmp_path / "b.wav")])[0]
