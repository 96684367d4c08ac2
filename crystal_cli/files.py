"""Small file helpers every stage shares: recipe TOML with one-line errors, content hashes for caches, and
where the founders' data lives."""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path

from crystal_cli.errors import CrystalError


def read_toml(path: str | Path) -> dict:
    """A recipe file as a dict; a missing file or bad TOML is a CrystalError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CrystalError(f"{path}: is a directory, not a recipe file")
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CrystalError(f"{path}: no such recipe") from None
    except UnicodeDecodeError:
        raise CrystalError(f"{path}: not a text file, so not a TOML recipe") from None
    except OSError as exc:
        raise CrystalError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CrystalError(f"{path}: invalid TOML ({exc})") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (GGUF files are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shared_data(*parts: str) -> Path:
    """A path under the founders' data folder: $CRYSTAL_SHARED_DATA, else ../shared/data beside the source
    checkout (the data is never copied into the repository; an installed package needs the variable)."""
    root = os.environ.get("CRYSTAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root).joinpath(*parts)
