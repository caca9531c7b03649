"""Running a Triton kernel on the CPU: a script in a fresh Python under TRITON_INTERPRET=1 (the
interpreter is chosen when triton is imported), whose last printed line is JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, timeout_s: float = 300) -> dict:
    """The JSON the script printed last; fails the test with the script's stderr if it failed."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
