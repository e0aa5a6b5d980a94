"""Keep every test's files inside pytest's temporary folders, never in the user's home."""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="soups-tests-home-")
os.environ.__setitem__("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.__setitem__("MPLCONFIGDIR", os.path.join(_HOME, "matplotlib"))
os.environ.__setitem__("HF_HUB_OFFLINE", "1")
