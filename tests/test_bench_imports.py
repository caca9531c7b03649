"""bench/imports.py: the import-time tool reads `python -X importtime` and sums it per package."""
from __future__ import annotations

import json

from bench import imports

SAMPLE = """\
import time: self [us] | cumulative | imported package
import time:       120 |        120 |   _io
import time:     20000 |      20000 |     torch._C
import time:     15000 |      35120 |   torch
import time:       300 |        300 |     diffusers.utils.import_utils
import time:       700 |       1000 |   diffusers
some other line a module printed
"""


def test_importtime_lines_are_parsed_and_own_time_is_summed_per_top_level_package():
    rows = imports.parse_importtime(SAMPLE)
    assert rows[1] == ("torch._C", 0.02, 0.02)
    assert len(rows) == 5
    summary = imports.summarise(rows, top=2)
    assert summary["own_s_by_package"] == {"torch": 0.035, "diffusers": 0.001}
    assert [m["module"] for m in summary["slowest_modules"]] == ["torch._C", "torch"]
    assert summary["modules"] == 5 and summary["own_s_total"] == 0.036


def test_a_run_times_the_imports_in_a_fresh_interpreter_and_appends_its_record(tmp_path, capsys):
    # Generous `top` lists: what the interpreter imports at start-up (site, .pth files) and what this
    # machine compiles from source vary, and either can crowd a short list.
    record = imports.measure(top=50, imports="import json, email.message")
    assert record["wall_s"] > 0 and record["modules"] > 1
    assert any(name in record["own_s_by_package"] for name in ("json", "email"))

    jsonl = tmp_path / "imports.jsonl"
    assert imports.main(["--runs", "1", "--top", "50", "--jsonl", str(jsonl)]) == 0
    [line] = jsonl.read_text().splitlines()
    assert json.loads(line)["run"] == 1 and "torch" in json.loads(line)["own_s_by_package"]
    assert json.loads(capsys.readouterr().out.strip())["tool"] == "imports"
