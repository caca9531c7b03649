"""The diffusers renderer: load Z-Image-Turbo, apply the chosen profile, render jobs to PNG.

Runs in the process that renders (a Celery pool child), never in the parent: torch and CUDA are
imported in `load()`. On an out-of-memory error at render time it steps down once to the next
measured profile that needs less VRAM (`shared.profiles.step_down`), reloads, and retries the job
once; if that also runs out of memory, or no smaller profile is on record, it raises OutOfMemory.
"""
from __future__ import annotations

import gc
import logging
import os
import time

from shared import profiles
from shared.schema import JobSpec
from worker.render import OutOfMemory, RenderResult, encode_png

log = logging.getLogger(__name__)

# Expandable segments keep reserved memory close to allocated memory (less fragmentation), which
# matters when a profile runs within half a GiB of a small card's limit. The benchmark measures with
# the same setting. Honoured only if set before the first CUDA allocation; a value the operator set wins.
CUDA_ALLOC_CONF = "expandable_segments:True"
_OOM_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or the untyped errors cuBLAS/cuDNN raise when their workspace allocation fails."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda}


class DiffusionRenderer:
    def __init__(self, settings, boot, table: dict | None = None):
        self.settings = settings
        self.boot = boot
        self._table = table
        self.device = "cuda" if boot.device == "cuda" else "cpu"
        self.profile = boot.choice.profile      # the profile name the chooser and step-down speak of
        self.applied = None                     # what was applied: the profile, or "cpu" on a CPU
        self.pipe = None
        self.dtype = None
        self.load_s = None
        self.downgrades: list[dict] = []
        self._versions: dict = {}

    # Loading
    def load(self) -> None:
        """Blocking: load the pipeline and apply the profile (no warm-up call)."""
        if self.device == "cuda":
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
        import torch

        if self.device == "cuda" and self.boot.cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.boot.cap_gib * 2**30 / total))
        self._versions = versions()
        self._load_profile(self.profile)

    def _load_profile(self, name: str) -> None:
        import torch

        from worker import offload, pipeline

        applied = name if self.device == "cuda" else offload.CPU_PROFILE
        t0 = time.monotonic()
        dtype = torch.float32 if applied == "cpu" else pipeline.default_dtype(self.device)
        gpu_parts = offload.gpu_components(applied) if self.device == "cuda" else ()
        pipe = pipeline.load_pipeline(self.settings.model, dtype, self.settings.model_cache_dir,
                                      gpu_components=gpu_parts, device=self.device)
        offload.apply_profile(pipe, applied, self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.applied, self.dtype = pipe, applied, dtype
        self.load_s = round(time.monotonic() - t0, 2)
        log.info("loaded %s with profile %s (applied as %s) in %.1f s", self.settings.model, name, applied,
                 self.load_s)

    def _release(self, drop_pipeline: bool) -> None:
        """Return freed device memory to the driver; optionally drop the pipeline first."""
        import torch

        if drop_pipeline:
            self.pipe = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _switch(self, name: str) -> None:
        """Drop the pipeline (hooks, casts and compiled blocks go with it) and load `name` afresh."""
        import torch

        self._release(drop_pipeline=True)
        torch._dynamo.reset()
        self._load_profile(name)
        self.profile = name

    def table(self) -> dict:
        if self._table is None:
            self._table = profiles.load_table()
        return self._table

    # Rendering
    def describe(self) -> dict:
        return {"renderer": "diffusers", "profile": self.profile, "applied": self.applied, "device": self.device,
                "gpu": self.boot.gpu, "vram_class": self.boot.vram_class, "cap_gib": self.boot.cap_gib,
                "model": self.settings.model, "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
                "load_s": self.load_s, "downgrades": list(self.downgrades), "versions": dict(self._versions)}

    def _generate(self, spec: JobSpec):
        """One pipeline call. Returns (image, peak_reserved_gib, peak_alloc_gib)."""
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # A CPU generator: the same seed gives the same latents on every card and profile.
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        out = self.pipe(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
                        height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                        guidance_scale=spec.guidance, generator=generator, output_type="pil")
        if self.device != "cuda":
            return out.images[0], None, None
        return (out.images[0], round(torch.cuda.max_memory_reserved() / 2**30, 2),
                round(torch.cuda.max_memory_allocated() / 2**30, 2))

    def _attempt(self, spec: JobSpec):
        """(result, None) or (None, error text) when the call ran out of memory. The exception is not
        kept: its traceback holds the frames, and their tensors, that must be freed before a retry."""
        try:
            return self._generate(spec), None
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            return None, " ".join(str(exc).split())[:300]

    def render(self, spec: JobSpec) -> RenderResult:
        if self.pipe is None:
            self.load()
        t0 = time.monotonic()
        downgraded_from = None
        result, error = self._attempt(spec)
        if result is None:
            failed = self.profile
            # The pipeline stays usable after an out-of-memory error: keep it unless we step down.
            self._release(drop_pipeline=False)
            lower = profiles.step_down(self.table(), self.boot.vram_class, failed,
                                       ram_gib=self.boot.host_ram_gib or None)
            if lower is None:
                raise OutOfMemory(f"out of memory on profile {failed} ({spec.width}x{spec.height}) and no measured "
                                  f"profile needs less VRAM for class {profiles.class_label(self.boot.vram_class)}: "
                                  f"{error}")
            log.warning("out of memory on profile %s: stepping down to %s and retrying once", failed, lower.profile)
            self._switch(lower.profile)
            self.downgrades.append({"from": failed, "to": lower.profile, "at": time.time(), "error": error,
                                    "width": spec.width, "height": spec.height})
            downgraded_from = failed
            result, error = self._attempt(spec)
            if result is None:
                self._release(drop_pipeline=False)
                raise OutOfMemory(f"out of memory again after stepping down from {failed} to {lower.profile} "
                                  f"({spec.width}x{spec.height}): {error}")
        image, peak_reserved_gib, peak_alloc_gib = result
        render_s = time.monotonic() - t0
        facts = {"renderer": "diffusers", "profile": self.profile, "applied": self.applied, "device": self.device,
                 "gpu": self.boot.gpu, "vram_class": self.boot.vram_class, "cap_gib": self.boot.cap_gib,
                 "model": self.settings.model, "dtype": str(self.dtype).replace("torch.", ""),
                 "peak_vram_gib": peak_reserved_gib, "peak_alloc_gib": peak_alloc_gib,
                 "render_s": round(render_s, 3), "versions": dict(self._versions)}
        if downgraded_from:
            facts["downgraded_from"] = downgraded_from
        return RenderResult(png=encode_png(image, spec, facts), render_s=render_s, facts=facts)
