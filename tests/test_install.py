"""The install: requirements/cpu.lock pins what pyproject.toml allows (torch's CPU build, no CUDA
packages), every range has an upper bound, and `echox --version` names the key versions."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from echox.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["data"]]


def test_lock_pins_the_cpu_build_of_torch():
    pins = _pins()
    assert pins["torch"].endswith("+cpu")
    assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-"))]


def test_lock_satisfies_the_ranges_and_each_range_is_bounded():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not in requirements/cpu.lock: run `bash scripts/lock.sh`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in the lock is outside {req.specifier}: run `bash scripts/lock.sh`"
        )
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
            f"{req} has no upper bound"
        )


def test_version_names_the_key_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("echox ")
    for name in ("torch", "transformers", "onnxruntime"):
        assert f"{name} {version(name)}" in lines


def test_setup_refuses_a_python_it_cannot_use(tmp_path):
    """A missing interpreter was a bare `command not found` (127); a too old one failed in pip's
    resolver after making a venv, which the next run (with the right Python) then reused."""
    import subprocess
    import sys

    def fake(name: str, version: tuple) -> Path:  # this Python, saying it is `version`
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import sys; sys.version_info = "
                        f"{version!r}; exec(compile(sys.argv[1], '<c>', 'exec'))\" \"$2\"\n")
        path.chmod(0o755)
        return path

    def setup(python: Path, venv: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True,
                              text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "ECHOX_VENV": str(venv)})

    def refused(r: subprocess.CompletedProcess, what: str) -> None:
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and what in r.stderr, r.stderr

    refused(setup(tmp_path / "no-python", tmp_path / "v1"), "no Python at")
    py39, py311, py312 = (fake(f"py{v}", (3, v, 1, "final", 0)) for v in (9, 11, 12))
    refused(setup(py39, tmp_path / "v2"), "needs Python 3.10 or newer, and")
    assert not (tmp_path / "v2").exists()
    for python, held, why in ((py311, py39, "holds Python 3.9, older than 3.10"),
                              (py312, py311, "holds Python 3.11, not")):
        venv = tmp_path / f"venv-{held.name}"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(held)  # left by an earlier run
        refused(setup(python, venv), why)
