"""llama-cpp-python for W1, W3 and W4, in its own cached virtual environment.

It is kept out of our environment on purpose: it compiles llama.cpp from source (about 8 minutes on
2 cores) and nothing but the benchmark needs it. ``setup()`` builds it once under
``cache_dir("bench")/llama-venv`` (``make bench`` calls ``python -m metaspo_hf.bench.llama_cpp``);
``measure()`` runs ``llama_cpp_worker.py`` there as a subprocess and reads its JSON back. When the
build fails (no compiler, no access to PyPI), the reason is kept next to the environment and the
benchmark reports the variant as skipped instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from ..paths import cache_dir

# The release whose low-level API (llama_memory_*, kv_unified) the worker is written against.
VERSION = "0.3.36"
# This CPU's vector extensions, named one by one instead of -DGGML_NATIVE=ON, so that the AMX kernels
# stay out: with them, llama_decode segfaults on any batch of 2+ tokens on AMX Xeons in VMs (issue 13;
# upstream, ggml-org/llama.cpp#20824, a crash in ggml_backend_amx_mul_mat). The environment is never
# copied to another machine; a CPU without AVX-512 needs these flags edited (or GGML_NATIVE=ON).
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
              "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
              "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
WORKER = Path(__file__).with_name("llama_cpp_worker.py")


def env_dir() -> Path:
    return cache_dir("bench") / "llama-venv"


def _python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_python() -> Path:
    """The environment's interpreter: the only one that can import llama_cpp."""
    return _python(env_dir())


def _failure_file() -> Path:
    return cache_dir("bench") / "llama-venv.failed"


def _build_file() -> Path:
    return env_dir() / "metaspo-build-flags.txt"


def is_ready() -> bool:
    """Built, importable, and built with today's flags (an environment built with others is rebuilt)."""
    python = venv_python()
    if not python.is_file() or not _build_file().is_file() or _build_file().read_text() != CMAKE_ARGS:
        return False
    probe = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == VERSION


def setup(force: bool = False) -> str | None:
    """Builds the environment when missing; returns None when ready, else why it could not be built."""
    if is_ready() and not force:
        return None
    root = env_dir()
    shutil.rmtree(root, ignore_errors=True)
    print(f"[bench] building llama-cpp-python {VERSION} into {root} (compiles llama.cpp; ~8 min on 2 cores)",
          file=sys.stderr, flush=True)
    try:
        venv.create(root, with_pip=True, clear=True)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        built = subprocess.run([str(_python(root)), "-m", "pip", "install", "--no-cache-dir",
                                f"llama-cpp-python=={VERSION}"], env=env, capture_output=True, text=True)
    except OSError as error:
        return _failed(f"cannot create the environment: {error}")
    if built.returncode != 0:
        tail = " ".join((built.stderr or built.stdout).strip().splitlines()[-3:])
        return _failed(f"pip could not build llama-cpp-python {VERSION}: {tail[-400:]}")
    _build_file().write_text(CMAKE_ARGS)
    _failure_file().unlink(missing_ok=True)
    return None


def _failed(reason: str) -> str:
    _failure_file().write_text(reason)
    return reason


def skip_reason() -> str | None:
    """None when the environment is ready; otherwise what to tell the user."""
    if is_ready():
        return None
    failure = _failure_file()
    if failure.is_file():
        return f"llama-cpp-python could not be built: {failure.read_text().strip()}"
    return ("llama-cpp-python is not installed in the benchmark environment; "
            "`make bench` builds it (or run `python -m metaspo_hf.bench.llama_cpp`)")


# The worker's paths (llama_cpp_worker.py); which one is fastest is measured, per format (docs/benchmarks.md).
PATHS = ("batched_unified", "batched_split", "high_level")
# The one-chat-at-a-time path takes 2-3x as long as the batched ones and is never the fastest; the
# benchmark runs it only where it checks something (the F32 file's tokens on W1).
BATCHED_PATHS = PATHS[:2]


def measure(gguf: Path, prompts: list[list[int]], new_tokens: int, threads: int, suppress: list[int],
            repeats: int, paths: tuple[str, ...] = PATHS) -> dict:
    """The worker's results: {"version", "paths": {path: {"runs": [...]}}} (see llama_cpp_worker.py)."""
    job = {"gguf": str(gguf), "prompts": prompts, "new_tokens": new_tokens, "threads": threads,
           "suppress": suppress, "repeats": repeats, "paths": list(paths)}
    with tempfile.TemporaryDirectory(prefix="metaspo-bench-") as folder:
        job_path, out_path = Path(folder) / "job.json", Path(folder) / "out.json"
        job_path.write_text(json.dumps(job))
        # -I keeps the worker's own folder off sys.path: this file would shadow the llama_cpp package.
        done = subprocess.run([str(venv_python()), "-I", str(WORKER), str(job_path), str(out_path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            # A crash in native code (a segfault in llama_decode) fails the llama.cpp variant, not the benchmark.
            return {"version": VERSION, "build": CMAKE_ARGS,
                    "paths": {"worker": {"failed": process_failure(done.returncode, done.stderr)}}}
        return {**json.loads(out_path.read_text()), "build": CMAKE_ARGS}


def process_failure(returncode: int, stderr: str, who: str = "the llama.cpp worker") -> str:
    """How ``who`` (a subprocess) failed, in one line: the signal when there was one, and the end of its stderr."""
    if returncode < 0:
        try:
            cause = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            cause = f"was killed by signal {-returncode}"
    else:
        cause = f"exited with code {returncode}"
    tail = " ".join(stderr.strip().splitlines()[-2:])[-300:]
    return f"{who} {cause}" + (f": {tail}" if tail else " (no output)")


if __name__ == "__main__":
    problem = setup(force="--force" in sys.argv)
    # The benchmark runs without llama.cpp when it cannot be built, so a failed build is not an error.
    print(f"[bench] llama.cpp skipped: {problem}" if problem else f"[bench] llama-cpp-python {VERSION} ready",
          file=sys.stderr)
