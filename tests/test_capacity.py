"""Scaling advice arithmetic: drain time per tier, workers to add or remove for a deadline."""
from __future__ import annotations

import json

import pytest

from farm_fixtures import TEST_TABLE
from shared.capacity import Backlog, advise, finish_s, parse_duration_s

TABLE = json.loads(TEST_TABLE.read_text())
SMALL, BIG = 1024 * 1024, 2048 * 2048  # class 12 and class 24 max_pixels in the test table


def test_drain_time_is_work_over_the_fleet_rate():
    backlog = [Backlog("any", 100, 100.0)]
    assert finish_s(backlog, [(SMALL, 2.0), (BIG, 1.0)], {12: SMALL, 24: BIG}) == pytest.approx(100 / 1.5)


def test_large_jobs_only_count_against_workers_that_can_render_them():
    backlog = [Backlog("any", 10, 10.0), Backlog("c24", 100, 400.0)]
    # The 24 GB worker alone must do the 400 units of large work: 400 s, where the fleet rate (2/s)
    # would suggest 205 s.
    assert finish_s(backlog, [(SMALL, 1.0), (BIG, 1.0)], {12: SMALL, 24: BIG}) == pytest.approx(400.0)


def test_work_no_live_worker_can_do_means_no_finish_time_and_is_named():
    advice = advise([Backlog("c24", 5, 20.0)], [{"vram_class": 12, "max_pixels": SMALL, "s_per_image": 2.0}],
                    TABLE, deadline_s=3600)
    assert advice.expected_finish_s is None and advice.stranded_tiers == ["c24"]
    # Any class that can render the large jobs will do (the test table gives 48 and 80 the 24's profile).
    assert advice.meets_deadline is False and advice.add == {"24": 1, "48": 1, "80": 1}


def test_a_late_fleet_is_told_how_many_workers_of_each_class_to_add():
    workers = [{"vram_class": 12, "max_pixels": SMALL, "s_per_image": 2.0}]
    advice = advise([Backlog("any", 3600, 3600.0)], workers, TABLE, deadline_s=3600)
    assert advice.expected_finish_s == pytest.approx(7200)
    # 1 img/s needed; the 12 GB worker gives 0.5: one more 24 GB card (1/s) or one more 12 GB card.
    assert advice.add == {"12": 1, "16": 1, "24": 1, "48": 1, "80": 1} and advice.meets_deadline is False


def test_an_early_fleet_is_told_which_workers_could_go():
    workers = [{"vram_class": 24, "max_pixels": BIG, "s_per_image": 1.0},
               {"vram_class": 12, "max_pixels": SMALL, "s_per_image": 2.0}]
    advice = advise([Backlog("any", 100, 100.0)], workers, TABLE, deadline_s=3600)
    assert advice.meets_deadline is True and advice.remove == {"12": 1}


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("120", 120)])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "1h30", "-5m", "-1", "0", "nan", "inf", "-inf"])
def test_unreadable_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration_s(text)
