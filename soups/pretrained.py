"""What `model.pretrained` names, parsed once into a typed value: an open_clip tag, a checkpoint file, a
``local-dir:`` folder, a ``models:/<name>/<version>`` registry URI, or nothing (random init or the offline
start). Every reader asks this value, so no module decodes the string's prefixes itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LOCAL_DIR_PREFIX = "local-dir:"
REGISTRY_PREFIX = "models:/"
CHECKPOINT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}

Kind = Literal["none", "tag", "file", "local_dir", "registry"]


@dataclass(frozen=True)
class PretrainedStart:
    kind: Kind
    text: str | None
    """The configured string, as it was given."""

    @property
    def path(self) -> Path | None:
        """The file or folder it names (``~`` expanded); None for tags, registry URIs and nothing."""
        if self.kind == "file":
            return Path(self.text).expanduser()
        if self.kind == "local_dir":
            return Path(self.text.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        return None

    def local(self) -> Path | None:
        """The file or folder it names on this machine, resolved, when it exists there."""
        path = self.path
        return path.resolve() if path is not None and path.exists() else None

    def registry_version(self) -> tuple[str, str]:
        """(registered model, version) of a ``models:/`` start."""
        if self.kind != "registry":
            raise ValueError(f"model.pretrained {self.text!r} is not a {REGISTRY_PREFIX}<name>/<version> URI")
        name, _, version = self.text.removeprefix(REGISTRY_PREFIX).rpartition("/")
        return name, version


def parse_pretrained(text: str | None) -> PretrainedStart:
    if not text:
        return PretrainedStart("none", None)
    if text.startswith(REGISTRY_PREFIX):
        return PretrainedStart("registry", text)
    if text.startswith(LOCAL_DIR_PREFIX):
        return PretrainedStart("local_dir", text)
    looks_like_path = (
        os.sep in text
        or "/" in text
        or text.startswith(("~", "."))
        or Path(text).suffix.lower() in CHECKPOINT_SUFFIXES
        or Path(text).is_file()
    )
    return PretrainedStart("file" if looks_like_path else "tag", text)


def local_dir(path: Path) -> str:
    """How a config names a folder start."""
    return f"{LOCAL_DIR_PREFIX}{path}"
