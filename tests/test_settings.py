"""shared.settings: the cold-start and speed settings parse from the environment with their documented
defaults, and docs/settings.md is the table the code generates."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import Settings, SettingsError, settings_markdown

REPO = Path(__file__).resolve().parents[1]


def test_compile_cache_warm_up_and_prompt_cache_default_to_on():
    s = Settings.from_env({})

    assert s.compile_cache_dir == "~/.cache/zfarm/compile"
    assert s.warmup is True
    assert s.prompt_cache_size == 256


def test_the_environment_can_turn_each_of_them_off():
    s = Settings.from_env({"ZFARM_COMPILE_CACHE_DIR": "", "ZFARM_WARMUP": "0", "ZFARM_PROMPT_CACHE_SIZE": "0"})

    assert (s.compile_cache_dir, s.warmup, s.prompt_cache_size) == ("", False, 0)


def test_the_environment_sets_them():
    s = Settings.from_env({"ZFARM_COMPILE_CACHE_DIR": "/var/cache/zc", "ZFARM_WARMUP": "yes",
                           "ZFARM_PROMPT_CACHE_SIZE": "32"})

    assert (s.compile_cache_dir, s.warmup, s.prompt_cache_size) == ("/var/cache/zc", True, 32)


@pytest.mark.parametrize("env, value", [("ZFARM_WARMUP", "maybe"), ("ZFARM_PROMPT_CACHE_SIZE", "lots")])
def test_a_value_of_the_wrong_kind_is_refused_with_the_variable_named(env, value):
    with pytest.raises(SettingsError, match=env):
        Settings.from_env({env: value})


def test_docs_settings_md_is_the_table_generated_from_the_settings():
    assert (REPO / "docs" / "settings.md").read_text() == settings_markdown(), \
        "regenerate it: python -m shared.settings > docs/settings.md"
