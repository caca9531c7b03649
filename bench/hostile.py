"""The fp8 recipes on a hostile Z-Image (a measuring tool, not a test): does each shipped lossy profile pass
the quality gate where activations are as hostile as the real model's are reported to be, and does the
naive per-tensor recipe fail it?

The full-size random pipeline (`bench/profiles.py build`) is made hostile in each process, before its
profile is applied (`worker.engine.hostile.make_hostile`: MLP inputs reaching 6.6e4 on caption tokens,
all-zero rows at the first caption block's inputs). The reference item (bf16 `resident` on a GPU, the
float32 `cpu` profile on a CPU) renders the probes first; every other item renders them too, each in a
fresh process, and is judged against it with the gate's own metrics and default thresholds
(`worker.engine.quality`, `shared.calibration.judge`). A lossy item that fails steps to its safer
policies (`worker.engine.policy.safer`) while time is left, as a worker would.

Each item is `PROFILE[+key=value...]` (Spec overrides, as in `bench/profiles.py matrix`). Default items:
every lossy profile the shipped table gives a class, then the naive recipe (`NAIVE`).

  python -m bench.hostile DIR [ITEM ...] --jsonl FILE [--probes 2] [--size 1024] [--steps 8]
                          [--images-dir D] [--device cuda|cpu] [--deadline-s S] [--no-step-down]
  python -m bench.hostile run DIR ITEM --images-dir D --result FILE ...      # one item, in this process

Prints one line per item (profile, policy, scaling, PSNR mean/worst, SSIM mean/worst, s/img, verdict) and
appends each record to the JSONL file. `bash bench/run_gpu.sh hostile` wraps it for the device machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profiles import _append, _environment, _parse_overrides  # noqa: E402
from shared import calibration  # noqa: E402
from shared import profiles as table_rules  # noqa: E402

REFERENCE = {"cuda": "resident", "cpu": "cpu"}
# The naive recipe: one fp8 scale per tensor, no floor, on the uncompiled native-fp8 DiT.
NAIVE = {"cuda": "fp8mm_compiled+fp8_scaling=tensor+compile=+vae_compile=false", "cpu": "cpu_fp8_naive"}
CUDA_ALLOC_CONF = "expandable_segments:True"


# The host-memory sizes the chooser is asked about besides "enough": a 16 GiB host picks other profiles
# for small cards (the RTX 3060 class).
HOST_RAM_GIB = (None, 16)


def default_items(device: str, torch_version: str = "2.11.0", triton_version: str = "3.6.0") -> list[str]:
    """Every lossy profile the shipped table picks for some class on some architecture with this torch and
    Triton, under enough and under 16 GiB of host memory (Hopper's largest classes first, then the other
    architectures', newest first), then the naive recipe: under a deadline Hopper's figures come first."""
    if device != "cuda":
        return ["cpu_fp8", NAIVE["cpu"]]
    from shared import archs

    table = table_rules.load_table()
    lossy_names = {r["profile"] for r in table["runs"] if r.get("lossy")}
    chosen = []
    measured_here = "sm_90"   # the lent H100's: its profiles first, then the newest architectures'
    order = sorted(archs.ARCHS, key=lambda name: (name != measured_here,
                                                  [-n for n in archs.ARCHS[name].compute_capability]))
    for arch in order:
        caps = archs.capabilities(arch, torch_version, triton_version)
        for ram_gib in HOST_RAM_GIB:
            rows = table_rules.class_table(table, ram_gib=ram_gib, caps=caps)
            chosen += [row["profile"] for row in reversed(rows) if row.get("profile") in lossy_names]
    return [*dict.fromkeys(chosen), NAIVE["cuda"]]


def split_item(item: str) -> tuple[str, dict]:
    profile, *sets = item.split("+")
    return profile, _parse_overrides(sets)


def label_of(item: str) -> str:
    return item.replace("@", "_").replace("/", "_")


def run_item(model_dir: str, item: str, device: str, probe_set, images_dir: str, measure_inputs: bool) -> dict:
    """Render the probes with one item in this process: load, make hostile, apply, warm up, render, time."""
    if device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    import torch

    from worker.engine import hostile, pipeline, placement, quality, specs

    profile, overrides = split_item(item)
    record = {"check": "hostile-run", "item": item, "profile": profile, "overrides": overrides, "ok": False,
              "probe_set": probe_set.key, **_environment()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stage = "load"
    try:
        t0 = time.perf_counter()
        spec = specs.spec_for(profile, overrides)
        dtype = torch.float32 if spec.recipe == "cpu" else pipeline.default_dtype(device)
        gpu_parts = specs.gpu_components(profile, overrides) if device == "cuda" else ()
        pipe = pipeline.load_pipeline(model_dir, dtype, device=device, gpu_components=gpu_parts)
        record["hostile"] = hostile.make_hostile(pipe.transformer)
        placement.apply_profile(pipe, profile, device, overrides)
        pipe.set_progress_bar_config(disable=True)
        sync()
        record["load_s"] = round(time.perf_counter() - t0, 2)
        record.update(policy=specs.policy_of(profile) if "quant_policy" not in overrides else overrides["quant_policy"],
                      scaling=spec.fp8_scaling, lossy=specs.is_lossy(spec))
        stage = "warm-up"
        side = probe_set.size_px
        t1 = time.perf_counter()
        pipe(prompt="a photo of a cat", height=side, width=side, num_inference_steps=1, guidance_scale=0.0,
             generator=torch.Generator("cpu").manual_seed(0))
        sync()
        record["warmup_s"] = round(time.perf_counter() - t1, 2)
        stage = "probes"
        out = Path(images_dir) / label_of(item)
        out.mkdir(parents=True, exist_ok=True)
        seconds = []
        for probe in probe_set.probes:
            sync()
            t2 = time.perf_counter()
            image = pipe(**_probe_call(probe, probe_set),
                         generator=torch.Generator("cpu").manual_seed(probe.seed)).images[0]
            sync()
            seconds.append(time.perf_counter() - t2)
            image.save(out / f"{probe.id}.png")
            record.setdefault("finite", True)
            record["finite"] &= bool(quality.as_rgb8(image).std() > 0)
        record["s_per_image"] = round(statistics.median(seconds), 3)
        if measure_inputs:   # hooks on every block projection: after the timed renders, on an eager model only
            stage = "activation statistics"
            probe = probe_set.probes[0]
            with hostile.LinearInputs(pipe.transformer) as seen:
                pipe(**{**_probe_call(probe, probe_set), "num_inference_steps": 1},
                     generator=torch.Generator("cpu").manual_seed(probe.seed))
            record["linear_inputs"] = seen.to_dict()
        record["ok"] = True
    except (RuntimeError, MemoryError, ValueError) as exc:
        record["error"] = f"{type(exc).__name__} during {stage}: {' '.join(str(exc).split())[:500]}"
    return record


def _probe_call(probe, probe_set) -> dict:
    return {"prompt": probe.prompt, "height": probe_set.size_px, "width": probe_set.size_px,
            "num_inference_steps": probe_set.steps, "guidance_scale": 0.0}


def judge_item(record: dict, reference: dict, probe_set, images_dir: str) -> dict:
    """The gate's verdict on one item's images against the reference item's, with the default thresholds."""
    from shared.settings import Settings
    from worker.engine import quality

    def image(item: str, probe_id: str) -> bytes:
        return Path(images_dir, label_of(item), f"{probe_id}.png").read_bytes()

    measured = [{"id": p.id, **quality.compare(image(record["item"], p.id), image(reference["item"], p.id))}
                for p in probe_set.probes]
    verdict = calibration.judge(measured, calibration.Thresholds.from_settings(Settings.from_env({})))
    return {"check": "hostile", "item": record["item"], "reference": reference["item"], "profile": record["profile"],
            "policy": record.get("policy"), "scaling": record.get("scaling"), "s_per_image": record.get("s_per_image"),
            "device": record.get("device"), "torch": record.get("torch"), "date": record.get("date"),
            "probe_set": probe_set.key, **verdict}


def summary_line(result: dict) -> str:
    verdict = "passed" if result["passed"] else "FAILED"
    return (f"{result['profile']:36s} policy={result['policy']:6s} scaling={result['scaling']:7s} "
            f"psnr mean/worst={result['psnr_db_mean']}/{result['psnr_db_min']} dB "
            f"ssim mean/worst={result['ssim_mean']}/{result['ssim_min']} s/img={result['s_per_image']} {verdict}")


def _subprocess_item(model_dir: str, item: str, args, measure_inputs: bool) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, "-m", "bench.hostile", "run", model_dir, item, "--result", result.name,
               "--images-dir", args.images_dir, "--device", args.device, "--probes", str(args.probes),
               "--size", str(args.size), "--steps", str(args.steps)] + (["--measure-inputs"] if measure_inputs else [])
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s)
            text = Path(result.name).read_text()
            record = json.loads(text) if text.strip() else {
                "check": "hostile-run", "item": item, "ok": False,
                "error": f"process exited {proc.returncode} without a result: {(proc.stderr or '')[-600:]}"}
        except subprocess.TimeoutExpired:
            record = {"check": "hostile-run", "item": item, "ok": False, "error": f"timed out after {args.timeout_s} s"}
    record["wall_s"] = round(time.monotonic() - t0, 1)
    return record


def _record(record: dict, jsonl: str) -> None:
    if jsonl:
        _append(jsonl, record)


def run_all(args) -> list[dict]:
    """The reference item, then each item in a fresh process; a lossy item that fails steps to safer policies."""
    from worker.engine import policy, specs

    started = time.monotonic()
    probe_set = calibration.load_probes(args.probes, args.size, args.steps)
    reference_item = args.reference or REFERENCE[args.device]
    kept = Path(args.images_dir, label_of(reference_item), "record.json")
    reference = json.loads(kept.read_text()) if kept.is_file() else {}
    if reference.get("probe_set") != probe_set.key or not reference.get("ok"):
        reference = _subprocess_item(args.dir, reference_item, args, measure_inputs=True)
        _record(reference, args.jsonl)
        if reference.get("ok"):   # a later call on the same machine (same model) compares with these images
            kept.write_text(json.dumps(reference))
    if not reference.get("ok"):
        print(f"reference {reference['item']} failed: {reference.get('error')}", flush=True)
        return []
    print(f"reference {reference['item']}: s/img={reference['s_per_image']} activations "
          f"{reference.get('linear_inputs')}", flush=True)
    queue = list(args.items or default_items(args.device, *_versions()))
    results = []
    while queue:
        item = queue.pop(0)
        if time.monotonic() - started > args.deadline_s:
            print(f"{item}: skipped (deadline {args.deadline_s:.0f} s reached)", flush=True)
            continue
        record = _subprocess_item(args.dir, item, args, measure_inputs=False)
        _record(record, args.jsonl)
        if not record.get("ok"):
            print(f"{item}: FAILED to render: {record.get('error')}", flush=True)
            continue
        result = judge_item(record, reference, probe_set, args.images_dir)
        _record(result, args.jsonl)
        print(summary_line(result), flush=True)
        results.append(result)
        safer = policy.safer(record["policy"]) if record.get("lossy") and record["policy"] in policy.POLICIES else None
        if not result["passed"] and args.step_down and safer and specs.is_lossy(
                specs.spec_for(record["profile"], {**record["overrides"], "quant_policy": safer})):
            queue.insert(0, "+".join([item.split("+quant_policy=")[0], f"quant_policy={safer}"]))
    return results


def _versions() -> tuple[str, str]:
    """The installed torch's and Triton's versions ("" where absent), which decide what each arch can run."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return torch.__version__, triton_version


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-dir", default="/tmp/zfarm-hostile-images")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--probes", type=int, default=2, help="how many of the probe set, from the first")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        one = argparse.ArgumentParser(prog="python -m bench.hostile run", description="one item in this process")
        one.add_argument("dir")
        one.add_argument("item")
        one.add_argument("--result", required=True)
        one.add_argument("--measure-inputs", action="store_true")
        _common(one)
        args = one.parse_args(argv[1:])
        probe_set = calibration.load_probes(args.probes, args.size, args.steps)
        record = run_item(args.dir, args.item, args.device, probe_set, args.images_dir, args.measure_inputs)
        Path(args.result).write_text(json.dumps(record))
        return 0 if record["ok"] else 1
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("items", nargs="*")
    parser.add_argument("--jsonl", default="")
    parser.add_argument("--reference", default="", help="the reference item (default: resident, or cpu on a CPU)")
    parser.add_argument("--timeout-s", type=int, default=300)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no item after this many seconds")
    parser.add_argument("--no-step-down", dest="step_down", action="store_false")
    _common(parser)
    return 0 if run_all(parser.parse_args(argv)) else 1


if __name__ == "__main__":
    sys.exit(main())
