"""bench/cpu_bf16.py on tiny sizes: both precisions timed, and the trainer's choice reported."""

from __future__ import annotations

import json

from conftest import load_script


def test_cpu_bf16_table_and_json(tmp_path, capsys, monkeypatch):
    from echox.train import trainer

    script = load_script("bench/cpu_bf16.py", "bench_cpu_bf16")
    from echox.model import precision

    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "r.json"
    assert script.main(["--size", "16", "--width", "64", "--seq", "4", "--batch", "1",
                        "--reps", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CPU bf16: emulated" in text and "bf16 runs as fp32" in text
    res = json.loads(out.read_text())
    assert res["native_bf16"] is False and res["bf16_runs_as"] == "fp32"
    assert [r["work"].split()[0] for r in res["rows"]] == ["matmul", "layer"]
    for r in res["rows"]:
        assert r["fp32"] > 0 and r["bf16"] > 0 and r["bf16_speedup"] > 0
