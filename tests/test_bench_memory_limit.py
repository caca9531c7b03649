"""bench/memory_limit.py: a benchmark run limited to less host memory, through a cgroup v2 group. The
kernel's part (charging, reclaim) is not here: these tests use a folder laid out like the cgroup file
system and check what is written where, and that the command really starts inside the group."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from bench import host_memory, memory_limit, profiles


def cgroup_root(tmp_path, controllers: str = "cpuset cpu io memory pids"):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("cpu\n")
    return root


def test_a_limited_command_starts_inside_its_own_group_whose_memory_max_is_the_limit(tmp_path):
    root = cgroup_root(tmp_path)
    with memory_limit.MemoryLimit(1.5, root=root, remove=shutil.rmtree) as limit:
        assert (root / "cgroup.subtree_control").read_text() == "+memory"
        assert (limit.path / "memory.max").read_text() == str(int(1.5 * 2 ** 30))
        done = subprocess.run(limit.wrap(["sh", "-c", 'echo "$$"']), capture_output=True, text=True, check=True)
        # exec keeps the process: the pid written into the group is the command's own
        assert (limit.path / "cgroup.procs").read_text().strip() == done.stdout.strip()
        path = limit.path
    assert not path.exists()  # the group is removed with the run


def test_the_group_gets_no_swap_where_the_kernel_offers_swap_accounting(tmp_path, monkeypatch):
    root = cgroup_root(tmp_path)
    original_mkdir = memory_limit.Path.mkdir

    def mkdir_with_swap_file(self, *args, **kwargs):  # the kernel creates memory.swap.max with the group
        original_mkdir(self, *args, **kwargs)
        (self / "memory.swap.max").write_text("max\n")

    monkeypatch.setattr(memory_limit.Path, "mkdir", mkdir_with_swap_file)
    with memory_limit.MemoryLimit(2, root=root, remove=shutil.rmtree) as limit:
        assert (limit.path / "memory.swap.max").read_text() == "0"


def test_the_report_gives_the_groups_peak_and_how_often_it_hit_the_limit_or_killed(tmp_path):
    root = cgroup_root(tmp_path)
    with memory_limit.MemoryLimit(23, root=root, remove=shutil.rmtree) as limit:
        (limit.path / "memory.peak").write_text(str(23 * 2 ** 30 - 2 ** 20) + "\n")
        (limit.path / "memory.events").write_text("low 0\nhigh 0\nmax 129310\noom 0\noom_kill 0\n")
        report = limit.report()
    assert report == {"host_memory_limit_gib": 23, "host_memory_limit_peak_gib": 23.0,
                      "host_memory_limit_events": {"low": 0, "high": 0, "max": 129310, "oom": 0, "oom_kill": 0}}


@pytest.mark.parametrize("controllers, message", [
    (None, "no cgroup v2 hierarchy"), ("cpu io pids", "memory controller is not available")])
def test_a_host_without_the_memory_controller_is_refused_with_the_reason(tmp_path, controllers, message):
    root = cgroup_root(tmp_path, controllers or "")
    if controllers is None:
        (root / "cgroup.controllers").unlink()
    with pytest.raises(memory_limit.MemoryLimitError, match=message):
        with memory_limit.MemoryLimit(8, root=root, remove=shutil.rmtree):
            pass


def test_a_limited_matrix_stops_before_any_run_when_the_page_cache_cannot_be_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(host_memory, "drop_page_cache", lambda: (False, "Permission denied"))
    jsonl = tmp_path / "runs.jsonl"
    with pytest.raises(memory_limit.MemoryLimitError, match="page cache dropped first.*Permission denied"):
        profiles.run_matrix(str(tmp_path), ["resident@7"], str(jsonl), timeout_s=5, deadline_s=60, n=1,
                            host_memory_limit_gib=23)
    assert not jsonl.exists()  # nothing measured without the limit it was asked for
