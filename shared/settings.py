"""Every setting zfarm reads, from the environment, with its documented default.

One object owns configuration: `Settings.from_env()`. CLI flags override fields with
`settings.replace(...)`; nothing else reads `os.environ` for zfarm settings.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

from shared.errors import SettingsError

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_REDIS_MASTER_NAME = "zfarm"


def _env_field(env: str, default, doc: str, kind=str):
    return field(default=default, metadata={"env": env, "doc": doc, "kind": kind})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")




@dataclass(frozen=True)
class Settings:
    redis_url: str = _env_field(
        "ZFARM_REDIS_URL", "redis://localhost:6379/0",
        "Broker and state store for jobs, batches and the worker registry: redis://[:password@]host:port/db, "
        "or through Sentinel, sentinel://[:password@]host:port[;sentinel://[:password@]host:port...][/db] "
        "(the password also authenticates to the sentinels).")
    redis_master_name: str = _env_field(
        "ZFARM_REDIS_MASTER_NAME", DEFAULT_REDIS_MASTER_NAME,
        "With a sentinel:// ZFARM_REDIS_URL: the name under which the sentinels monitor the primary.")
    producer_redis_retry_s: float = _env_field(
        "ZFARM_PRODUCER_REDIS_RETRY_S", 60.0,
        "How long a zfarm command (and the Python API) retries a Redis command while Redis is unreachable, "
        "as during a restart, with backoff up to 2 s between tries, before it gives up (exit 3). A wrong "
        "password is not retried.", float)
    storage_url: str = _env_field(
        "ZFARM_STORAGE_URL", "file://./zfarm-results",
        "Where results land: s3://bucket/prefix or file:///abs/dir.")
    s3_endpoint_url: str = _env_field(
        "ZFARM_S3_ENDPOINT_URL", "",
        "Endpoint of an S3-compatible store (MinIO, R2); empty means AWS S3. "
        "Credentials come from the standard AWS_* variables.")
    model: str = _env_field(
        "ZFARM_MODEL", DEFAULT_MODEL,
        "Hugging Face id, modelscope:<id>, or a local folder holding a ZImagePipeline.")
    model_cache_dir: str = _env_field(
        "ZFARM_MODEL_CACHE", "",
        "Download cache for model weights; empty means the hub libraries' default.")
    worker_name: str = _env_field(
        "ZFARM_WORKER_NAME", "", "Worker name in the registry; empty means <class>@<host>.")
    vram_gb: float = _env_field(
        "ZFARM_VRAM_GB", 0.0,
        "Override the detected VRAM (GiB). On a GPU it also caps the allocator; 0 detects.", float)
    profile: str = _env_field(
        "ZFARM_PROFILE", "", "Force a memory/offload profile by name; empty lets the chooser pick.")
    allow_lossy: bool = _env_field(
        "ZFARM_ALLOW_LOSSY", False,
        "Let the chooser pick profiles whose images the benchmark found visibly different from bf16, or "
        "never compared (fp8 weights or matmuls, other attention kernels).", bool)
    ram_gb: float = _env_field(
        "ZFARM_RAM_GB", 0.0, "Override the detected host RAM (GiB) for the profile choice; 0 detects.",
        float)
    simulate_s: float = _env_field(
        "ZFARM_SIMULATE_S", -1.0,
        "Seconds per 1024x1024 8-step image for the simulated renderer; negative means real rendering.",
        float)
    profile_table: str = _env_field(
        "ZFARM_PROFILE_TABLE", "",
        "Path of the measured profile table the chooser and the routing read; empty uses the table shipped "
        "with zfarm (bench/results/profile_table.json at release).")
    emulate_arch: str = _env_field(
        "ZFARM_EMULATE_ARCH", "",
        "Play another GPU architecture (sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120) on this card: "
        "choose, compile and render as that card would (no fp8 matmul below sm_89, no bf16 below sm_80, Triton "
        "code checked for that target). For verifying profiles without the card; its speeds are this card's.")
    device: str = _env_field(
        "ZFARM_DEVICE", "", "Force the torch device (cuda or cpu); empty picks cuda when present.")
    heartbeat_s: float = _env_field(
        "ZFARM_HEARTBEAT_S", 5.0, "Seconds between registry heartbeats.", float)
    registry_ttl_s: float = _env_field(
        "ZFARM_REGISTRY_TTL_S", 15.0,
        "A worker whose heartbeat is older than this is dead: its entry expires and its "
        "in-flight job is handed back.", float)
    shutdown_grace_s: float = _env_field(
        "ZFARM_SHUTDOWN_GRACE_S", 20.0,
        "On SIGTERM, how long the job in progress may run on before it is handed back.", float)
    upload_retry_s: float = _env_field(
        "ZFARM_UPLOAD_RETRY_S", 120.0,
        "How long uploads retry with backoff before the job fails.", float)
    lanes: int = _env_field(
        "ZFARM_LANES", 4,
        "Queues per priority and size tier; batches are spread over them so that concurrent "
        "batches take turns.", int)
    job_margin: float = _env_field(
        "ZFARM_JOB_MARGIN", 3.0,
        "Safety factor on the slowest measured speed when deriving job time limits.", float)
    webhook_timeout_s: float = _env_field(
        "ZFARM_WEBHOOK_TIMEOUT_S", 10.0, "Timeout of one webhook call.", float)
    webhook_allowed_networks: str = _env_field(
        "ZFARM_WEBHOOK_ALLOWED_NETWORKS", "",
        "Private networks webhooks may reach, as comma-separated CIDRs (10.0.0.0/8,192.168.1.20/32). Empty: "
        "a webhook's host must resolve to public addresses only; loopback, link-local, private and other "
        "non-public addresses are refused, at submit and again before each POST. Cloud metadata addresses "
        "are refused always. Set it alike on producers and workers.")
    metrics_port: int = _env_field(
        "ZFARM_METRICS_PORT", 0, "Port for the worker's Prometheus metrics; 0 turns them off.", int)
    compile_cache_dir: str = _env_field(
        "ZFARM_COMPILE_CACHE_DIR", "~/.cache/zfarm/compile",
        "Where torch.compile keeps its caches (inductor/ and triton/ inside), so that a restarted worker "
        "reuses earlier compilations; TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR, when set, win. "
        "Empty leaves torch's defaults (a folder under /tmp).")
    warmup: bool = _env_field(
        "ZFARM_WARMUP", True,
        "Render one 1-step 1024x1024 image (256x256 on a CPU) while loading, so that compiled profiles "
        "compile before the worker reports itself ready.", bool)
    prompt_cache_size: int = _env_field(
        "ZFARM_PROMPT_CACHE_SIZE", 256,
        "Text-encoder outputs a worker keeps in host RAM (up to 2.5 MiB each), by exact prompt text, the least "
        "recently used dropped first; a repeated prompt skips the text encoder. 0 turns the cache off.", int)

    skip_calibration: bool = _env_field(
        "ZFARM_SKIP_CALIBRATION", False,
        "Serve a lossy profile without passing the quality gate (docs/quality.md): no probes are rendered or "
        "compared, and every sidecar and registry entry says quality status \"skipped\".", bool)
    calibration_psnr_db: float = _env_field(
        "ZFARM_CALIBRATION_PSNR_DB", 20.0,
        "Quality gate: the probes' mean PSNR (dB) against the bf16 references a lossy profile must reach.", float)
    calibration_ssim: float = _env_field(
        "ZFARM_CALIBRATION_SSIM", 0.6,
        "Quality gate: the probes' mean SSIM (luminance) a lossy profile must reach.", float)
    calibration_probe_psnr_db: float = _env_field(
        "ZFARM_CALIBRATION_PROBE_PSNR_DB", 16.0,
        "Quality gate: the PSNR (dB) every single probe must reach.", float)
    calibration_probe_ssim: float = _env_field(
        "ZFARM_CALIBRATION_PROBE_SSIM", 0.4,
        "Quality gate: the SSIM every single probe must reach.", float)
    calibration_probes: int = _env_field(
        "ZFARM_CALIBRATION_PROBES", 0,
        "How many of the probe set (shared/calibration_probes.json) the gate renders, from the first; 0: all.",
        int)
    calibration_size_px: int = _env_field(
        "ZFARM_CALIBRATION_SIZE_PX", 1024,
        "The probes' side in pixels (square); references are kept per size.", int)
    calibration_steps: int = _env_field(
        "ZFARM_CALIBRATION_STEPS", 8, "The probes' inference steps; references are kept per step count.", int)
    calibration_make_references: bool = _env_field(
        "ZFARM_CALIBRATION_MAKE_REFERENCES", True,
        "A worker whose lossy profile finds no references for its model renders them first with the fastest "
        "lossless profile it can run, and stores them for the whole farm. Off: it only waits for another's, "
        "or for `zfarm calibrate --reference`.", bool)
    calibration_wait_s: float = _env_field(
        "ZFARM_CALIBRATION_WAIT_S", 1800.0,
        "How long a worker waits for references another worker is rendering before it gives up on its lossy "
        "profiles (and serves a lossless one, or stops).", float)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            env = f.metadata["env"]
            if env not in environ:
                continue
            raw = environ[env]
            kind = f.metadata["kind"]
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise SettingsError(f"{env}={raw!r}: expected {kind.__name__} ({exc})") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **overrides) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def simulated(self) -> bool:
        return self.simulate_s >= 0


def settings_reference() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for each setting: the docs' settings table."""
    return [(f.metadata["env"], repr(f.default), f.metadata["doc"]) for f in fields(Settings)]


def settings_markdown() -> str:
    """docs/settings.md: `python -m shared.settings > docs/settings.md` (a test checks that they match)."""
    rows = "".join(f"| `{env}` | `{default}` | {doc} |\n" for env, default, doc in settings_reference())
    return ("# Settings\n\nEvery setting is an environment variable; `zfarm` and `zfarm worker` flags override "
            "them. Generated from `shared/settings.py`.\n\n| variable | default | meaning |\n|---|---|---|\n" + rows)


if __name__ == "__main__":
    print(settings_markdown(), end="")
