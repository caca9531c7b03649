"""`zfarm demo` end to end: its own Redis, a real worker process, the tiny model, a contact sheet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    # One folder for both runs: the second reuses the tiny model the first built.
    return tmp_path_factory.mktemp("demo") / "zfarm-demo"


def processes_mentioning(text: str) -> list[int]:
    """Our processes whose command line or environment mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("redis_kind", ["redis-server", "fakeredis"])
def test_the_demo_renders_collects_and_stops_everything_it_started(demo_dir, redis_kind):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZFARM_")}
    env["PYTHONPATH"] = str(REPO)
    if redis_kind == "fakeredis":
        env["PATH"] = str(Path(sys.executable).parent)  # no redis-server to be found
    done = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--dir", str(demo_dir)], env=env,
                          cwd=demo_dir.parent, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    log = demo_dir / "worker.log"
    assert done.returncode == 0, done.stderr + (log.read_text()[-3000:] if log.exists() else "")
    expected = "fakeredis" if redis_kind == "fakeredis" else "redis-server on a free port"
    assert expected in done.stderr
    assert "NOISE" in done.stderr
    sheet = Path(done.stdout.strip().splitlines()[-1])
    assert sheet == demo_dir / "out" / "index.html" and sheet.exists()
    rows = [json.loads(line) for line in (demo_dir / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done"] * 4
    assert all((demo_dir / "out" / r["png"]).read_bytes().startswith(b"\x89PNG") for r in rows)
    assert processes_mentioning(str(demo_dir)) == []
