"""The package's shape: the layer contract, the command table, the one error family."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import echox.errors
from echox.cli import COMMANDS, GROUPS, build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src" / "echox"


def test_layer_contract_holds():
    """`lint-imports` (import-linter) checks the layers and the no-loop rule of pyproject.toml."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    res = subprocess.run([exe], cwd=SRC.parents[1], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_every_error_class_is_an_echox_error():
    """No error family beside `EchoXError`: every exception class defined in the package is one."""
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                # the one exception: the server's ApiError carries an HTTP status
                assert path.name == "errors.py" or node.name == "ApiError", (
                    f"{path}: {node.name} belongs in echox/errors.py")
    from echox.serve.inputs import ApiError

    assert issubclass(ApiError, echox.errors.EchoXError)
    for name in dir(echox.errors):
        obj = getattr(echox.errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, echox.errors.EchoXError), name


def test_command_table_builds_one_parser_with_every_command():
    parser = build_parser()
    seen = set()
    for cmd in COMMANDS:
        assert cmd.words not in seen, cmd.words
        seen.add(cmd.words)
        assert len(cmd.words) == 1 or cmd.words[0] in GROUPS
        # every row parses its own --help (its options function ran without errors)
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*cmd.words, "--help"])
        assert exit_.value.code == 0


@pytest.mark.parametrize("command", [["train", "s2t"], ["vocoder", "train"]])
def test_one_recipe_loader_refuses_unknown_keys(command, capsys, tmp_path):
    """Every training command reads its recipe through `config.load_recipe`: a typo'd key, in
    the file or in `--set`, is a one-line error (status 2) naming the valid keys, never dropped."""
    bad = tmp_path / "recipe.yaml"
    bad.write_text("train: {steps: 3}\n")  # the key is max_steps
    assert main([*command, "--recipe", str(bad), "--data", "x.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'steps'" in err[0] and "max_steps" in err[0]
    assert main([*command, "--set", "train.max_step=3", "--data", "x.jsonl"]) == 2
    assert "max_step" in capsys.readouterr().err
    assert main([*command, "--set", "nosection.k=1", "--data", "x.jsonl"]) == 2
    assert "section" in capsys.readouterr().err
