"""Every zfarm exception, under one root: `ZfarmError`.

Callers at an edge (the CLI, a task, the worker's boot) catch `ZfarmError` once. Each class also
derives from the built-in exception whose meaning it shares (ValueError for bad input, RuntimeError
for a failed operation), so code written against those keeps working. Errors that cross the wire
travel as data (a job's stored failure reason), never as pickled exceptions.
"""
from __future__ import annotations


class ZfarmError(Exception):
    """Raised when anything zfarm does fails in a way zfarm itself recognises; the root of all below."""


# Configuration and input
class SettingsError(ZfarmError, ValueError):
    """Raised when an environment variable holds a value of the wrong kind."""


class RedisUrlError(ZfarmError, ValueError):
    """Raised when a Redis or Sentinel URL cannot be read (no host, a bad port or database)."""


class UsageError(ZfarmError, ValueError):
    """Raised when command-line options do not go together in a way argparse cannot see."""


class JobError(ZfarmError, ValueError):
    """Raised when a job or one of its fields is invalid. `field` names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class PromptFileError(ZfarmError, ValueError):
    """Raised when a prompt file cannot be queued. `errors` lists every (file, line, field, message)
    found (`producer.files.FileError`), up to a cap; `more` counts those beyond it."""

    def __init__(self, errors: list, more: int = 0):
        self.errors = list(errors)
        self.more = more
        head = f"{len(self.errors) + more} error(s); nothing was queued"
        super().__init__(head + "".join(f"\n  {e}" for e in self.errors)
                         + (f"\n  ... and {more} more" if more else ""))

    @property
    def first_line(self) -> str:
        """One line for a terminal: the first error and how many others there are."""
        rest = len(self.errors) + self.more - 1
        return str(self.errors[0]) + (f" (and {rest} more error(s))" if rest else "")


class DefaultsError(ZfarmError, ValueError):
    """Raised when a default meant for every job (a CLI flag, the API's `defaults`) is invalid.
    `errors` holds one JobError per bad field, reported once rather than on every line."""

    def __init__(self, errors: list):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors) + "; nothing was queued")


class DuplicateKey(ZfarmError, ValueError):
    """Raised when a JSON object names one key twice (JSON parsers keep the last silently)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class WebhookRefused(ZfarmError, ValueError):
    """Raised when a webhook URL is not http(s), names no host, cannot be resolved, or resolves to an
    address webhooks may not reach (loopback, link-local, private, metadata...)."""


class SubmitError(ZfarmError, ValueError):
    """Raised when a submission is refused before anything was queued (a bad option, a job no worker
    can render)."""


class SubmitConflict(SubmitError):
    """Raised when a batch name or idempotency key already used is submitted again with other content
    (jobs, priority or webhook); the message names the differences."""


# Queue state and storage
class RedisAuthError(ZfarmError, RuntimeError):
    """Raised when Redis refuses a URL's credentials (a wrong password, or none where one is needed):
    a configuration error, never retried."""


class LedgerError(ZfarmError, RuntimeError):
    """Raised when a batch is unknown or a transition is impossible."""


class StorageError(ZfarmError, RuntimeError):
    """Raised when a result cannot be stored or read."""


class Refused(ZfarmError, ValueError):
    """Raised when a queue item is not a zfarm job message; the text says why."""


class JobFailed(ZfarmError):
    """Raised when a job failed; its reason is already stored in the ledger."""


class RenderFailure(ZfarmError):
    """Raised inside the render task when a job fails for a reason of its own (a render error, its time
    limit, out of memory, the upload); the task stores `kind` and `message` as the job's reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


# Profiles and the GPU engine
class ProfileError(ZfarmError, ValueError):
    """Raised when a profile cannot be used: unknown, not applicable on this device, or its setup
    failed."""


class NoProfileFits(ProfileError):
    """Raised when no measured profile fits the requested class and host."""


class OutOfMemory(ZfarmError, RuntimeError):
    """Raised when a render ran out of device memory and no smaller profile is left."""


class BadOutput(ZfarmError, RuntimeError):
    """Raised when a render's pixels are not finite or are constant (NaN, black): the boot self-test."""


class NoWorkingProfile(ZfarmError, RuntimeError):
    """Raised when every profile a worker may run failed its boot self-test; `attempts` holds each
    profile tried with the kind of failure and its error."""

    def __init__(self, attempts: list[dict]):
        self.attempts = list(attempts)
        lines = [f"  - {a['profile']}: {a['kind']}: {a['error']}" for a in self.attempts]
        super().__init__("no profile this worker may run passed its boot self-test:\n" + "\n".join(lines))


class QualityFailed(ZfarmError, RuntimeError):
    """Raised when a lossy profile may not serve: its probe images differ from the bf16 references by more
    than the quality gate's thresholds allow, or there are no references to judge them by. `quality` holds
    the quality block; `try_safer` is False when a safer variant could not pass either (no references)."""

    def __init__(self, message: str, quality: dict | None = None, try_safer: bool = True):
        super().__init__(message)
        self.quality = dict(quality or {})
        self.try_safer = try_safer


class CalibrationError(ZfarmError, RuntimeError):
    """Raised when the quality gate cannot run: no references and no way to make them, or the farm's
    storage or Redis unreachable while it reads or writes them."""


class PinError(ZfarmError, RuntimeError):
    """Raised when a host buffer cannot be page-locked, or torch does not see it as pinned."""


class ModelNotFound(ZfarmError, RuntimeError):
    """Raised when the model could not be found or downloaded. The message lists each source tried
    and why it failed (`tried`), then `hint`: how to point ZFARM_MODEL at a local folder."""

    def __init__(self, model: str, tried: list[str], hint: str = ""):
        self.model = model
        self.tried = list(tried)
        lines = [f"cannot load the Z-Image pipeline {model!r}. Tried:"]
        lines += [f"  - {t}" for t in tried]
        super().__init__("\n".join(lines + ([hint] if hint else [])))


class CheckpointError(ZfarmError, RuntimeError):
    """Raised when a component's .safetensors files cannot be read tensor by tensor: no file, a header
    that is not a safetensors header, a dtype the loader does not read, a file that ends early, or a
    tensor of the model that no file holds."""


class FetchError(ZfarmError, RuntimeError):
    """Raised when the weights cannot be downloaded or converted; the message says what to do."""


# Worker processes
class GpuSpecError(ZfarmError, ValueError):
    """Raised when a --gpus value cannot be read or names a card that is not there."""


class DemoError(ZfarmError, RuntimeError):
    """Raised when the demo cannot run; the message says what to look at."""
