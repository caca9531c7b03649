"""The diffusers renderer: load Z-Image-Turbo, apply the chosen profile, render jobs to PNG.

Runs in the process that renders (a Celery pool child), never in the parent: torch and CUDA are
imported in `load()`. On an out-of-memory error at render time it steps down once to the next
measured profile that needs less VRAM (`shared.profiles.step_down`), reloads, and retries the job
once; if that also runs out of memory, or no smaller profile is on record, it raises OutOfMemory.

Cold start and speed: torch.compile's caches live in `settings.compile_cache_dir`, so a restarted
worker reads its compiled kernels back instead of compiling again; `load()` ends with a 1-step warm-up
call, so that compiling happens while the worker still reports itself loading, not in its first job;
text-encoder outputs are kept by prompt text (`settings.prompt_cache_size`), so a repeated prompt
skips the text encoder.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict

from shared import profiles
from shared.errors import BadOutput, CalibrationError, NoWorkingProfile, OutOfMemory, QualityFailed
from shared.schema import JobSpec
from worker.engine.render import RenderResult, encode_png

log = logging.getLogger(__name__)

# Expandable segments keep reserved memory close to allocated memory (less fragmentation), which
# matters when a profile runs within half a GiB of a small card's limit. The benchmark measures with
# the same setting. Honoured only if set before the first CUDA allocation; a value the operator set wins.
CUDA_ALLOC_CONF = "expandable_segments:True"
# The warm-up's side in pixels. On a GPU the reference job's, so that compiled blocks compile for the
# shapes most jobs bring; a CPU compiles nothing and only needs the call path exercised, at the smallest
# size a job may have (the tiny test model renders it in a fraction of a second).
WARMUP_PX = {"cuda": 1024, "cpu": 256}
WARMUP_PROMPT = "a photo of a cat"
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


def use_compile_cache(folder: str) -> str | None:
    """Point inductor's and Triton's on-disk caches into `folder` (inductor/, triton/), unless the
    operator set TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR: theirs win. Empty `folder` leaves
    torch's defaults. Returns the inductor cache folder in effect (None: torch's default).

    Both are read at the first compile, but this must still run before torch is imported: importing
    diffusers makes torch write its own default (/tmp/torchinductor_<user>) into os.environ, which
    would then pass for the operator's value."""
    if folder:
        root = os.path.abspath(os.path.expanduser(folder))
        for env, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            if env in os.environ:
                continue
            path = os.path.join(root, sub)
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:  # a cache only saves time: a worker without one still renders
                log.warning("compile cache %s is unusable (%s); %s keeps torch's default", path, exc, env)
                continue
            os.environ[env] = path
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


# torch.compile's own timers (torch._dynamo.utils.compile_times, seconds summed over every graph) that
# say where a compiling call's time went: dynamo's whole compile, its bytecode tracing, the backend
# (AOT autograd and inductor, cache lookups included), loading the compiled modules, building guards.
_COMPILE_TIMERS = {"dynamo_s": "_compile.compile_inner", "tracing_s": "bytecode_tracing",
                   "backend_s": "OutputGraph.call_user_compiler", "module_load_s": "PyCodeCache.load_by_key_path",
                   "guards_s": "build_guards"}


def compile_state() -> dict:
    """torch.compile's process-wide totals so far: its timers (`_COMPILE_TIMERS`) and counters."""
    from torch._dynamo import utils

    names, values = utils.compile_times(repr="csv", aggregate=True)
    timers = dict(zip(names, values))
    counters = utils.counters
    state = {key: float(timers.get(name, 0.0)) for key, name in _COMPILE_TIMERS.items()}
    state.update(graphs=counters["stats"].get("unique_graphs", 0),
                 fx_cache_hits=counters["inductor"].get("fxgraph_cache_hit", 0),
                 fx_cache_misses=counters["inductor"].get("fxgraph_cache_miss", 0),
                 autograd_cache_hits=counters["aot_autograd"].get("autograd_cache_hit", 0))
    return state


def compile_summary(before: dict) -> dict:
    """What torch.compile did since `before` (a `compile_state()`): graphs made, cache hits and misses,
    seconds per timer. Empty when it made no graph. Taken around the warm-up, it splits the warm-up."""
    after = compile_state()
    if after["graphs"] == before["graphs"]:
        return {}
    return {key: (round(after[key] - before[key], 2) if key.endswith("_s") else after[key] - before[key])
            for key in after}


# A self-test image whose pixels spread less than this (on a 0..1 scale) is constant: black, grey or
# one colour. A real warm-up image, even of random weights, varies far more.
MIN_PIXEL_STD = 1e-3
# Exception text that marks a card lacking a kernel or type, as opposed to a bug.
_UNSUPPORTED_TEXT = ("not supported", "NOT_SUPPORTED", "not implemented", "no kernel image", "Unsupported")


def check_pixels(images) -> dict:
    """The self-test of a decoded image batch (float, 0..1): raises BadOutput when any value is not finite
    or the image is constant; else returns its mean and spread."""
    import torch

    values = images.float()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise BadOutput(f"{int((~finite).sum())} of {values.numel()} pixel values are NaN or infinite")
    spread = float(values.std())
    if spread < MIN_PIXEL_STD:
        raise BadOutput(f"the image is constant (mean {float(values.mean()):.3f}, spread {spread:.2g})")
    return {"finite": True, "mean": round(float(values.mean()), 4), "std": round(spread, 4)}


def failure_kind(exc: BaseException) -> str:
    """What kind of boot failure `exc` is: quality, out-of-memory, bad-output, compile, unsupported or error."""
    if isinstance(exc, QualityFailed):
        return "quality"
    if isinstance(exc, BadOutput):
        return "bad-output"
    if isinstance(exc, (RuntimeError, MemoryError)) and is_out_of_memory(exc):
        return "out-of-memory"
    names = " ".join(type(e).__name__ + " " + type(e).__module__ for e in _chain(exc))
    text = " ".join(str(e) for e in _chain(exc))
    if any(t in text for t in _UNSUPPORTED_TEXT) or isinstance(exc, NotImplementedError):
        return "unsupported"
    if any(k in names for k in ("torch._dynamo", "torch._inductor", "triton", "BackendCompilerFailed",
                                "InductorError", "CompilationError")):
        return "compile"
    return "error"


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


# Failures a safer variant of the same profile (more layers in bf16: `worker.engine.policy`) may cure: its
# images were judged degraded, or were NaN or constant.
_PRECISION_FAILURES = ("quality", "bad-output")


def variant_label(profile: str, policy_name: str) -> str:
    """"fp8mm_compiled" for a profile with its own policy, "fp8mm_compiled:edges" for a safer variant."""
    from worker.engine import specs

    return profile if policy_name in ("", specs.policy_of(profile)) else f"{profile}:{policy_name}"


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
        self.warmup_s = None
        self.warmup_compile: dict = {}          # compile_summary() of the warm-up
        # Where a load's time goes (seconds): imports, CUDA context, reading weights, applying the profile,
        # warm-up. Cold start is judged by the sum; this says which part to work on.
        self.load_stages_s: dict[str, float] = {}
        self.compile_cache_dir = None
        self.downgrades: list[dict] = []       # out-of-memory step-downs while rendering
        self.boot_attempts: list[dict] = []    # each profile tried at load: {profile, kind, error}
        self.boot_step_down: dict = {}         # {from, to, reason, attempts} when the chosen one failed
        self.self_test: dict = {}              # the warm-up image's check
        self.loading_profile = ""              # the profile being loaded (or last loaded)
        self.policy = ""                       # its quantisation policy (worker.engine.policy)
        self.lossy = False                     # whether the loaded variant computes below bf16 (specs.is_lossy)
        # The quality gate's verdict on the loaded variant (shared.calibration.quality_block), from the judge
        # `load()` was given; the judge runs again for a profile an out-of-memory step-down loads.
        self.quality: dict = {}
        self._judge = None
        self._known_failure = None
        self._versions: dict = {}
        # prompt text -> the text encoder's output for it (a list of one tensor, as the pipeline takes
        # it), kept on the CPU: on the GPU 256 long prompts would take up to 0.6 GiB, more than the
        # margin the profile table leaves. Copying one back takes well under a millisecond.
        self._prompt_cache: OrderedDict[str, list] = OrderedDict()
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    # Loading
    def load(self, judge=None, policy: str = "", known_failure=None) -> None:
        """Blocking: load the pipeline, apply the profile, then warm up and self-test (`settings.warmup`),
        then, with a `judge`, pass the quality gate. The worker reports itself ready only once this
        returns, so the first job does not pay for compiling and a card that cannot render the profile,
        or renders it degraded, never serves it.

        When the chosen profile fails (a compile error, an unsupported op, out of memory, or images that
        are not finite or are constant), its resources are freed and the next of `boot.fallbacks` is
        tried, in order; `boot_step_down` says from which, to which and why.

        `policy` loads the chosen profile with that quantisation policy instead of its own.
        `judge(renderer)` returns the quality block of the loaded variant, or raises QualityFailed. A
        lossy profile whose images fail it, or are NaN or constant, first steps to its safer variants
        (`worker.engine.policy.safer`: more layers in bf16); when the last fails its quality judgement too,
        only lossless profiles are tried after it. `known_failure(profile, policy)` returns (why, quality
        block) for a lossy variant already judged and failed here: it is skipped, recorded as a quality
        failure, without being loaded. A CalibrationError (the gate itself cannot run) stops the load.
        Raises NoWorkingProfile, naming each variant tried with its error, when every one fails."""
        if self.device == "cuda":
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
        caps = getattr(self.boot, "capabilities", None)
        cache_dir = self.settings.compile_cache_dir
        if cache_dir and caps is not None and caps.emulated_on:
            # A compile cache filled as the real card would hand back kernels the emulated card's Triton
            # refuses, without compiling them again: each played architecture keeps caches of its own.
            cache_dir = os.path.join(cache_dir, f"emulated-{caps.arch}")
        self.compile_cache_dir = use_compile_cache(cache_dir)
        t0 = time.monotonic()
        import torch

        self._versions = versions()
        t1 = time.monotonic()
        if caps is not None and caps.emulated_on:
            from worker.engine import emulation

            emulation.activate(caps.arch, caps.torch, caps.triton, caps.emulated_on)
        if self.device == "cuda":
            torch.cuda.init()
            if self.boot.cap_gib:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, self.boot.cap_gib * 2**30 / total))
        self.load_stages_s = {"imports": round(t1 - t0, 2), "cuda_init": round(time.monotonic() - t1, 2)}
        self._judge = judge
        self._known_failure = known_failure
        self.boot_attempts = []
        first = (self.profile, policy)
        passed = self._load_first_passing([first] + [(c.profile, "") for c in getattr(self.boot, "fallbacks", ())])
        if passed != first:
            failed = self.boot_attempts[0]
            self.boot_step_down = {"from": variant_label(*first), "to": variant_label(*passed),
                                   "reason": f"{failed['kind']}: {failed['error']}",
                                   "attempts": list(self.boot_attempts)}
            log.warning("stepped down from %s to %s: %s", self.boot_step_down["from"], self.boot_step_down["to"],
                        self.boot_step_down["reason"])

    def _load_first_passing(self, queue: list[tuple[str, str]]) -> tuple[str, str]:
        """Load the first (profile, policy) of `queue` that passes the self-test and the judge, stepping to
        safer variants as `load()` says; each attempt is added to `boot_attempts`. Returns the one that
        passed; raises NoWorkingProfile when none did."""
        queue = list(queue)
        while queue:
            name, policy_name = queue.pop(0)
            if self._skip_known_failure(name, policy_name):
                queue = self._after_failure(name, "quality", queue)
                continue
            try:
                self._load_profile(name, policy_name)
                if self.settings.warmup:
                    self._warm_up()
                    self.load_stages_s["warmup"] = self.warmup_s
                else:
                    self.self_test = {"skipped": "ZFARM_WARMUP is off: no warm-up image to check"}
                self.quality = self._judge(self) if self._judge is not None else {}
            except CalibrationError:
                self._discard_failed_profile()
                raise
            except Exception as exc:  # a variant this card cannot run, or runs degraded: record why, free it
                failure = {"profile": name, "policy": self.policy, "kind": failure_kind(exc), "error": _one_line(exc)}
                if isinstance(exc, QualityFailed):
                    failure["quality"] = exc.quality
                self.boot_attempts.append(failure)
                log.error("profile %s failed its boot self-test (%s): %s", variant_label(name, self.policy),
                          failure["kind"], failure["error"])
                queue = self._after_failure(name, failure["kind"], queue, getattr(exc, "try_safer", True))
                self._discard_failed_profile()
                continue
            self.boot_attempts.append({"profile": name, "policy": self.policy, "kind": "ok", "error": ""})
            self.profile = name
            return name, policy_name
        raise NoWorkingProfile(self.boot_attempts)

    def _skip_known_failure(self, name: str, policy_name: str) -> bool:
        """Whether variant (`name`, `policy_name`) is lossy and its cached verdict fails: then it is recorded
        as a quality failure, as if loaded and judged, and `self.policy` and `self.lossy` describe it for
        `_after_failure`."""
        from worker.engine import specs

        known = self._known_failure
        if known is None or not specs.lossy_on(name, self.device, policy_name):
            return False
        effective = policy_name or specs.policy_of(specs.applied_on(name, self.device))
        failed = known(name, effective)
        if failed is None:
            return False
        why, quality = failed
        self.loading_profile, self.policy, self.lossy = name, effective, True
        self.boot_attempts.append({"profile": name, "policy": effective, "kind": "quality", "error": why[:500],
                                   "quality": quality})
        log.error("profile %s failed its boot self-test (quality, cached): %s", variant_label(name, effective), why)
        return True

    def _after_failure(self, name: str, kind: str, queue: list[tuple[str, str]],
                       try_safer: bool = True) -> list[tuple[str, str]]:
        """What to try after variant (`name`, `self.policy`) failed with `kind`: its safer variant first
        where precision may be the cause; after a quality failure with no safer variant left (or none
        worth trying: the gate had no references to judge any by), only the lossless profiles of the rest."""
        from worker.engine import policy, specs

        if not self.lossy or kind not in _PRECISION_FAILURES:
            return queue
        safer = policy.safer(self.policy) if try_safer else None
        if safer is not None:
            return [(name, safer)] + queue
        if kind == "quality":
            return [(n, p) for n, p in queue if not specs.lossy_on(n, self.device, p)]
        return queue

    def _discard_failed_profile(self) -> None:
        """Free what a failed profile left: its pipeline, compiled graphs and cached prompt embeddings."""
        import torch

        self._release(drop_pipeline=True)
        self._prompt_cache.clear()
        torch._dynamo.reset()

    def _warm_up(self) -> None:
        """One 1-step call: compiled profiles compile here, or read the compile cache. It is also the boot
        self-test: its image must be finite and not constant (fp8 or fp16 overflow renders NaN or black).
        An error fails the load like any other: a worker that cannot render must not report ready."""
        import torch

        side = WARMUP_PX[self.device]
        compiled_before = compile_state()
        t0 = time.monotonic()
        out = self.pipe(prompt=WARMUP_PROMPT, height=side, width=side, num_inference_steps=1, guidance_scale=0.0,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="pt")
        self.warmup_s = round(time.monotonic() - t0, 2)
        self.warmup_compile = compile_summary(compiled_before)
        self.self_test = check_pixels(out.images)
        log.info("warm-up call (%dx%d, 1 step) took %.1f s; compiling in it: %s; self-test %s", side, side,
                 self.warmup_s, self.warmup_compile, self.self_test)

    def _load_profile(self, name: str, policy_name: str = "") -> None:
        """Load the pipeline and apply profile `name` with quantisation policy `policy_name` ("": the
        profile's own). On a CPU every GPU profile applies as "cpu"; the CPU's own lossy profiles apply
        as themselves."""
        from worker.engine import pipeline, placement, specs

        applied = specs.applied_on(name, self.device)
        self.loading_profile = name
        self.policy = policy_name or specs.policy_of(applied)
        overrides = {"quant_policy": policy_name} if policy_name else None
        self.lossy = specs.lossy_on(name, self.device, policy_name)
        t0 = time.monotonic()
        dtype = pipeline.load_dtype(specs.spec_for(applied, overrides), self.device)
        gpu_parts = specs.gpu_components(applied, overrides) if self.device == "cuda" else ()
        pipe = pipeline.load_pipeline(self.settings.model, dtype, self.settings.model_cache_dir,
                                      gpu_components=gpu_parts, device=self.device,
                                      stream_loaded=specs.stream_loaded(applied, overrides) if self.device == "cuda" else None)
        t1 = time.monotonic()
        placement.apply_profile(pipe, applied, self.device, overrides)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.applied, self.dtype = pipe, applied, dtype
        self.load_s = round(time.monotonic() - t0, 2)
        # "read" includes importing the pipeline's classes, which diffusers and transformers do lazily.
        self.load_stages_s.update({"read": round(t1 - t0, 2), "place": round(time.monotonic() - t1, 2)})
        log.info("loaded %s with profile %s (applied as %s, policy %s) in %.1f s", self.settings.model, name, applied,
                 self.policy, self.load_s)

    def _release(self, drop_pipeline: bool) -> None:
        """Return freed device memory to the driver; optionally drop the pipeline first."""
        import torch

        if drop_pipeline:
            self.pipe = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _switch(self, name: str) -> None:
        """Drop the pipeline (hooks, casts and compiled blocks go with it) and load `name` afresh, through
        the quality gate `load()` was given: a lossy profile serves only once it passed, or one of its
        safer variants did (NoWorkingProfile when none did)."""
        import torch

        self._release(drop_pipeline=True)
        # The cached embeddings came from the old profile's text encoder, which the new one may store
        # in fp8: keeping them would give other pixels than the new profile gives for the same job.
        self._prompt_cache.clear()
        torch._dynamo.reset()
        if self._judge is None:
            self._load_profile(name)
            self.profile = name
            return
        self._load_first_passing([(name, "")])

    def close(self) -> None:
        """Drop the pipeline and free its memory (a renderer loaded only to render calibration references)."""
        self._discard_failed_profile()

    def table(self) -> dict:
        if self._table is None:
            self._table = profiles.load_table(self.settings.profile_table)
        return self._table

    # Rendering
    def describe(self) -> dict:
        return {"renderer": "diffusers", "profile": self.profile, "policy": self.policy, "lossy": self.lossy,
                "quality": dict(self.quality), "applied": self.applied, "device": self.device, "gpu": self.boot.gpu,
                "vram_class": self.boot.vram_class, "cap_gib": self.boot.cap_gib,
                "model": self.settings.model, "dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
                "load_s": self.load_s, "warmup_s": self.warmup_s, "load_stages_s": dict(self.load_stages_s),
                "warmup_compile": dict(self.warmup_compile),
                "compile_cache_dir": self.compile_cache_dir,
                "prompt_cache": {"size": self.settings.prompt_cache_size, "entries": len(self._prompt_cache),
                                 "hits": self.prompt_cache_hits, "misses": self.prompt_cache_misses},
                "downgrades": list(self.downgrades), "boot_step_down": dict(self.boot_step_down),
                "boot_attempts": list(self.boot_attempts), "self_test": dict(self.self_test),
                "versions": dict(self._versions)}

    def _prompt_embeds(self, text: str) -> tuple[list, bool]:
        """(the text encoder's output for `text` on the pipeline's device, whether it came from the cache).
        The pipeline's own encode_prompt fills the cache: its chat template, its padding and mask."""
        import torch

        cached = self._prompt_cache.get(text)
        if cached is not None:
            self._prompt_cache.move_to_end(text)
            self.prompt_cache_hits += 1
            return [e.to(self.pipe._execution_device) for e in cached], True
        self.prompt_cache_misses += 1
        with torch.no_grad():  # as inside the pipeline call: no autograd graph kept with the output
            embeds, _ = self.pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False)
        self._prompt_cache[text] = [e.to("cpu") for e in embeds]
        if len(self._prompt_cache) > self.settings.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return embeds, False

    def _generate(self, spec: JobSpec):
        """One pipeline call. Returns (image, peak_reserved_gib, peak_alloc_gib, prompt_cache_hit)."""
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # A CPU generator: the same seed gives the same latents on every card and profile.
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        hit = False
        if self.settings.prompt_cache_size > 0:
            # The pipeline encodes a negative prompt ("" when none is given) only when guidance > 0 (its
            # do_classifier_free_guidance). That text is cached like any other: the text encoder's output
            # for a text does not depend on which side of the guidance it goes.
            embeds, hit = self._prompt_embeds(spec.prompt)
            text = {"prompt_embeds": embeds}
            if spec.guidance > 0:
                negative, negative_hit = self._prompt_embeds(spec.negative_prompt or "")
                text["negative_prompt_embeds"] = negative
                hit = hit and negative_hit
        else:
            text = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt or None}
        out = self.pipe(**text, height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                        guidance_scale=spec.guidance, generator=generator, output_type="pil")
        if self.device != "cuda":
            return out.images[0], None, None, hit
        return (out.images[0], round(torch.cuda.max_memory_reserved() / 2**30, 2),
                round(torch.cuda.max_memory_allocated() / 2**30, 2), hit)

    def render_image(self, spec: JobSpec):
        """The image of one job, as `render` would draw it, without its PNG and facts: what calibration
        probes are (`worker.engine.quality`)."""
        return self._generate(spec)[0]

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
            self.load(self._judge)
        t0 = time.monotonic()
        downgraded_from = None
        result, error = self._attempt(spec)
        if result is None:
            failed = self.profile
            # The pipeline stays usable after an out-of-memory error: keep it unless we step down.
            self._release(drop_pipeline=False)
            lower = profiles.step_down(self.table(), self.boot.vram_class, failed,
                                       ram_gib=self.boot.host_ram_gib or None, allow_lossy=self.settings.allow_lossy,
                                       caps=getattr(self.boot, "capabilities", None))
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
        image, peak_reserved_gib, peak_alloc_gib, prompt_cache_hit = result
        render_s = time.monotonic() - t0
        facts = {"renderer": "diffusers", "profile": self.profile, "policy": self.policy,
                 "quality": dict(self.quality), "applied": self.applied, "device": self.device,
                 "gpu": self.boot.gpu, "vram_class": self.boot.vram_class, "cap_gib": self.boot.cap_gib,
                 "model": self.settings.model, "dtype": str(self.dtype).replace("torch.", ""),
                 "peak_vram_gib": peak_reserved_gib, "peak_alloc_gib": peak_alloc_gib,
                 "render_s": round(render_s, 3), "prompt_cache_hit": prompt_cache_hit,
                 "versions": dict(self._versions)}
        if downgraded_from:
            # This very render stepped down: the worker's profile changes from here on.
            facts.update(oom_step_down={"from": downgraded_from, "to": self.profile})
        if self.downgrades:
            facts.update(downgraded_from=self.downgrades[-1]["from"],
                         downgrade_reason=f"out-of-memory: {self.downgrades[-1]['error']}")
        elif self.boot_step_down:
            facts.update(downgraded_from=self.boot_step_down["from"], downgrade_reason=self.boot_step_down["reason"])
        return RenderResult(png=encode_png(image, spec, facts), render_s=render_s, facts=facts)
