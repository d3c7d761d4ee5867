"""Suite-wide set-up: every test (and every subprocess it starts) uses a private cache folder, so the
suite never reads or writes the user's ~/.cache/manifold-lab (default checkpoints, feature caches)."""

from __future__ import annotations

import os
import tempfile

os.environ["MANIFOLD_LAB_CACHE"] = tempfile.mkdtemp(prefix="manifold-lab-test-cache-")
os.environ.setdefault("MPLBACKEND", "Agg")
