"""Manifests: CSV files listing subjects, their images per contrast and an optional label map.

Format (header required)::

    subject,t1,t2,labels
    IXI012,/data/IXI012_t1.nii.gz,,/data/IXI012_labels.nii.gz

``subject`` is required and unique; ``labels`` is optional; every other
column is a contrast. Empty cells mean "not available". Relative paths are
relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class Subject:
    """One row of a manifest: ``images`` maps contrast -> path; ``labels`` a path or None."""

    name: str
    images: dict
    labels: pathlib.Path | None = None


def read_manifest(path, *, contrasts=None, require_labels: bool = False) -> list[Subject]:
    """Read and validate a manifest CSV.

    Args:
      path: the CSV file.
      contrasts: contrasts every subject must have (default: none required).
      require_labels: every subject must have a label map.

    Returns:
      Subjects in file order.

    Raises:
      FileNotFoundError: the manifest or a listed file does not exist.
      ValueError: no ``subject`` column, duplicate or empty subject names, no
        rows, or a required contrast/label missing (the message names the row).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "subject" not in fields:
            raise ValueError(f"manifest {path} needs a 'subject' column, got columns {fields}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise ValueError(f"manifest {path} lists no subjects")
    names = set()
    out = []
    for n, r in enumerate(rows, start=2):
        name = r["subject"]
        if not name:
            raise ValueError(f"{path}:{n}: empty subject name")
        if name in names:
            raise ValueError(f"{path}:{n}: duplicate subject {name!r}")
        names.add(name)

        def resolve(p):
            q = pathlib.Path(p)
            q = q if q.is_absolute() else path.parent / q
            if not q.is_file():
                raise FileNotFoundError(f"{path}:{n}: file {q} (subject {name}) does not exist")
            return q

        images = {k: resolve(v) for k, v in r.items() if k not in ("subject", "labels") and v}
        for c in contrasts or ():
            if c not in images:
                raise ValueError(f"{path}:{n}: subject {name} has no {c!r} image (columns {fields})")
        labels = resolve(r["labels"]) if r.get("labels") else None
        if require_labels and labels is None:
            raise ValueError(f"{path}:{n}: subject {name} has no label map")
        out.append(Subject(name, images, labels))
    return out


def write_manifest(path, subjects: list[Subject]) -> pathlib.Path:
    """Write ``subjects`` as a manifest CSV (absolute paths); returns the path."""
    path = pathlib.Path(path)
    contrasts = list(dict.fromkeys(c for s in subjects for c in s.images))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", *contrasts, "labels"])
        for s in subjects:
            absolute = lambda q: str(pathlib.Path(q).absolute()) if q else ""  # noqa: E731
            w.writerow([s.name, *[absolute(s.images.get(c)) for c in contrasts], absolute(s.labels)])
    return path
