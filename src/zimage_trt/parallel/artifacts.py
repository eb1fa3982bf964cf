"""The compiled kernels of the sequence-parallel graphs, kept beside the engine for the next start.

A torch-compiled engine's own artefacts hold the one-process graphs; a rank's blocks with the
all-to-alls are other graphs, which each rank compiles at the first image of a shape (the ranks of
one host share Inductor's cache on disk, written whole by torch). After that first image, rank 0
alone writes the compile caches of everything compiled so far into the engine folder, one file per
shape (`sequence-parallel-<N>-<WxH>-b<batch>.inductor-cache.bin`) and its record, as
engines/kept_artifacts.py keeps every later-compiled kernel; at the next start every rank loads the
files whose record matches this degree and torch before anything compiles.
"""

from __future__ import annotations

from pathlib import Path

from ..engines import kept_artifacts

PREFIX = "sequence-parallel-"


def artifact_path(engine_dir, degree: int, shape_key: str) -> Path:
    return kept_artifacts.artifact_path(engine_dir, PREFIX, f"{degree}-{shape_key}")


record_path = kept_artifacts.record_path


def load(engine_dir, degree: int) -> list[str]:
    """Load every matching artefact file of this degree; returns the shape keys loaded."""
    keys = kept_artifacts.load(engine_dir, PREFIX, {"degree": degree})
    return [key.split("-", 1)[1] for key in keys]


def save(engine_dir, degree: int, shape_key: str) -> Path | None:
    """Rank 0, after the first image of a shape: this process's compile caches, whole or nothing."""
    return kept_artifacts.save(engine_dir, PREFIX, f"{degree}-{shape_key}", {"degree": degree, "shape": shape_key},
                               "sequence-parallel compiled kernels")
