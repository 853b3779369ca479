"""What this machine's processor can do, where fedllm's choices depend on it."""

from __future__ import annotations


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): there
    bf16 trains and scores faster than fp32 (about 2.9x the matmul rate on the AVX512-BF16
    CPU fedllm's benchmarks ran on).

    oneDNN also runs bf16 on plain AVX-512 by converting to fp32, slower than fp32 itself,
    so ``torch.backends.mkldnn`` saying bf16 works is not enough; these are torch's own
    cpuinfo checks (private, hence the fallback to False where a build lacks them).
    """
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False
