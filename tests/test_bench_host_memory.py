"""The benchmark's host-memory split (bench/host_memory.py): anonymous pages, file-backed pages of mapped
files (how loaded checkpoints are held), and the host's used memory, each as a peak."""
from __future__ import annotations

import mmap

from bench import profiles
from bench.host_memory import HostMemoryPeaks

MIB = 2**20


def test_memory_the_process_writes_raises_its_anonymous_peak_and_the_hosts_used_memory():
    peaks = HostMemoryPeaks()
    before = peaks.record()
    block = bytearray(b"\x01") * (384 * MIB)  # every page written, so every page resident
    peaks.sample()
    after = peaks.record()
    assert after["host_anon_peak_gib"] - before["host_anon_peak_gib"] >= 0.3
    assert after["host_used_rise_gib"] >= 0.2
    assert len(block) == 384 * MIB


def test_a_mapped_file_that_is_read_counts_as_file_pages_and_not_as_anonymous_ones(tmp_path):
    path = tmp_path / "weights.bin"
    with open(path, "wb") as handle:
        for _ in range(256):
            handle.write(b"\x02" * MIB)
    peaks = HostMemoryPeaks()
    before = peaks.record()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        touched = sum(mapped[offset] for offset in range(0, len(mapped), mmap.PAGESIZE))
        peaks.sample()
    after = peaks.record()
    assert touched == 2 * (256 * MIB // mmap.PAGESIZE)
    assert after["host_file_peak_gib"] - before["host_file_peak_gib"] >= 0.2
    assert after["host_anon_peak_gib"] - before["host_anon_peak_gib"] < 0.1


def test_a_benchmark_run_records_its_anonymous_and_file_peaks_beside_the_peak_rss(tiny_dir):
    record = profiles.measure(str(tiny_dir), "cpu", None, {}, n=1, size=64, steps=1, probe_sides=(), device="cpu")
    assert record["ok"], record["error"]
    assert 0 < record["host_anon_peak_gib"] <= record["host_rss_gib"] + 0.01
    assert record["host_file_peak_gib"] > 0
    assert set(record["host_memory_after_load"]) == {"host_anon_peak_gib", "host_file_peak_gib",
                                                     "host_shmem_peak_gib", "host_used_rise_gib"}
    assert f"anon={record['host_anon_peak_gib']}" in profiles._summary(record)


def test_a_failed_benchmark_run_keeps_the_tail_of_its_traceback_beside_the_one_line_error(tiny_dir):
    record = profiles.measure(str(tiny_dir), "cpu", None, {"gate_warps": 3}, n=1, size=64, steps=1, probe_sides=(),
                              device="cpu")
    assert record["ok"] is False and record["error"].startswith("ValueError during load: gate_warps")
    assert "Traceback (most recent call last)" in record["traceback_tail"]
    assert "gate_warps" in record["traceback_tail"].splitlines()[-1]


def mapped_files() -> list[tuple[int, int, str]]:
    regions = []
    with open("/proc/self/maps") as handle:
        for line in handle:
            fields = line.split()
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            regions.append((start, end, fields[5] if len(fields) > 5 else ""))
    return regions


def test_a_loaded_pipelines_weights_are_views_into_its_mapped_checkpoint_files(tiny_dir):
    """Why peak RSS overstates what a converting profile needs: the bf16 weights it replaces are file
    pages of the checkpoint, which the kernel can drop, not memory the process allocated."""
    import torch

    from worker.engine import pipeline

    pipe = pipeline.load_pipeline(str(tiny_dir), torch.float32, device="cpu")
    regions = mapped_files()
    for component in ("transformer", "text_encoder", "vae"):
        for name, param in getattr(pipe, component).named_parameters():
            owners = [path for start, end, path in regions if start <= param.data_ptr() < end]
            assert owners and owners[0].endswith(".safetensors"), f"{component}.{name} lives in {owners}"
