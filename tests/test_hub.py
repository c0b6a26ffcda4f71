"""The resolver: local folders, built-in tiny models, and the packaged offline models."""

import os

import pytest

from echox.errors import ConversionError, ResolveError
from echox.hub import cache_dir, resolve
from echox.hub.cache import cached_conversion
from echox.hub.whisper_ct2 import atomic_output_dir


def test_builtin_is_materialised_once(tmp_path):
    a = resolve("builtin:tiny-random-llama")
    assert (a / "config.json").is_file() and a.is_relative_to(cache_dir())
    mtime = (a / "config.json").stat().st_mtime
    assert resolve("builtin:tiny-random-llama") == a
    assert (a / "config.json").stat().st_mtime == mtime
    with pytest.raises(ResolveError, match="unknown built-in"):
        resolve("builtin:nope")


def test_conversion_race_keeps_the_winner(tmp_path, monkeypatch):
    """Two processes convert the same packaged model at once (two jobs started together on a
    new machine): the one that finds the folder already written uses it instead of failing;
    a conversion that fails for another reason still fails."""
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path))

    def loses_the_race(dst):
        with atomic_output_dir(dst) as tmp:  # the other process's conversion lands first
            (tmp / "config.json").write_text("{}")
        with atomic_output_dir(dst):
            raise AssertionError("never reached: the folder exists now")

    dst = cached_conversion("racing-model", loses_the_race)
    assert dst == tmp_path / "packaged" / "racing-model" and (dst / "config.json").is_file()

    def broken(dst):
        raise ConversionError("the packaged file is corrupt")

    with pytest.raises(ConversionError, match="corrupt"):
        cached_conversion("broken-model", broken)


def test_a_full_disk_during_a_conversion_says_so_and_leaves_no_half_copy(tmp_path, monkeypatch):
    """CI's disk filled while SmolLM2 was converted: safetensors' "(os error 28)" came out as
    a traceback from every command that loads the model."""
    import errno

    from safetensors import SafetensorError

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    for error in (SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})"),
                  OSError(errno.ENOSPC, "No space left on device")):
        def fills_the_disk(dst):
            with atomic_output_dir(dst) as tmp:
                (tmp / "model.safetensors").write_bytes(b"half")
                raise error

        with pytest.raises(ConversionError, match=r"the disk is full: converting the packaged m "
                           r".* MB free there.*\$ECHOX_CACHE") as info:
            cached_conversion("m", fills_the_disk)
        assert info.value.__cause__ is error
        assert list((tmp_path / "cache" / "packaged").iterdir()) == []


def test_conversion_mends_a_damaged_entry_and_refuses_a_cache_file(tmp_path, monkeypatch):
    """An entry that lost its config.json was converted again (20 s), then refused as
    existing; $ECHOX_CACHE naming a file was a NotADirectoryError after the conversion."""
    from echox.errors import ConfigError

    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(dst):
        calls.append(dst)
        with atomic_output_dir(dst) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"w")
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes it

    damaged = tmp_path / "cache" / "packaged" / "m"
    damaged.mkdir(parents=True)
    (damaged / "model.safetensors").write_bytes(b"half")
    assert cached_conversion("m", convert) == damaged and len(calls) == 1
    assert (damaged / "model.safetensors").read_bytes() == b"w"
    mask = os.umask(0)
    os.umask(mask)
    assert (damaged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert cached_conversion("m", convert) == damaged and len(calls) == 1  # kept

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ECHOX_CACHE", str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"\$ECHOX_CACHE .*afile is a file, not a folder"):
        cached_conversion("m", convert)
    assert len(calls) == 1  # refused before converting


def test_local_folder_and_errors(tmp_path):
    assert resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ResolveError, match="model folder not found"):
        resolve(str(tmp_path / "missing"))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ResolveError, match="cannot resolve model 'someone/unknown-model'"):
        resolve("someone/unknown-model")
    with pytest.raises(ResolveError, match="no packaged model"):
        resolve("packaged:nothing")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,expect",
    [
        ("openai/whisper-tiny.en", "preprocessor_config.json"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "tokenizer_config.json"),
        ("packaged:hifigan-universal", "generator_universal.pth.tar"),
    ],
)
def test_packaged_models_resolve_offline(name, expect):
    folder = resolve(name)
    assert (folder / expect).is_file()
    assert resolve(name) == folder  # converted once, then read from the cache


def test_a_hub_whose_name_does_not_resolve_is_not_retried(monkeypatch):
    """Without network, huggingface_hub retried the hub five times (about 27 s) before a model
    or benchmark load failed or fell back to the cache. A hub host that does not resolve sends
    both to the cache at once, and the error says why."""
    import socket

    import huggingface_hub

    from echox.errors import EvalError
    from echox.eval.benchmarks import open_benchmark
    from echox.hub import hub_unresolvable

    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    asked = []

    def no_dns(host, *a, **k):
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    assert hub_unresolvable() == "huggingface.co"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.org:8443")
    assert hub_unresolvable() == "hub.example.org" and asked[-1] == "hub.example.org"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")

    calls = []

    def snapshot(repo, local_files_only=False, **k):
        calls.append(local_files_only)
        raise FileNotFoundError(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    with pytest.raises(ResolveError, match="host huggingface.co does not resolve here"):
        resolve("nobody/no-model")
    assert calls == [True]  # the cache only: no request that would be retried
    # the benchmark is read from the cache alone: both libraries in offline mode, then as before
    import datasets

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    seen = []

    def load_dataset(name, split=None, **k):
        seen.append((huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(EvalError, match="host huggingface.co does not resolve here, and it could "
                                        "not be loaded from the Hugging Face cache"):
        open_benchmark("llama-questions")
    assert seen == [(True, True)]
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE

    # behind a proxy the proxy resolves the name; offline mode asks nothing of the hub
    asked.clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub_unresolvable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unresolvable() is None and asked == []
