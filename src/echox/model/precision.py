"""Whether this CPU computes half precision natively.

CPUs with AVX512-BF16 or AMX run bfloat16 matmuls in hardware (AMX-FP16 does float16); on the
others (AVX2-only ones, for instance) torch emulates them, far slower than float32
(`bench/cpu_bf16.py`, docs/training.md). Training falls back to fp32 there
(`echox.train.trainer.effective_precision`) and loading a model in half precision on such a
CPU warns (`echox.infer.bundle.load_bundle`).
"""

from __future__ import annotations

import torch


def _probe(name: str) -> bool:
    import torch.cpu as tcpu

    fn = getattr(tcpu, name, None)  # private probes: absent or changed in another torch
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001
        return False


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    return _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported")


def cpu_has_fast_fp16() -> bool:
    """Whether this CPU computes float16 natively (AMX-FP16)."""
    return _probe("_is_amx_fp16_supported")


def slow_on_cpu(dtype: torch.dtype | None) -> bool:
    """Whether holding weights in `dtype` makes this CPU emulate its matmuls."""
    if dtype == torch.bfloat16:
        return not cpu_has_fast_bf16()
    if dtype == torch.float16:
        return not cpu_has_fast_fp16()
    return False
