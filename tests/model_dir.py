"""The embedded engine's converted SmolLM2 folder, for tests that start other processes.

Resolved (and converted once, on first use) in a child interpreter so a test process that
only drives servers never imports torch itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONVERT_TIMEOUT_S = 600.0


def default_model_dir() -> Path:
    done = subprocess.run(
        [sys.executable, "-c", "from kvfactory.config import load_settings; "
         "from kvfactory.engines.hf import resolve_model_dir; "
         "print(resolve_model_dir(load_settings()))"],
        capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1])
