"""Long producer operations (validating a large file, collecting a batch) show a bar on a terminal."""
from __future__ import annotations

import io

from producer.files import parse_prompt_file
from producer.progress import CountBar


def test_a_bar_is_drawn_on_a_terminal_for_a_large_operation_and_ends_its_line():
    out = io.StringIO()
    bar = CountBar("collecting", out, tty=True)
    for done in range(1, 1001):
        bar(done, 1000)
    bar.close()
    text = out.getvalue()
    assert text.endswith("collecting [" + "#" * 30 + "] 1000/1000\n")
    assert text.count("\r") <= 12  # redrawn every tenth, not every item


def test_no_bar_when_piped_or_for_a_small_operation():
    piped, small = io.StringIO(), io.StringIO()
    for stream, tty, total in ((piped, False, 5000), (small, True, 10)):
        bar = CountBar("validating", stream, tty=tty)
        for done in range(1, total + 1):
            bar(done, total)
        bar.close()
    assert piped.getvalue() == "" and small.getvalue() == ""


def test_validating_a_prompt_file_reports_progress_line_by_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(300)))
    seen = []
    entries = parse_prompt_file(str(path), on_progress=lambda done, total: seen.append((done, total)))
    assert len(entries) == 300 and seen[-1] == (300, 300) and len(seen) == 300
