"""Model files as the nodes see them: files users pick from a models folder, names they give outputs, and the
content fingerprints that tell ComfyUI's cache when a file changed."""

from __future__ import annotations

import hashlib
import os
import unicodedata

import folder_paths

from ..edlora.errors import ModelFileError

#: Longest output name (without extension) in bytes: file systems allow 255, the extension and a temporary
#: prefix need the rest.
MAX_NAME_BYTES = 200
_FORBIDDEN = set('<>:"/\\|?*')


def model_path(folder: str, name, what: str, error: type[ModelFileError] = ModelFileError) -> str:
    """Full path of ``name`` listed in models/``folder``; an unknown or non-text name is an error naming it."""
    if not isinstance(name, str):
        raise error(f"{what}: expected a file name from models/{folder}, got {type(name).__name__} {name!r}.")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise error(
            f"{what} '{name}' is not in models/{folder} (folders searched: {', '.join(folder_paths.get_folder_paths(folder))})."
        )
    return path


def plain_name_problem(stem: str) -> str | None:
    """Why ``stem`` cannot be an output file name in a models folder, or None when it can."""
    if not stem:
        return "it is empty"
    if stem in (".", "..") or stem.startswith("."):
        return "it starts with a dot (a hidden file)"
    if any(c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in stem):
        bad = next(c for c in stem if c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"))
        return f"it contains {bad!r} (no folders, control characters or any of {''.join(sorted(_FORBIDDEN))})"
    if stem != stem.strip():
        return "it starts or ends with a space"
    if len(stem.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is {len(stem.encode('utf-8'))} bytes long; at most {MAX_NAME_BYTES} are allowed"
    return None


def output_path(
    folder: str, name: str, extension: str, overwrite: bool, what: str, error: type[ModelFileError] = ModelFileError
) -> str:
    """Where an output named ``name`` goes in models/``folder``: checked as a plain file name, and refused when the
    file exists and ``overwrite`` is off. Call it before any long work starts."""
    stem = name.strip() if isinstance(name, str) else name
    if not isinstance(stem, str):
        raise error(f"{what}: the file name must be text, got {type(name).__name__} {name!r}.")
    if stem.lower().endswith(extension.lower()):
        stem = stem[: -len(extension)]
    problem = plain_name_problem(stem)
    if problem is not None:
        raise error(f"{what}: {name!r} cannot be a file name: {problem}.")
    path = os.path.join(folder_paths.get_folder_paths(folder)[0], stem + extension)
    if os.path.exists(path) and not overwrite:
        raise error(f"{what}: '{path}' exists; set overwrite or choose another name.")
    return path


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(folder: str, name) -> str:
    """What ComfyUI's cache compares for a file input: the content hash, so replacing a file re-runs its node."""
    path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
    return file_sha256(path) if path and os.path.isfile(path) else str(name)
