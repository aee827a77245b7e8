"""The benchmark's model as GGUF files in llama.cpp's formats, converted once from the model folder the engine
runs (the same weights), so that each format is a llama.cpp variant of its own.

F32, F16, BF16 and Q8_0 come from llama.cpp's own ``convert_hf_to_gguf.py`` (``--outtype``); Q4_0 from
llama.cpp's quantizer (``llama_model_quantize``, default parameters) run on the F32 file inside the
llama-cpp-python environment of ``llama_cpp.py``, so it is skipped, with the reason, while that environment
is not built. The script is taken from the llama-cpp-python ``VERSION`` sdist (its ``vendor/llama.cpp``:
the script, its ``conversion`` package and ``gguf-py``), downloaded and unpacked once into
``cache_dir("bench")/llama-cpp-convert-<VERSION>`` (no compiler needed). It runs on our interpreter (it
needs torch and transformers) with that ``gguf-py`` ahead of our own, possibly different, gguf package,
and with sentencepiece, which the script imports for every llama-family model, installed beside it.

The files are ``cache_dir("bench")/gguf/<model>/<FORMAT>.gguf``, made once and reused; each is written
under a temporary name and renamed when complete, so a killed conversion leaves nothing behind.
``python -m metaspo_hf.bench.gguf`` makes them for the benchmark's model (``make bench`` does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..models.loading import staged
from ..paths import cache_dir
from . import llama_cpp

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
# The formats the script writes itself; Q4_0 is not among its output types.
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
SCRIPT = "convert_hf_to_gguf.py"
# What the conversion needs from the sdist's vendor/llama.cpp: the script and the packages it imports.
SOURCE_PARTS = (SCRIPT, "conversion/", "gguf-py/")
# The script's own requirement (vendor/llama.cpp/requirements/requirements-convert_legacy_llama.txt).
SENTENCEPIECE = "sentencepiece>=0.1.98,<0.3.0"
# Run by the llama.cpp environment's interpreter: argv[1] quantized to Q4_0 into argv[2].
QUANTIZE_Q4_0 = (
    "import ctypes, sys, llama_cpp\n"
    "llama_cpp.llama_backend_init()\n"
    "params = llama_cpp.llama_model_quantize_default_params()\n"
    "params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))\n"
)


class Unavailable(Exception):
    """A GGUF file (or the tools to make it) that could not be had; the message says why."""


def files(model_folder: Path, model_name: str) -> dict[str, Path | str]:
    """Every format's GGUF file of the model in ``model_folder``, made where missing; a format that could not
    be made maps to why."""
    folder = cache_dir("bench", "gguf", model_name)
    targets = {fmt: folder / f"{fmt}.gguf" for fmt in FORMATS}
    missing = [fmt for fmt, target in targets.items() if not target.is_file()]
    try:
        tools = source() if any(fmt in OUTTYPES for fmt in missing) else None
    except Unavailable as why:
        return {fmt: str(why) if fmt in missing else target for fmt, target in targets.items()}
    result: dict[str, Path | str] = dict(targets)
    for fmt in missing:
        print(f"[bench] writing {targets[fmt]}", file=sys.stderr, flush=True)
        try:
            if fmt in OUTTYPES:
                with staged(targets[fmt]) as staging:
                    _run(conversion_command(tools, model_folder, OUTTYPES[fmt], staging),
                         f"{SCRIPT} --outtype {OUTTYPES[fmt]}", env=conversion_env(tools))
            else:
                _quantize_q4_0(result["F32"], targets[fmt])
        except Unavailable as why:
            result[fmt] = str(why)
    return result


def conversion_command(tools: Path, model_folder: Path, outtype: str, out: Path) -> list[str]:
    """The script on our interpreter (it needs torch and transformers)."""
    return [sys.executable, str(tools / SCRIPT), str(model_folder), "--outtype", outtype, "--outfile", str(out)]


def conversion_env(tools: Path) -> dict[str, str]:
    """The sdist's gguf-py first on the path: the script is written against it, not against our gguf package."""
    path = [str(tools / "gguf-py"), str(tools / "deps"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def _quantize_q4_0(f32: Path | str, target: Path) -> None:
    reason = llama_cpp.skip_reason()
    if reason:
        raise Unavailable(reason)
    if isinstance(f32, str):
        raise Unavailable(f"no F32 file to quantize: {f32}")
    with staged(target) as staging:
        _run([str(llama_cpp.venv_python()), "-I", "-c", QUANTIZE_Q4_0, str(f32), str(staging)], "llama_model_quantize")


def _run(command: list[str], who: str, env: dict[str, str] | None = None) -> None:
    """Raises Unavailable, with the end of its output, when ``command`` fails."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise Unavailable(llama_cpp.process_failure(done.returncode, done.stderr or done.stdout, who))


def source() -> Path:
    """The conversion tools (the script, ``conversion``, ``gguf-py``, and sentencepiece in ``deps``), fetched once."""
    root = cache_dir("bench") / f"llama-cpp-convert-{llama_cpp.VERSION}"
    if root.is_dir():
        return root
    print(f"[bench] fetching llama.cpp's conversion script (llama-cpp-python {llama_cpp.VERSION} sdist) into {root}",
          file=sys.stderr, flush=True)
    with staged(root, folder=True) as staging:
        sdist = staging / "sdist"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={llama_cpp.VERSION}", "-d", str(sdist)], "pip download")
        _unpack(next(sdist.glob("*.tar.gz"), None), staging)
        shutil.rmtree(sdist)  # 77 MB, nearly all of it llama.cpp's C++ sources
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
              "--target", str(staging / "deps"), SENTENCEPIECE], "pip install")
    return root


def _unpack(tarball: Path | None, folder: Path) -> None:
    """Only ``SOURCE_PARTS`` of the sdist's vendor/llama.cpp, into ``folder`` (the rest is llama.cpp's C++)."""
    prefix = f"llama_cpp_python-{llama_cpp.VERSION}/vendor/llama.cpp/"
    if tarball is None:
        raise Unavailable("pip download left no llama-cpp-python sdist")
    with tarfile.open(tarball) as archive:
        members = [member for member in archive.getmembers()
                   if member.name.startswith(prefix) and member.name[len(prefix):].startswith(SOURCE_PARTS)]
        for member in members:
            member.name = member.name.removeprefix(prefix)
        archive.extractall(folder, members=members, filter="data")
    if not (folder / SCRIPT).is_file():
        raise Unavailable(f"the llama-cpp-python {llama_cpp.VERSION} sdist has no vendor/llama.cpp/{SCRIPT}")


def file_format(path: Path) -> str | None:
    """A GGUF file's type as llama.cpp names it (``F32``, ``Q4_1``, ``Q4_K_M``), or None when it does not say."""
    from gguf import GGUFReader, LlamaFileType  # our gguf package, only to read a header

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    return LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")


if __name__ == "__main__":
    from ..models.loading import ModelSpec, local_folder
    from . import MODEL

    made = files(local_folder(ModelSpec(name_or_path=MODEL, dtype="float32")), MODEL)
    for fmt, file in made.items():
        print(f"[bench] {fmt}: {file if isinstance(file, Path) else f'skipped: {file}'}", file=sys.stderr)
