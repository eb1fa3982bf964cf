"""The compiled kernels of the sequence-parallel graphs, kept beside the engine for the next start.

A torch-compiled engine's own artefacts hold the one-process graphs; a rank's blocks with the
all-to-alls are other graphs, which each rank compiles at the first image of a shape (the ranks of
one host share Inductor's cache on disk, written whole by torch). After that first image, rank 0
alone writes the compile caches of everything compiled so far into the engine folder, one file per
shape (`sequence-parallel-<N>-<WxH>-b<batch>.inductor-cache.bin`, the size as Resolution.key writes it), then a JSON record naming its
sha256, torch version and degree; both go through `files.staged` + `publish`, and the artefact goes
first, so a crash leaves no record pointing at a partial file. At the next start every rank loads
the files whose record matches (checksum first, as for the engine's artefacts: they are code that
torch unpickles) before anything compiles. A folder that cannot be written only costs a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..engines.torch_compiled import ARTIFACT_SUFFIX, load_artifacts, save_artifacts
from ..files import publish, staged

PREFIX = "sequence-parallel-"


def artifact_path(engine_dir, degree: int, shape_key: str) -> Path:
    return Path(engine_dir) / f"{PREFIX}{degree}-{shape_key}{ARTIFACT_SUFFIX}"


def record_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def saved_shapes(engine_dir, degree: int) -> list[str]:
    """Shape keys with a complete, matching record for this degree and torch (checksums not read)."""
    shapes = []
    for record in sorted(Path(engine_dir).glob(f"{PREFIX}{degree}-*{ARTIFACT_SUFFIX}.json")):
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("degree") == degree and meta.get("torch") == torch.__version__ and "shape" in meta:
            shapes.append(meta["shape"])
    return shapes


def load(engine_dir, degree: int) -> list[str]:
    """Load every matching artefact file of this degree; returns the shape keys loaded."""
    if engine_dir is None or not Path(engine_dir).is_dir():
        return []
    loaded = []
    for shape in saved_shapes(engine_dir, degree):
        artifact = artifact_path(engine_dir, degree, shape)
        meta = json.loads(record_path(artifact).read_text())
        try:
            data = artifact.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            warnings.warn(f"{artifact} does not match its record's sha256: not loaded (it will be compiled again)",
                          stacklevel=2)
            continue
        load_artifacts(data)
        loaded.append(shape)
    return loaded


def save(engine_dir, degree: int, shape_key: str) -> Path | None:
    """Rank 0, after the first image of a shape: this process's compile caches, whole or nothing."""
    try:
        data = save_artifacts()
        artifact = artifact_path(engine_dir, degree, shape_key)
        with staged(artifact.parent, artifact.name) as tmp:
            tmp.write_bytes(data)
            publish(tmp, artifact)
        meta = {"degree": degree, "shape": shape_key, "torch": torch.__version__,
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        record = record_path(artifact)
        with staged(record.parent, record.name) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
            publish(tmp, record)
        return artifact
    except (OSError, RuntimeError) as error:
        warnings.warn(f"could not keep the sequence-parallel compiled kernels in {engine_dir} ({error}); "
                      "the next start compiles them again", stacklevel=2)
        return None
