import pytest

from echox.config import PRESETS, EchoXConfig, apply_overrides, load_config, preset_config
from echox.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_roundtrip(name, tmp_path):
    cfg = preset_config(name)
    p = tmp_path / "c.yaml"
    cfg.to_yaml(p)
    assert EchoXConfig.from_yaml(p) == cfg
    assert EchoXConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_types():
    cfg = preset_config("tiny-random", ["llm.lora.r=16", "loss.den_cap=null", "adapter.drop_blank=true",
                                        "llm.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.llm.lora.r == 16 and cfg.loss.den_cap is None and cfg.adapter.drop_blank
    assert cfg.llm.lora.target_modules == ["q_proj", "v_proj"]


def test_a_section_override_merges_and_library_calls_get_config_errors(tmp_path):
    """`llm.lora={r: 8}` put the class defaults (alpha 16, dropout 0.05) in place of the
    preset's other LoRA settings, where a YAML file's section merges; overrides given as one
    string were read letter by letter ("override 'l'"); load_config(Path) and to_yaml into a
    folder were tracebacks."""
    from pathlib import Path

    cfg = preset_config("tiny-random", ["llm.lora={r: 8}"])
    assert (cfg.llm.lora.r, cfg.llm.lora.alpha, cfg.llm.lora.dropout) == (8, 8, 0.0)
    (tmp_path / "c.yaml").write_text("preset: tiny-random\nllm: {lora: {r: 8}}\n")
    assert load_config(Path(tmp_path / "c.yaml")) == cfg  # a Path, as a YAML section merges
    rope = {"rope_type": "linear", "factor": 2.0}  # a mapping value is replaced whole
    once = preset_config("tiny-random", ["t2c.rope_scaling={rope_type: llama3, factor: 8.0, "
                                         "low_freq_factor: 1.0, high_freq_factor: 4.0, "
                                         "original_max_position_embeddings: 128}"])
    assert apply_overrides(once, ["t2c.rope_scaling={rope_type: linear, factor: 2.0}"]) \
        .t2c.rope_scaling == rope
    with pytest.raises(ConfigError, match="overrides must be a list of 'key.path=value' strings, got str"):
        preset_config("tiny-random", "llm.lora.r=32")
    with pytest.raises(ConfigError, match="cannot write the config to"):
        cfg.to_yaml(tmp_path)
    with pytest.raises(ConfigError, match="cannot write the config to"):
        cfg.to_yaml(tmp_path / "no" / "such" / "c.yaml")


def test_float_fields_take_exponents_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 as the string '2e-4'; a float field takes it as a number
    cfg = preset_config("tiny-random", ["loss.den_cap=2e-4", "denoiser.dropout=1E-1"])
    assert cfg.loss.den_cap == pytest.approx(2e-4) and cfg.denoiser.dropout == pytest.approx(0.1)
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny-random\nloss:\n  den_cap: 5e-3\n")
    assert EchoXConfig.from_yaml(p).loss.den_cap == pytest.approx(5e-3)
    with pytest.raises(ConfigError, match="denoiser.dropout: expected a number"):
        preset_config("tiny-random", ["denoiser.dropout=e-4"])
    # optional fields (float | None) are checked too
    with pytest.raises(ConfigError, match="loss.den_cap: expected a number"):
        preset_config("tiny-random", ["loss.den_cap=abc"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("llm.lora.r=0", "llm.lora.r"),
        ("t2c.hidden_size=30", "t2c.hidden_size"),
        ("t2c.beams=0", "t2c.beams"),
        ("t2c.beams=65", "t2c.beams: must be in [1, 64]"),
        ("adapter.extra_layers=99999999", "adapter.extra_layers: must be in [0, 64]"),  # hung
        ("llm.dtype=float8", "llm.dtype"),
        ("llm.lora.r=abc", "llm.lora.r: expected an integer"),
        ("adapter.drop_blank=3", "adapter.drop_blank"),
        ("adapter.shrink_blank_penalty=-1", "adapter.shrink_blank_penalty"),
        ("denoiser.dropout=1.5", "denoiser.dropout"),
        ("t2c.nonsense=1", "unknown key"),
        ("llm.lora.target_modules=[]", "target_modules"),
        ("no_equals_sign", "key.path=value"),
        # a config's own limit was not held to the 600 s cap of --max-audio-seconds
        ("encoder.max_seconds=2400", "encoder.max_seconds: must be at most 600 s"),
    ],
)
def test_validation_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        preset_config("tiny-random", [override])


def test_unknown_key_in_yaml_and_preset(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("preset: tiny-random\nllm:\n  lora:\n    rank: 8\n")
    with pytest.raises(ConfigError, match=r"llm\.lora: unknown key\(s\) \['rank'\]"):
        EchoXConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="config file not found") as e:
        load_config(str(tmp_path / "missing.yaml"))
    assert "current folder" not in str(e.value)  # an absolute path needs no word on where
    # a recipe's relative path (the repository's recipes name files from its root) is read from
    # the current folder, which the message names: run elsewhere, it said only "not found"
    with pytest.raises(ConfigError, match=r"read from the current folder, /") as e:
        load_config("recipes/no-such/model.yaml")
    p.write_text("- a list")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        EchoXConfig.from_yaml(p)


def test_yaml_with_preset_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny-random\nt2c:\n  num_layers: 3\n")
    cfg = load_config(str(p), ["seed=7"])
    assert cfg.t2c.num_layers == 3 and cfg.seed == 7 and cfg.t2c.hidden_size == 32


def test_direct_construction_validates():
    cfg = preset_config("tiny-random")
    with pytest.raises(ConfigError):
        apply_overrides(cfg, ["t2c.num_heads=5"])  # 32 % 5 != 0


def test_malformed_yaml_is_one_line_naming_the_place(tmp_path):
    from echox.config import read_yaml_mapping

    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  lr: 0.1\n  batch_size: {2\n")
    with pytest.raises(ConfigError) as e:
        read_yaml_mapping(bad, "recipe")
    msg = str(e.value)
    assert "\n" not in msg and "r.yaml: not valid YAML at line" in msg, msg


def test_a_damaged_json_config_is_one_config_error_naming_it(tmp_path):
    import json

    p = tmp_path / "config.json"
    p.write_text(json.dumps(preset_config("tiny-random").to_dict()))
    assert EchoXConfig.from_json_file(p) == preset_config("tiny-random")
    for raw, why in ((b'{"llm": {', "malformed JSON"), (b"\xff", "not UTF-8 text")):
        p.write_bytes(raw)
        with pytest.raises(ConfigError, match=f"config file {p}: {why}"):
            EchoXConfig.from_json_file(p)


def test_bad_recipe_bytes_set_values_and_t2c_dropout_are_one_line_config_errors(tmp_path):
    """A recipe that is not UTF-8 was a UnicodeDecodeError; a `--set` value that is not YAML
    gave PyYAML's message over several lines; a T2C dropout outside [0, 1) passed the checks
    and failed in the first step's attention kernel (a RuntimeError)."""
    from echox.config import load_recipe, read_yaml_mapping
    from echox.train.trainer import TrainConfig

    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"model: tiny-random\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="r.yaml: not UTF-8 text"):
        read_yaml_mapping(bad, "recipe")
    with pytest.raises(ConfigError) as e:
        load_recipe(None, {"train": TrainConfig}, sets=["train.lr=["])
    assert "\n" not in str(e.value) and "not valid YAML at line 1" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        preset_config("tiny-random", ["llm.lora.r=["])
    assert "\n" not in str(e.value) and "not valid YAML at line 1" in str(e.value), str(e.value)
    for p in ("2", "-0.1", ".nan"):
        with pytest.raises(ConfigError, match="t2c.dropout: must be in"):
            preset_config("tiny-random", [f"t2c.dropout={p}"])


@pytest.mark.parametrize("overrides", ["5", "llm.lora.r=4"])
def test_recipe_overrides_not_a_list_are_refused_before_a_set_joins_them(tmp_path, overrides):
    """`overrides: 5` with `--set model.*` was a TypeError traceback, and a string was split
    into one-letter overrides ("override 'l'")."""
    from echox.train.run import load_stage_recipe

    (tmp_path / "r.yaml").write_text(f"overrides: {overrides}\n")
    with pytest.raises(ConfigError, match="overrides must be a list of key.path=value strings"):
        load_stage_recipe(str(tmp_path / "r.yaml"), ["model.llm.lora.alpha=8"])


def test_t2c_decoding_settings_of_a_checkpoint_are_bounded():
    """A config.json (JSON reads NaN and 1e11) stored beams and a length penalty that no
    decoder can use; `echox bundle` wrote them as they came."""
    from echox.config import T2CConfig

    for kw, needle in (({"beams": 10**11}, "t2c.beams"), ({"length_penalty": float("nan")}, "t2c.length_penalty"),
                       ({"length_penalty": float("-inf")}, "t2c.length_penalty")):
        with pytest.raises(ConfigError, match=needle):
            T2CConfig(**kw).validate()
    T2CConfig(beams=64, length_penalty=0.5).validate()
