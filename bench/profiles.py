"""Benchmark of the memory/offload profiles on a GPU (a measuring tool, not a test).

It builds the full-size random-weight Z-Image pipeline once (`worker.engine.tiny.build_full`, same compute and
memory as the real model, images are noise), then measures one profile per fresh process, under an
allocator cap (`torch.cuda.set_per_process_memory_fraction`) that plays a smaller card, with the
worker's own loading and profile code (`worker.engine.pipeline`, `worker.engine.placement`):

  load_s, first_s (first call, compilation included), s_per_image (median of >= 5 warm 1024x1024
  8-step images), peak allocated/reserved VRAM over load + all 1024x1024 calls, peak host RSS and its
  split into anonymous and file-backed pages (bench/host_memory.py), and
  max_pixels: the largest square side (1280..2048) that renders in 1 step with peak reserved VRAM at
  least HEADROOM_GIB under the cap (compiled blocks run eagerly for these probes, so that each size
  does not recompile; eager needs at least the memory of the compiled code).
A run that fails records `error` (one line: the stage and the message) and `traceback_tail` (the last
4000 characters of the traceback, chained causes included).

With --fidelity-dir each run also keeps two seeds' decoded images, and the matrix ends by comparing
every run with the bf16 resident eager run (`resident@none`) on the same seeds: relative L2, PSNR,
largest 8-bit difference, and whether the change counts as visible (worst seed under 40 dB).
`+batch=N` in a plan item renders N images per pipeline call (exploration, never in the table).
With --host-memory-limit-gib each run is limited to that much host memory (bench/memory_limit.py):
finishing there proves the profile fits a host with HOST_RESERVE_GIB more.

  python -m bench.profiles build DIR
  python -m bench.profiles run DIR PROFILE [--cap-gib N] [--set key=value ...] --jsonl FILE
  python -m bench.profiles matrix DIR "PROFILE@CAP[+key=value...]" ... --jsonl FILE [--deadline-s S]
                                   [--fidelity-dir D] [--host-memory-limit-gib G]
  python -m bench.profiles fidelity D [--jsonl FILE]     # compare kept images again
  python -m bench.profiles smoke            # every profile on the tiny pipeline (catches errors cheaply)
  python -m bench.profiles worker-check DIR --vram-class N --table T --jsonl FILE
  python -m bench.profiles table FILE.jsonl ... [--out bench/results/profile_table.json]

`bench/run_gpu.sh` wraps these for the device machine. Runs with `--set` overrides are exploration:
they stay in the raw JSONL but never enter the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.host_memory import HostMemoryPeaks  # noqa: E402
from shared import profiles as table_rules  # noqa: E402  (no torch: safe at import)

RESULTS = ROOT / "bench" / "results"
TABLE_PATH = RESULTS / "profile_table.json"
PACKAGED_LINK = ROOT / "shared" / "profile_table.json"
SIZE_PX = 1024
STEPS = 8
PROBE_SIDES_PX = (1280, 1536, 1792, 2048)
PROBE_STEPS = 1
WARM_IMAGES = 5
# ~100 caption tokens with the chat template, about what a real prompt gives (the pipeline drops padding).
PROMPT = ("a cinematic photo of an old man with a red lantern on a stone bridge in a chinese traditional "
          "garden at night , rain and fog , neon light on the river , soft shadow , high definition 8k "
          "detailed , lens bokeh , studio light , the moon and a star in the sky , a temple on the mountain "
          "with snow , a green tree and a red flower in the garden , watercolor and ink style , gold and "
          "silver glass , a girl and a boy with a cat and a dog on the street of the city at sunset")
CUDA_ALLOC_CONF = "expandable_segments:True"
# Output fidelity: every run with --fidelity-dir keeps these seeds' decoded images; each is compared with
# the bf16 resident eager run's. Under VISIBLE_PSNR_DB (worst seed) a variant counts as changing images
# visibly: 40 dB is an RMS difference of 1% of full scale, 2.6 levels of 8 bits.
FIDELITY_SEEDS = (101, 102)
REFERENCE_LABEL = "resident@none"
VISIBLE_PSNR_DB = 40.0


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def _host_peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss is KiB on Linux


def _pinned_peak_gib(torch) -> float | None:
    """Peak bytes torch's pinned host allocator held (blocks as rounded), where this torch reports it."""
    stats = getattr(torch.cuda.memory, "host_memory_stats", lambda: {})()
    peak = stats.get("allocated_bytes.peak")
    return None if peak is None else _gib(peak)


def _driver() -> str:
    try:
        import pynvml
    except ImportError:
        return ""
    pynvml.nvmlInit()
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    finally:
        pynvml.nvmlShutdown()


def _environment() -> dict:
    import diffusers
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "driver": _driver() if cuda else "",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


def _split_run_settings(items: list[str]) -> tuple[dict, int]:
    """(profile field overrides, images per call) from key=value items: batch is a run setting."""
    overrides = _parse_overrides(items)
    return overrides, int(overrides.pop("batch", 1))


def _parse_overrides(items: list[str]) -> dict:
    """key=value pairs for worker.engine.specs.Spec fields (ints and booleans parsed)."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if value.isdigit():
            out[key] = int(value)
        elif value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            out[key] = value
    return out


class StageClock:
    """Times the text encoder and the VAE decode of each call (device-synchronised at their edges);
    the rest of a call is the DiT loop. Wraps the pipeline instance's methods, not the classes."""

    def __init__(self, pipe, sync):
        self.sync = sync
        self.text_s = self.vae_s = 0.0
        self._wrap(pipe, "encode_prompt", "text_s")
        self._wrap(pipe.vae, "decode", "vae_s")

    def _wrap(self, owner, method: str, slot: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            setattr(self, slot, getattr(self, slot) + time.perf_counter() - t0)
            return out

        setattr(owner, method, timed)

    def reset(self) -> None:
        self.text_s = self.vae_s = 0.0


def measure(model_dir: str, profile: str, cap_gib: float | None, overrides: dict, n: int, size: int, steps: int,
            probe_sides: tuple, device: str = "cuda", fidelity_dir: str = "", batch: int = 1) -> dict:
    """Measure one profile in this process. Returns the run record (ok False with the error on failure).
    With `batch` > 1 each call renders that many images of one prompt; s_per_image is per image."""
    if device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    import torch

    from worker.engine import fp8, pipeline, placement, specs
    from worker.engine.diffusion import is_out_of_memory

    record = {"profile": profile, "cap_gib": cap_gib, "ok": False, "error": None, "s_per_image": None,
              "first_s": None, "load_s": None, "peak_alloc_gib": None, "peak_reserved_gib": None,
              "host_rss_gib": None, "max_pixels": None, "size": size, "steps": steps, "n": n,
              "overrides": overrides or {}, "batch": batch, **_environment()}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    stage = "load"
    memory = HostMemoryPeaks().start()
    try:
        t0 = time.perf_counter()
        applied = profile if cuda else specs.CPU_PROFILE
        dtype = torch.float32 if applied == specs.CPU_PROFILE else pipeline.default_dtype(device)
        pipe = pipeline.load_pipeline(model_dir, dtype, gpu_components=specs.gpu_components(applied, overrides)
                                      if cuda else (), device=device)
        spec = placement.apply_profile(pipe, applied, device, overrides)
        pipe.set_progress_bar_config(disable=True)
        sync()
        record["load_s"] = round(time.perf_counter() - t0, 2)
        record["host_rss_after_load_gib"] = _host_peak_rss_gib()
        record["host_memory_after_load"] = memory.record()
        record["spec"] = {k: v for k, v in vars(spec).items() if k != "description"}
        record["fp8_matmul"] = fp8.has_fp8_matmul(device)
        clock = StageClock(pipe, sync)

        def call(seed: int, side: int, n_steps: int) -> float:
            sync()
            t = time.perf_counter()
            pipe(prompt=PROMPT, height=side, width=side, num_inference_steps=n_steps, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                 num_images_per_prompt=batch)
            sync()
            return (time.perf_counter() - t) / batch

        stage = "first call"
        record["first_s"] = round(call(0, size, steps), 2)
        stage = "warm calls"
        times, text_s, vae_s = [], [], []
        for i in range(n):
            clock.reset()
            times.append(call(i + 1, size, steps))
            text_s.append(clock.text_s)
            vae_s.append(clock.vae_s)
        record["s_per_call"] = [round(t, 3) for t in times]
        record["s_per_image"] = round(statistics.median(times), 3)
        median_text, median_vae = statistics.median(text_s), statistics.median(vae_s)
        record["stages_s"] = {"text_encoder": round(median_text, 3), "vae_decode": round(median_vae, 3),
                              "dit_loop": round(record["s_per_image"] - median_text - median_vae, 3)}
        if cuda:
            record["peak_alloc_gib"] = _gib(torch.cuda.max_memory_allocated())
            record["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        record["host_rss_gib"] = _host_peak_rss_gib()
        record["ok"] = True
        record["max_pixels"] = size * size
        if fidelity_dir and batch == 1:
            stage = "fidelity images"
            save_fidelity_images(pipe, fidelity_dir, run_label(profile, cap_gib, overrides, batch), size, steps)
        if cuda:
            stage = "kernel trace"
            record["trace"] = kernel_trace(lambda: call(FIDELITY_SEEDS[0], size, steps))
            if os.environ.get("ZFARM_BENCH_TRACE_DIR"):
                record["trace"]["timeline"] = timeline_trace(
                    lambda: call(FIDELITY_SEEDS[0], size, 2), os.environ["ZFARM_BENCH_TRACE_DIR"],
                    run_label(profile, cap_gib, overrides, batch))
        stage = "max_pixels probes"
        record["probes"] = probe_max_pixels(pipe, call, cap_gib, probe_sides, spec.compile and cuda, record)
    except (RuntimeError, MemoryError, ValueError) as exc:
        oom = is_out_of_memory(exc)
        message = " ".join(str(exc).split())[:500]
        if stage == "kernel trace":
            record["trace_error"] = f"{type(exc).__name__}: {message}"
        elif stage == "max_pixels probes":
            record["probe_error"] = f"{type(exc).__name__}: {message}"
        else:
            record["ok"] = False
            record["error"] = f"{'out of memory' if oom else type(exc).__name__} during {stage}: {message}"
            # The one-line error hides where it came from (an inductor failure names neither the kernel
            # nor the pass); the traceback's tail, chained causes included, says more.
            record["traceback_tail"] = traceback.format_exc()[-4000:]
    if cuda:
        record["peak_reserved_any_gib"] = _gib(torch.cuda.max_memory_reserved())
        record["pinned_peak_gib"] = _pinned_peak_gib(torch)
    record["host_rss_gib"] = _host_peak_rss_gib() if record["host_rss_gib"] is None else record["host_rss_gib"]
    record["host_rss_end_gib"] = _host_peak_rss_gib()
    memory.stop()
    record.update(memory.record())
    return record


def run_label(profile: str, cap_gib, overrides: dict | None, batch: int = 1) -> str:
    """A file-name-safe name of one run: PROFILE@CAP[+key=value...]."""
    label = f"{profile}@{'none' if cap_gib is None else f'{cap_gib:g}'}"
    for key, value in sorted((overrides or {}).items()):
        label += f"+{key}={value}"
    return label + (f"+batch={batch}" if batch > 1 else "")


def save_fidelity_images(pipe, folder: str, label: str, size: int, steps: int) -> None:
    """Render FIDELITY_SEEDS and keep the decoded images (float, 0..1) for `fidelity()`."""
    import numpy as np
    import torch

    out = Path(folder) / label
    out.mkdir(parents=True, exist_ok=True)
    for seed in FIDELITY_SEEDS:
        image = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        np.save(out / f"seed{seed}.npy", np.asarray(image, dtype=np.float32))


def compare_images(image, reference) -> dict:
    """Relative L2 difference, PSNR (dB, images in 0..1) and the largest difference in 8-bit levels."""
    import numpy as np

    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    mse = float(np.mean((image - reference) ** 2))
    return {"rel_l2": float(np.linalg.norm(image - reference) / max(np.linalg.norm(reference), 1e-12)),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)),
            "max_abs_8bit": int(round(float(np.max(np.abs(image - reference))) * 255))}


def fidelity(folder: str, reference: str = REFERENCE_LABEL, runs: list[str] | None = None) -> list[dict]:
    """Each run's saved images (every run in `folder`, or the labels in `runs`) against the reference
    run's (bf16, resident, eager), same seeds. A run counts as visibly different when its worst seed
    is under VISIBLE_PSNR_DB."""
    import numpy as np

    root = Path(folder)
    ref_dir = root / reference
    if not ref_dir.is_dir():
        raise SystemExit(f"no reference images in {ref_dir}: run {reference} with --fidelity-dir first")
    records = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != reference
                          and (runs is None or p.name in runs)):
        seeds = []
        for ref_file in sorted(ref_dir.glob("seed*.npy")):
            other = run_dir / ref_file.name
            if other.exists():
                seeds.append({"seed": int(ref_file.stem[4:]), **compare_images(np.load(other), np.load(ref_file))})
        if not seeds:
            continue
        worst = min(seeds, key=lambda s: s["psnr_db"])
        records.append({"check": "fidelity", "run": run_dir.name, "reference": reference, "seeds": seeds,
                        "rel_l2_mean": round(statistics.mean(s["rel_l2"] for s in seeds), 5),
                        "psnr_db_min": round(worst["psnr_db"], 2), "max_abs_8bit": max(s["max_abs_8bit"] for s in seeds),
                        "visibly_different": worst["psnr_db"] < VISIBLE_PSNR_DB,
                        "date": time.strftime("%Y-%m-%d", time.gmtime())})
    return records


def kernel_trace(call, top: int = 15) -> dict:
    """One more warm call under torch.profiler (after the timed ones, so it changes no figure): the
    call's wall time, the GPU time of its kernels and of its copies summed, and the kernels that took
    most GPU time. Busy well under wall means the GPU waited (launches, syncs, copies)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall_s = call()
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    copies = [e for e in events if "memcpy" in e.key.lower() or "memset" in e.key.lower()]
    kernels = [e for e in events if e not in copies]
    ranked = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"wall_s": round(wall_s, 3),
            "kernels_s": round(sum(e.self_device_time_total for e in kernels) / 1e6, 3),
            "copies_s": round(sum(e.self_device_time_total for e in copies) / 1e6, 3),
            "kernel_launches": sum(e.count for e in kernels),
            "top": [{"kernel": e.key[:100], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 1)}
                    for e in ranked]}


def timeline_trace(call, folder: str, label: str) -> str:
    """A 2-step call's CPU and GPU timeline as a Chrome trace (gzipped JSON; chrome://tracing or
    Perfetto), to see where the GPU waits between kernels. Returns the file's path."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{label.replace('@', '_at_')}.trace.json.gz"  # '@' does not travel everywhere
    prof.export_chrome_trace(str(path))
    return str(path)


def probe_max_pixels(pipe, call, cap_gib, sides, compiled: bool, record: dict) -> list[dict]:
    """Try larger squares in ascending order (1 step each); stop at the first that fails or leaves less
    than the chooser's headroom under the cap. Updates record["max_pixels"]."""
    import contextlib

    import torch

    from worker.engine.diffusion import is_out_of_memory

    cuda = torch.cuda.is_available() and record["device"] != "cpu"
    stance = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    probes = []
    with stance:
        for side in sides:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            entry = {"side": side}
            try:
                entry["s"] = round(call(0, side, PROBE_STEPS), 2)
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                entry["ok"] = False
                entry["error"] = "out of memory"
                probes.append(entry)
                break
            if cuda:
                entry["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
                entry["peak_alloc_gib"] = _gib(torch.cuda.max_memory_allocated())
            fits = cap_gib is None or entry.get("peak_reserved_gib", 0) <= cap_gib - table_rules.HEADROOM_GIB
            entry["ok"] = fits
            probes.append(entry)
            if not fits:
                break
            record["max_pixels"] = side * side
    return probes


def _append(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def emit(record: dict, jsonl: str = "") -> None:
    """Print a measuring tool's record as one JSON line, and append it to `jsonl` when given."""
    print(json.dumps(record), flush=True)
    if jsonl:
        _append(jsonl, record)


def _summary(record: dict) -> str:
    if not record.get("ok"):
        return f"{record['profile']:28s} cap={record.get('cap_gib')}  FAILED: {str(record.get('error'))[:160]}"
    stages = record.get("stages_s", {})
    return (f"{record['profile']:28s} cap={record.get('cap_gib')!s:5s} s/img={record['s_per_image']:.3f} "
            f"first={record['first_s']:.1f} load={record['load_s']:.1f} alloc={record['peak_alloc_gib']} "
            f"reserved={record['peak_reserved_gib']} rss={record['host_rss_gib']} "
            f"anon={record.get('host_anon_peak_gib')} host_used=+{record.get('host_used_rise_gib')} "
            f"pinned={record.get('pinned_peak_gib')} "
            f"max_side={int((record.get('max_pixels') or 0) ** 0.5)} te={stages.get('text_encoder')} "
            f"vae={stages.get('vae_decode')} {record.get('overrides') or ''}"
            + (f" batch={record['batch']}" if record.get("batch", 1) > 1 else "") + _trace_summary(record))


def _trace_summary(record: dict) -> str:
    trace = record.get("trace")
    if not trace:
        return f"\n    trace failed: {record['trace_error'][:200]}" if record.get("trace_error") else ""
    top = "; ".join(f"{k['kernel'][:60]} x{k['calls']} {k['ms']} ms" for k in trace["top"][:6])
    return (f"\n    traced call {trace['wall_s']} s: kernels {trace['kernels_s']} s, copies {trace['copies_s']} s, "
            f"{trace['kernel_launches']} launches; top: {top}")


def parse_plan_item(item: str) -> tuple[str, float | None, list[str]]:
    """PROFILE@CAP[+key=value...]; CAP is GiB or 'none'."""
    head, *sets = item.split("+")
    profile, _, cap = head.partition("@")
    cap_gib = None if cap in ("", "none", "null") else float(cap)
    return profile, cap_gib, sets


def run_matrix(model_dir: str, plan: list[str], jsonl: str, timeout_s: int, deadline_s: float, n: int,
               fidelity_dir: str = "", host_memory_limit_gib: float | None = None) -> None:
    """Each plan item in a fresh process; with `host_memory_limit_gib`, each under that host-memory
    limit (bench/memory_limit.py), the page cache dropped before it."""
    started = time.monotonic()
    labels = []   # this matrix's runs: the fidelity folder may hold images of earlier ones
    for item in plan:
        profile, cap_gib, sets = parse_plan_item(item)
        labels.append(run_label(profile, cap_gib, *_split_run_settings(sets)))
        if time.monotonic() - started > deadline_s:
            print(f"{item}: skipped (deadline {deadline_s:.0f} s reached)", flush=True)
            continue
        with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
            cmd = [sys.executable, "-m", "bench.profiles", "run", model_dir, profile, "--n", str(n),
                   "--result", result.name] + (["--cap-gib", str(cap_gib)] if cap_gib else [])
            cmd += ["--fidelity-dir", fidelity_dir] if fidelity_dir else []
            for s in sets:
                cmd += ["--set", s]
            t0 = time.monotonic()
            with contextlib.ExitStack() as stack:
                limit = None
                if host_memory_limit_gib:
                    limit = stack.enter_context(_limited_host_memory(host_memory_limit_gib))
                    cmd = limit.wrap(cmd)
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
                    text = Path(result.name).read_text()
                    record = json.loads(text) if text.strip() else None
                    tail = (proc.stderr or "")[-1500:]
                    if record is None:
                        record = {"profile": profile, "cap_gib": cap_gib, "ok": False,
                                  "overrides": _parse_overrides(sets),
                                  "error": f"process exited {proc.returncode} without a result: {tail[-600:]}"}
                except subprocess.TimeoutExpired:
                    record = {"profile": profile, "cap_gib": cap_gib, "ok": False, "overrides": _parse_overrides(sets),
                              "error": f"timed out after {timeout_s} s"}
                if limit is not None:
                    record.update(limit.report(), page_cache_dropped=True)
            record["wall_s"] = round(time.monotonic() - t0, 1)
        _append(jsonl, record)
        print(_summary(record), flush=True)
    if fidelity_dir and (Path(fidelity_dir) / REFERENCE_LABEL).is_dir():
        for record in fidelity(fidelity_dir, runs=labels):
            _append(jsonl, record)
            print(_fidelity_summary(record), flush=True)


@contextlib.contextmanager
def _limited_host_memory(limit_gib: float):
    """A MemoryLimit for one run, after dropping the page cache (else cached weights go uncharged)."""
    from bench.host_memory import drop_page_cache
    from bench.memory_limit import MemoryLimit, MemoryLimitError

    dropped, why = drop_page_cache()
    if not dropped:
        raise MemoryLimitError(f"a host-memory limit needs the page cache dropped first (root): {why or 'failed'}")
    with MemoryLimit(limit_gib) as limit:
        yield limit


def _fidelity_summary(record: dict) -> str:
    return (f"fidelity {record['run']:40s} vs {record['reference']}: psnr_min={record['psnr_db_min']} dB "
            f"rel_l2={record['rel_l2_mean']} max_abs_8bit={record['max_abs_8bit']} "
            f"{'VISIBLY DIFFERENT' if record['visibly_different'] else 'not visibly different'}")


def smoke(device: str) -> int:
    """Every profile applied to the tiny pipeline and rendered at 256x256, 2 steps, in this process."""
    import torch

    from worker.engine import pipeline, placement, specs, tiny

    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        tiny.build_tiny(folder)
        for name in specs.PROFILES:
            if device != "cuda" and name != specs.CPU_PROFILE:
                continue
            t0 = time.perf_counter()
            try:
                dtype = torch.float32 if name == specs.CPU_PROFILE else pipeline.default_dtype(device)
                pipe = pipeline.load_pipeline(folder, dtype, gpu_components=specs.gpu_components(name), device=device)
                spec = placement.apply_profile(pipe, name, device)
                pipe.set_progress_bar_config(disable=True)
                image = pipe(prompt="a cat", height=256, width=256, num_inference_steps=2, guidance_scale=0.0,
                             generator=torch.Generator("cpu").manual_seed(0)).images[0]
                status = f"ok {image.size} compile={spec.compile or '-'}"
            except Exception as exc:  # a smoke test reports every failure and goes on to the next profile
                failures += 1
                status = f"FAILED {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            print(f"smoke {name:28s} {time.perf_counter() - t0:5.1f}s {status}", flush=True)
            pipe = None
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
    return 1 if failures else 0


def worker_check(model_dir: str, vram_class: int, table_path: str, jsonl: str, ram_gib: float) -> dict:
    """The worker's own renderer (worker.engine.diffusion) on the chosen profile under the class's cap:
    two 1024x1024 8-step jobs through DiffusionRenderer.render, as a Celery child would run them."""
    import hashlib
    import io

    from PIL import Image

    from shared.schema import JobSpec
    from shared.settings import Settings
    from worker.engine.detect import BootInfo
    from worker.engine.diffusion import DiffusionRenderer

    table = table_rules.load_table(table_path)
    choice = table_rules.choose(table, vram_class, ram_gib)
    cap = None if vram_class == max(table_rules.GPU_CLASSES) else table_rules.CLASS_CAPS_GIB[vram_class]
    boot = BootInfo(host="bench", device="cuda", gpu="bench", vram_gib=float(vram_class), vram_class=vram_class,
                    cap_gib=cap, compute_capability="", host_ram_gib=ram_gib, choice=choice)
    renderer = DiffusionRenderer(Settings.from_env({}, model=model_dir), boot, table=table)
    record = {"check": "worker", "vram_class": vram_class, "profile": choice.profile, "cap_gib": cap}
    t0 = time.perf_counter()
    renderer.load()
    record["load_s"] = round(time.perf_counter() - t0, 1)
    renders = []
    for seed in (1, 2, 2):
        result = renderer.render(JobSpec(prompt=PROMPT, width=SIZE_PX, height=SIZE_PX, steps=STEPS, seed=seed))
        image = Image.open(io.BytesIO(result.png))
        renders.append({"seed": seed, "render_s": round(result.render_s, 2), "size": list(image.size),
                        "peak_vram_gib": result.facts["peak_vram_gib"], "profile": result.facts["profile"],
                        "pixels_sha": hashlib.sha256(image.tobytes()).hexdigest()[:16],
                        "has_parameters": "parameters" in image.text})
    record["renders"] = renders
    record["same_seed_same_pixels"] = renders[1]["pixels_sha"] == renders[2]["pixels_sha"]
    record["downgrades"] = renderer.downgrades
    record["host_rss_gib"] = _host_peak_rss_gib()
    record.update({k: v for k, v in _environment().items() if k in ("device", "torch", "diffusers", "date")})
    _append(jsonl, record)
    print(json.dumps(record), flush=True)
    return record


def build_table(jsonl_paths: list[str], out: Path) -> dict:
    """The chooser's table from raw runs: the latest run of each (profile, cap) whose applied spec is
    the profile's current definition (a run made with --set overrides counts once the definition
    adopts exactly those settings; runs of an older definition drop out). Failed runs stay in.

    Each row says whether the profile is lossy (`worker.engine.specs.is_lossy`) and carries the fidelity
    comparison made for that very run, when the matrix made one (a fidelity record names its run by
    label and follows it in the file)."""
    import dataclasses

    from worker.engine.specs import PROFILES, Spec, is_lossy, spec_for

    # A field added to Spec after a run was recorded had its default then; one removed since (an option
    # measured and dropped) is ignored.
    field_defaults = {f.name: f.default for f in dataclasses.fields(Spec) if f.name != "description"}

    def current(rec: dict) -> bool:
        applied = rec.get("spec")
        if applied is None:  # failed before the profile was applied: keep only plain attempts
            return not rec.get("overrides")
        applied = {k: v for k, v in {**field_defaults, **applied}.items() if k in field_defaults}
        defined = {k: v for k, v in vars(spec_for(rec["profile"])).items() if k != "description"}
        return applied == defined

    by_device: dict = {}  # table key -> {GPU: the latest current run on that GPU}
    latest: dict = {}     # table key -> the latest current run, on whatever GPU
    env: dict = {}
    by_label: dict = {}   # run label -> the table key of the latest current run with that label
    for path in jsonl_paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("check") == "fidelity":
                key = by_label.get(rec["run"])
                if key is not None and key in latest:
                    latest[key]["fidelity"] = {k: rec[k] for k in ("reference", "psnr_db_min", "rel_l2_mean",
                                                                   "max_abs_8bit", "visibly_different")}
                continue
            if rec.get("check") or rec.get("profile") not in PROFILES or rec.get("batch", 1) != 1 or not current(rec):
                continue
            key = (rec["profile"], rec.get("cap_gib"))
            latest[key] = dict(rec, lossy=is_lossy(spec_for(rec["profile"])))
            by_device.setdefault(key, {})[rec.get("device")] = latest[key]
            by_label[run_label(rec["profile"], rec.get("cap_gib"), rec.get("overrides"))] = key
    # The table's machine is the GPU most of its profiles were measured on: a profile run there keeps
    # that run even if a later one ran on another card (a lent machine is not always the same kind);
    # one measured only elsewhere keeps its latest run. Each row names its GPU.
    devices = Counter(device for runs_on in by_device.values() for device, rec in runs_on.items() if rec.get("ok"))
    common = devices.most_common(1)[0][0] if devices else None
    runs = {key: by_device[key].get(common, rec) for key, rec in latest.items()}
    env = next((rec for rec in runs.values() if rec.get("ok") and rec.get("device") == common), env)
    keys = ("profile", "cap_gib", "ok", "error", "s_per_image", "first_s", "load_s", "peak_alloc_gib",
            "peak_reserved_gib", "host_rss_gib", "max_pixels", "size", "steps", "n", "lossy")
    extra = ("device", "fidelity", "fp8_matmul", "stages_s", "s_per_call", "host_rss_after_load_gib",
             "host_anon_peak_gib", "host_file_peak_gib", "host_shmem_peak_gib", "host_used_rise_gib",
             "pinned_peak_gib", "host_memory_limit_gib", "host_memory_limit_peak_gib", "host_memory_limit_events",
             "probes", "spec")
    rows = [{k: rec.get(k) for k in keys + extra if k in keys or rec.get(k) is not None}
            for rec in sorted(runs.values(), key=lambda r: (r["profile"], r.get("cap_gib") or 1e9))]
    table = {"schema": 1,
             "measured": {k: env.get(k) for k in ("device", "driver", "torch", "diffusers", "transformers", "date",
                                                  "alloc_conf")} | {"size": SIZE_PX, "steps": STEPS,
                                                                    "weights": "random (same architecture and "
                                                                               "sizes as Z-Image-Turbo)"},
             "fidelity_rule": {"reference": REFERENCE_LABEL, "seeds": list(FIDELITY_SEEDS),
                               "visible_below_psnr_db": VISIBLE_PSNR_DB},
             "profiles": dict(PROFILES), "runs": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    return table


def _link_packaged_table() -> None:
    target = os.path.relpath(TABLE_PATH, PACKAGED_LINK.parent)
    if PACKAGED_LINK.is_symlink() and os.readlink(PACKAGED_LINK) == target:
        return
    if PACKAGED_LINK.exists() or PACKAGED_LINK.is_symlink():
        PACKAGED_LINK.unlink()
    PACKAGED_LINK.symlink_to(target)


def print_classes(table: dict) -> None:
    for row in table_rules.class_table(table):
        side = int((row.get("max_pixels") or 0) ** 0.5)
        print(f"class {table_rules.class_label(row['vram_class']):4s} {str(row.get('profile')):28s} "
              f"s/img={row.get('s_per_image')} reserved={row.get('peak_reserved_gib')} "
              f"rss={row.get('host_rss_gib')} max_side={side} measured_cap={row.get('measured_cap_gib')}"
              + (f" ({row['error'][:80]})" if row.get("error") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiles", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write the full-size random pipeline to DIR unless it is there")
    p.add_argument("dir")
    p = sub.add_parser("run", help="measure one profile in this process")
    p.add_argument("dir")
    p.add_argument("profile")
    p.add_argument("--cap-gib", type=float)
    p.add_argument("--set", action="append", default=[], help="override a profile field: key=value")
    p.add_argument("--n", type=int, default=WARM_IMAGES)
    p.add_argument("--size", type=int, default=SIZE_PX)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--jsonl")
    p.add_argument("--result", help="write the record here (used by matrix)")
    p.add_argument("--fidelity-dir", default="", help="keep the fidelity seeds' images here")
    p = sub.add_parser("matrix", help="measure each PROFILE@CAP in a fresh process")
    p.add_argument("dir")
    p.add_argument("plan", nargs="+")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--timeout-s", type=int, default=300)
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no run after this many seconds")
    p.add_argument("--n", type=int, default=WARM_IMAGES)
    p.add_argument("--fidelity-dir", default="", help="keep images and compare each run with " + REFERENCE_LABEL)
    p.add_argument("--host-memory-limit-gib", type=float,
                   help="run each item under this host-memory limit (cgroup v2, root): bench/memory_limit.py")
    p = sub.add_parser("fidelity", help="compare the images kept in DIR with the reference run's")
    p.add_argument("dir")
    p.add_argument("--reference", default=REFERENCE_LABEL)
    p.add_argument("--jsonl")
    p = sub.add_parser("smoke", help="every profile on the tiny pipeline, in one process")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("worker-check", help="the worker's renderer on the chosen profile under a class cap")
    p.add_argument("dir")
    p.add_argument("--vram-class", type=int, required=True)
    p.add_argument("--table", default=str(TABLE_PATH))
    p.add_argument("--jsonl", required=True)
    p.add_argument("--ram-gib", type=float, default=32.0)
    p = sub.add_parser("table", help="write the chooser's table from raw JSONL runs")
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--out", default=str(TABLE_PATH))
    p.add_argument("--link", action="store_true", help="also link shared/profile_table.json to it")
    args = parser.parse_args(argv)

    if args.command == "build":
        from worker.engine import tiny

        if (Path(args.dir) / "model_index.json").exists():
            print(json.dumps({"dir": args.dir, "cached": True}))
            return 0
        print(json.dumps(tiny.build_full(args.dir)), flush=True)
        return 0
    if args.command == "run":
        overrides, batch = _split_run_settings(args.set)
        record = measure(args.dir, args.profile, args.cap_gib, overrides, args.n, args.size,
                         args.steps, PROBE_SIDES_PX, args.device, args.fidelity_dir, batch)
        if args.result:
            Path(args.result).write_text(json.dumps(record))
        if args.jsonl:
            _append(args.jsonl, record)
        print(_summary(record), flush=True)
        return 0 if record["ok"] else 1
    if args.command == "matrix":
        run_matrix(args.dir, args.plan, args.jsonl, args.timeout_s, args.deadline_s, args.n, args.fidelity_dir,
                   args.host_memory_limit_gib)
        return 0
    if args.command == "fidelity":
        for record in fidelity(args.dir, args.reference):
            if args.jsonl:
                _append(args.jsonl, record)
            print(_fidelity_summary(record), flush=True)
        return 0
    if args.command == "smoke":
        return smoke(args.device)
    if args.command == "worker-check":
        worker_check(args.dir, args.vram_class, args.table, args.jsonl, args.ram_gib)
        return 0
    if args.command == "table":
        table = build_table(args.jsonl, Path(args.out))
        if args.link:
            _link_packaged_table()
        print_classes(table)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
