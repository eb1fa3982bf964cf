"""Compiled kernels made after the build, kept beside a torch-compiled engine for the next start.

A torch-compiled engine's own artefacts hold the graphs its build compiled. Graphs compiled later, at
their first use in a running pipeline (sequence parallelism's sharded blocks, a ControlNet's hint path),
are kept here: after that first use the process's compile caches go into the engine folder as
`<prefix><key>.inductor-cache.bin`, then a JSON record naming its sha256, torch version and what it is
for (`identity`); both through `files.staged` + `publish`, the artefact first, so a crash leaves no
record pointing at a partial file. At the next start the files whose record matches are loaded
(checksum first, as for the engine's artefacts: they are code that torch unpickles) before anything
compiles. A folder that cannot be written only costs a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..files import publish, staged
from .torch_compiled import ARTIFACT_SUFFIX, load_artifacts, save_artifacts


def artifact_path(folder, prefix: str, key: str) -> Path:
    return Path(folder) / f"{prefix}{key}{ARTIFACT_SUFFIX}"


def record_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def saved_keys(folder, prefix: str, identity: dict) -> list[str]:
    """Keys with a complete record for `identity` and this torch (checksums not read)."""
    keys = []
    for record in sorted(Path(folder).glob(f"{prefix}*{ARTIFACT_SUFFIX}.json")):
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("torch") == torch.__version__ and "key" in meta and all(meta.get(k) == v for k, v in identity.items()):
            keys.append(meta["key"])
    return keys


def load(folder, prefix: str, identity: dict) -> list[str]:
    """Load every matching artefact file; returns the keys loaded."""
    if folder is None or not Path(folder).is_dir():
        return []
    loaded = []
    for key in saved_keys(folder, prefix, identity):
        artifact = artifact_path(folder, prefix, key)
        try:
            meta = json.loads(record_path(artifact).read_text())
            data = artifact.read_bytes()
        except (OSError, ValueError):
            continue
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            warnings.warn(f"{artifact} does not match its record's sha256: not loaded (it will be compiled again)",
                          stacklevel=2)
            continue
        load_artifacts(data)
        loaded.append(key)
    return loaded


def save(folder, prefix: str, key: str, identity: dict, what: str) -> Path | None:
    """This process's compile caches, whole or nothing; `what` names them in a warning if they cannot be kept."""
    try:
        data = save_artifacts()
        artifact = artifact_path(folder, prefix, key)
        with staged(artifact.parent, artifact.name) as tmp:
            tmp.write_bytes(data)
            publish(tmp, artifact)
        meta = {**identity, "key": key, "torch": torch.__version__, "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data)}
        record = record_path(artifact)
        with staged(record.parent, record.name) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
            publish(tmp, record)
        return artifact
    except (OSError, RuntimeError) as error:
        warnings.warn(f"could not keep the {what} in {folder} ({error}); the next start compiles them again",
                      stacklevel=2)
        return None
