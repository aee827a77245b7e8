"""The C++ decode-step attention for shared-prefix chunks in bfloat16 on CPU (kernels/decode_attention.cpp):
built once per machine with torch's extension builder, then loaded from the cache.

It replaces, for one-token decode steps only, the torch ops of ``prefix._shared_prefix_attention``; prefill
and float32 keep those ops (float32's matmuls read the cache in place and were faster than the kernel; its
tokens stay identical to plain ``generate``). Where it cannot be built (no C++ compiler, another CPU
architecture) the engine says why once and decodes with torch's ops. The same library holds the fused decode
step's elementwise ops (``add_rms_norm``, ``silu_mul``: ``decode_step.py``). Measured: docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import cache
from pathlib import Path

import torch

from ..paths import cache_dir

SOURCE = Path(__file__).with_name("kernels") / "decode_attention.cpp"
HEAD_DIMS = (64, 128)  # the head sizes it is compiled for (SmolLM2, Qwen2.5, Llama 3.2)
# -march=native: the build runs on the machine that uses it (the folder name carries the CPU's flags, so a
# cache shared between machines never loads another CPU's build). -fopenmp compiles at::parallel_for's
# pragmas, which then run on the OpenMP runtime torch already loaded; -fopenmp-simd vectorizes the
# reductions without -ffast-math.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fopenmp-simd", "-std=c++20"]


@cache
def load() -> object | None:
    """The compiled ops (``torch.ops.metaspo``, whose ``decode_attention`` the engine calls), or None where
    they cannot be built here."""
    if _registered():  # loaded before in this process (a library registers its ops once only)
        return torch.ops.metaspo
    if platform.machine() not in ("x86_64", "AMD64"):
        _say("the CPU decode-attention kernel is built for x86-64 only; decoding uses torch's ops")
        return None
    try:
        from torch.utils import cpp_extension
        _put_ninja_on_path()
        build = cache_dir("kernels", _build_tag())
        if not (build / "metaspo_decode_attention.so").exists():
            _say("building the CPU decode-attention kernel (once per machine, a few seconds)")
        cpp_extension.load(name="metaspo_decode_attention", sources=[str(SOURCE)], build_directory=str(build),
                           extra_cflags=_CFLAGS, is_python_module=False, verbose=False)
        return torch.ops.metaspo
    except Exception as error:  # a missing compiler or ninja, a failed build: torch's ops still work
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        _say(f"the CPU decode-attention kernel could not be built ({reason}); decoding uses torch's ops")
        return None


def _registered() -> bool:
    try:
        return torch.ops.metaspo.decode_attention is not None
    except (AttributeError, RuntimeError):
        return False


def applies(model) -> bool:
    """Whether decode steps of this model may use the kernel: bfloat16 weights on CPU, a head size built for."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return model.device.type == "cpu" and model.dtype == torch.bfloat16 and head_dim in HEAD_DIMS


def _build_tag() -> str:
    """One build folder per source, torch version, compiler flags and CPU."""
    flags = next((line for line in _cpuinfo().splitlines() if line.startswith("flags")), platform.processor())
    parts = [SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_CFLAGS).encode(), flags.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` package's binary may not be on it (a venv
    used without activating it)."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _say(message: str) -> None:
    print(f"metaspo: {message}", file=sys.stderr, flush=True)
