"""The worker process's settings and profile table, set once per process.

`zfarm worker` (`worker.__main__`) installs the Settings its flags and the environment make, before
the Celery app is configured; `celery -A worker.app ...`, which runs none of our code first, gets
`Settings.from_env()` on first use. Every Celery-side module asks here; none reads os.environ.
Pool processes inherit both through fork.
"""
from __future__ import annotations

from shared import profiles
from shared.settings import Settings

_settings: Settings | None = None
_table: dict | None = None


def install(settings: Settings) -> None:
    """Make `settings` this process's settings (and drop a table read under the old ones)."""
    global _settings, _table
    _settings, _table = settings, None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def table() -> dict:
    """The profile table `settings().profile_table` names (or the shipped one), read once."""
    global _table
    if _table is None:
        _table = profiles.load_table(settings().profile_table)
    return _table
