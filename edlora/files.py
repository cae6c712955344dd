"""One safe way to read and write the model files this pack handles (ED-LoRAs, LoRAs, fused bundles).

Model files are untrusted. ``.pth``/``.pt``/``.bin`` pickles are only ever read with ``torch.load(weights_only=True)``;
a file that carries pickled code is refused without running it. Safetensors need no such care. Every problem is a
:class:`ModelFileError` (or a subclass) whose message names the file. Writes go to a temporary file beside the
destination and are moved into place, so a failure never leaves half a file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch

from .errors import ModelFileError

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_EXTENSIONS)


def read_torch(path: str, name: str, error: type[ModelFileError] = ModelFileError):
    """``torch.load`` with ``weights_only``: tensors and plain containers only; pickled code is refused by name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise error(
                f"Refused to load '{name}': it contains pickled Python objects other than tensors and plain "
                "containers. Unpickling such a file can run arbitrary code, so it is never loaded. A genuine model "
                "file holds only tensors; ask its author for a .safetensors file."
            ) from None
        raise error(f"'{name}' is not a readable PyTorch file (corrupt or truncated?): {_first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as exc:
        raise error(f"'{name}' is not a readable PyTorch file (corrupt or truncated?): {_first_line(exc)}") from None


def read_safetensors(
    path: str, name: str, error: type[ModelFileError] = ModelFileError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; any damage is an error naming the file."""
    import safetensors

    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own exception types for every kind of damage
        raise error(f"'{name}' is not a readable safetensors file (corrupt or truncated?): {_first_line(exc)}") from None
    return tensors, metadata


def check_format(metadata: dict, name: str, format_name: str, versions: tuple[str, ...], error: type[ModelFileError]) -> str:
    """The file's ``format_version``; a file of another format, or a version this pack does not read, is refused."""
    if metadata.get("format_name") != format_name:
        raise error(f"'{name}' is not a {format_name} file (its metadata says {metadata.get('format_name')!r}).")
    version = metadata.get("format_version")
    if version not in versions:
        readable = ", ".join(repr(v) for v in versions)
        raise error(f"'{name}' uses {format_name} format version {version!r}; this pack reads {readable}.")
    return version


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> str:
    """Write a safetensors file atomically."""
    import safetensors.torch

    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str, writer) -> str:
    """Run ``writer(temporary path)`` and move the result to ``path``; on any failure nothing is left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
