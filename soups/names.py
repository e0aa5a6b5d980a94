"""A candidate's two names. Its label is for people: the leaderboard, report.md and log lines
(``wise_ft_0.60``). Its stored name is derived from the label once, by `stored_name`, and is what every place
that stores it gets: MLflow logged models, run names, registered-model tags and aliases, Prefect task-run
names, files and folders. No sink cleans a name up on its own.

The strictest of those rules: MLflow logged-model names refuse ``/ : . % " '``, registry aliases allow only
``[A-Za-z0-9_-]`` and reserve ``latest`` and ``v<digits>``, Prefect names refuse ``/ % & > <``, and file names
stop at 255 bytes. A stored name keeps to letters, digits, ``_`` and ``-``, at most 64 characters.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 64
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_OTHER = re.compile(r"[^A-Za-z0-9_-]+")
_RESERVED = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def stored_name(label: str) -> str:
    """``label`` as a name every store accepts: a decimal point between digits becomes ``p`` (``wise_ft_0.60``
    -> ``wise_ft_0p60``); when anything else had to change (other characters, length, a reserved alias), a
    short hash of the label is added, so two labels that differ only there still get two names."""
    name = _DECIMAL_POINT.sub("p", label)
    cleaned = _OTHER.sub("-", name).strip("-")
    if cleaned == name and cleaned and len(cleaned) <= MAX_LENGTH and not _RESERVED.match(cleaned):
        return cleaned
    digest = hashlib.sha256(label.encode()).hexdigest()[:8]
    return f"{cleaned[: MAX_LENGTH - len(digest) - 1].rstrip('-')}-{digest}".lstrip("-") or digest


def unique_stored_names(labels: list[str]) -> dict[str, str]:
    """label -> stored name for one kitchen's candidates; two labels with one stored name (a hand-written
    label ``wise_ft_0p60`` beside WiSE-FT's ``wise_ft_0.60``) are an error naming both."""
    names: dict[str, str] = {}
    owners: dict[str, str] = {}  # stored name -> the label that has it
    for label in labels:
        name = stored_name(label)
        owner = owners.setdefault(name, label)
        if owner != label:
            raise ValueError(
                f"candidates {owner!r} and {label!r} would both be stored as {name!r}; give one of them another label"
            )
        names[label] = name
    return names
