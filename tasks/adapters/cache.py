"""This machine's copies of what it downloads from the artifact store, one folder per sha256: fetched once,
checked against the registered digest, then reused by every later run (pretrained starts, ingredients)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from soups.checkpoint import file_sha256


class ChecksumMismatchError(RuntimeError):
    """A downloaded artifact differs from the digest it was registered with: never use it."""


def digest_of(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative name, file sha256) lines."""
    if path.is_file():
        return file_sha256(path)
    lines = [f"{f.relative_to(path).as_posix()} {file_sha256(f)}\n" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def cached_artifact(client: MlflowClient, artifact_uri: str, digest: str, cache_dir: Path) -> Path:
    """``cache_dir/<digest>/<name>``: the artifact at ``artifact_uri``, downloaded the first time into a private folder,
    checked, then renamed into place (concurrent fetches of one digest each end with one complete copy; a
    wrong copy is deleted and refused with `ChecksumMismatchError`). A cached copy is checked again on every
    use (hashing costs far less than downloading or evaluating) and fetched again if it changed."""
    cached = cache_dir / digest
    name = artifact_uri.rstrip("/").rsplit("/", 1)[-1]
    if cached.is_dir():
        if (cached / name).exists() and digest_of(cached / name) == digest:
            return cached / name
        print(f"cached copy {cached / name} no longer has sha256 {digest}: fetching it again")
        shutil.rmtree(cached, ignore_errors=True)
    partial = cache_dir / f".{digest}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(partial), tracking_uri=client.tracking_uri
            )
        )
        got = digest_of(downloaded)
        if got != digest:
            raise ChecksumMismatchError(
                f"{artifact_uri} downloaded with sha256 {got}, registered {digest}: the artifact store copy is damaged"
            )
        (partial / "content").mkdir()
        downloaded.rename(partial / "content" / name)
        try:
            (partial / "content").rename(cached)
        except OSError:
            if not cached.is_dir():  # another process won the race with an identical copy: keep that one
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cached / name
