"""Finding a model's files and reading only the tensors a caller needs.

A model is a local directory or a hub repository id. Checkpoints are safetensors, single-file or sharded
(``model.safetensors.index.json``). ``load_tensors`` opens only the shards that hold the requested tensors,
and reads tensors one at a time, so a server's peak memory follows its span, not the whole model.
Used by both the client (local modules) and the server (its span); knows nothing about either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from petals_cli.errors import ModelNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a local directory, or a hub repo fetched file by file."""

    name: str
    local_dir: Path | None = None
    revision: str | None = None
    token: str | None = None

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None


def resolve_model(model: str, *, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Decide whether MODEL is a local directory or a hub repo id; fail clearly when it is neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{model}: directory has no config.json")
        return ModelSource(name=model, local_dir=path.resolve())
    if model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1:
        raise ModelNotFoundError(f"{model}: no such model directory")
    return ModelSource(name=model, revision=revision, token=token or os.environ.get("HF_TOKEN"))


def fetch_file(source: ModelSource, filename: str) -> Path:
    """Path to one file of the model, downloading it from the hub into the HF cache when needed."""
    if source.is_local:
        path = source.local_dir / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{source.name}: missing {filename}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source.name, filename, revision=source.revision, token=source.token))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise hub_error(source, filename, exc) from exc


def metadata_dir(source: ModelSource) -> Path:
    """A directory with config and tokenizer files (no weights), for AutoConfig/AutoTokenizer."""
    if source.is_local:
        return source.local_dir
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.name, revision=source.revision, token=source.token, allow_patterns=METADATA_PATTERNS
            )
        )
    except Exception as exc:  # the hub client raises many unrelated types for "unreachable"
        raise hub_error(source, "config and tokenizer files", exc) from exc


def hub_error(source: ModelSource, what: str, exc: Exception) -> ModelNotFoundError:
    """Why a hub download failed, with the next step that fits: offline, unreachable, unknown, or gated."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = source.name
    download = f"download it first while online (`hf download {name}`), or pass a local model directory"
    if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):  # not cached, and no way to the hub
        if constants.HF_HUB_OFFLINE or _caused_by(exc, OfflineModeIsEnabled):
            return ModelNotFoundError(
                f"{name}: not in the local Hugging Face cache ({what} missing), and the hub is offline "
                "(HF_HUB_OFFLINE=1)",
                hint=f"{download}, or unset HF_HUB_OFFLINE",
            )
        return ModelNotFoundError(
            f"{name}: not in the local Hugging Face cache ({what} missing), and the hub cannot be reached",
            hint=f"check the network, or {download}",
        )
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return ModelNotFoundError(
            f"{name}: a gated repository that this token may not read",
            hint="accept its terms on its hub page, then set HF_TOKEN to a token of that account",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"{name}: no such directory, and no such repository on the hub",
            hint="check the name; for a private repository set HF_TOKEN",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(f"{name}: no revision {source.revision!r}", hint="check the revision (--revision)")
    if isinstance(exc, EntryNotFoundError):
        return ModelNotFoundError(f"{name}: the repository has no {what}")
    if isinstance(exc, HFValidationError):
        return ModelNotFoundError(f"{name}: no such directory, and not a hub repository id (owner/name)")
    return ModelNotFoundError(f"{name}: cannot fetch {what} ({exc.__class__.__name__}: {exc})")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__
    return False


def weight_map(source: ModelSource) -> dict[str, str]:
    """Tensor name -> file name, from the index of a sharded checkpoint or the header of a single file."""
    if not source.is_local or (source.local_dir / INDEX_FILE).is_file():
        try:
            index_path = fetch_file(source, INDEX_FILE)
        except ModelNotFoundError:
            index_path = None
        if index_path is not None:
            with open(index_path) as file:
                return dict(json.load(file)["weight_map"])
    from safetensors import safe_open

    single = fetch_file(source, SINGLE_FILE)
    with safe_open(str(single), framework="pt") as file:
        return {name: SINGLE_FILE for name in file.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)


def locate(name: str, files: dict[str, str], *, base_prefix: str) -> str:
    """The checkpoint's name for a model tensor: as is, or without the base model prefix.

    Checkpoints saved from the base model (e.g. BLOOM's ``h.0.…`` instead of ``transformer.h.0.…``) omit it.
    Returns ``name`` unchanged when neither is present, so ``load_tensors`` reports it as missing.
    """
    if name in files:
        return name
    stripped = name[len(base_prefix) + 1 :] if name.startswith(f"{base_prefix}.") else name
    return stripped if stripped in files else name


def load_tensors(
    source: ModelSource,
    names: Iterable[str],
    *,
    rename: Callable[[str], str] = lambda name: name,
    dtype=None,
    device: str = "cpu",
    files: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Read the named tensors, opening only the shards that hold them. Missing names raise ModelNotFoundError.

    ``on_progress(bytes_read, bytes_total)`` is called after each tensor.
    """
    from safetensors import safe_open

    files = weight_map(source) if files is None else files
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in files:
            raise ModelNotFoundError(f"{source.name}: checkpoint has no tensor {name}")
        by_file.setdefault(files[name], []).append(name)
    tensors, done, total = {}, 0, 0
    paths = {filename: str(fetch_file(source, filename)) for filename in sorted(by_file)}
    if on_progress is not None:
        for filename, file_names in by_file.items():
            with safe_open(paths[filename], framework="pt") as file:
                total += sum(_stored_bytes(file.get_slice(name)) for name in file_names)
    for filename, file_names in sorted(by_file.items()):
        with safe_open(paths[filename], framework="pt", device=device) as file:
            for name in file_names:
                tensor = file.get_tensor(name)
                if on_progress is not None:
                    done += tensor.numel() * tensor.element_size()
                    on_progress(done, total)
                tensors[rename(name)] = (
                    tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                )
    return tensors


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _stored_bytes(tensor_slice) -> int:
    """A tensor's size in its checkpoint, from the safetensors header alone."""
    count = 1
    for size in tensor_slice.get_shape():
        count *= size
    return count * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 1)
