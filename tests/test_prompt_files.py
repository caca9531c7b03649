"""Prompt files are parsed whole: every error names file, line and field, and a bad file yields no jobs."""
from __future__ import annotations

import io

import pytest

from producer.cli import main
from producer.files import MAX_ERRORS, PromptFileError, parse_prompt_file


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def errors_of(path: str, **kwargs) -> list[tuple[str, int, str]]:
    with pytest.raises(PromptFileError) as caught:
        parse_prompt_file(path, **kwargs)
    return [(e.file, e.line, e.field) for e in caught.value.errors]


# Text files
def test_a_text_file_skips_blank_lines_and_comments_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path, "p.txt", "# a comment\n\na red fox\n   \n  # indented comment\n  a lighthouse  \n")
    entries = parse_prompt_file(path)
    assert [(e.line, e.spec.prompt) for e in entries] == [(3, "a red fox"), (6, "a lighthouse")]


def test_cli_defaults_apply_to_every_job(tmp_path):
    path = write(tmp_path, "p.txt", "one\ntwo\n")
    entries = parse_prompt_file(path, defaults={"width": 512, "height": 768, "steps": 4, "seed": 7})
    assert {(e.spec.width, e.spec.height, e.spec.steps, e.spec.seed) for e in entries} == {(512, 768, 4, 7)}


def test_jobs_without_a_seed_each_get_their_own(tmp_path):
    entries = parse_prompt_file(write(tmp_path, "p.txt", "same\nsame\nsame\n"))
    assert len({e.spec.seed for e in entries}) == 3


def test_a_text_file_with_only_comments_is_refused(tmp_path):
    assert errors_of(write(tmp_path, "p.txt", "# nothing\n\n")) == [(str(tmp_path / "p.txt"), 0, "file")]


def test_a_prompt_longer_than_the_limit_is_refused_with_its_line(tmp_path):
    path = write(tmp_path, "p.txt", "fine\n" + "x" * 2001 + "\n")
    assert errors_of(path) == [(path, 2, "prompt")]


def test_a_bad_cli_default_is_reported_on_every_line_it_breaks(tmp_path):
    path = write(tmp_path, "p.txt", "a\nb\n")
    assert errors_of(path, defaults={"width": 1000}) == [(path, 1, "width"), (path, 2, "width")]


# JSON lines
def test_a_jsonl_file_takes_every_optional_field(tmp_path):
    path = write(tmp_path, "p.jsonl",
                 '{"prompt": "fox", "negative_prompt": "blur", "width": 512, "height": 256, "steps": 4, '
                 '"guidance": 1.5, "seed": 42}\n\n{"prompt": "owl"}\n')
    first, second = parse_prompt_file(path, defaults={"steps": 6})
    assert (first.line, first.spec.negative_prompt, first.spec.width, first.spec.height, first.spec.steps,
            first.spec.guidance, first.spec.seed) == (1, "blur", 512, 256, 4, 1.5, 42)
    assert (second.line, second.spec.steps) == (3, 6)


@pytest.mark.parametrize("line, field", [
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": "   "}', "prompt"),
    ('{"negative_prompt": "no prompt at all"}', "prompt"),
    ('{"prompt": "x", "width": 1000}', "width"),
    ('{"prompt": "x", "height": 4096}', "height"),
    ('{"prompt": "x", "steps": 0}', "steps"),
    ('{"prompt": "x", "steps": 2.5}', "steps"),
    ('{"prompt": "x", "guidance": NaN}', "guidance"),
    ('{"prompt": "x", "guidance": Infinity}', "guidance"),
    ('{"prompt": "x", "width": NaN}', "width"),
    ('{"prompt": "x", "seed": -1}', "seed"),
    ('{"prompt": "x", "colour": "red"}', "colour"),
    ('{"prompt": 3}', "prompt"),
    ('["prompt", "x"]', "job"),
    ('{"prompt": "x",', "json"),
    ("a plain line in a jsonl file", "json"),
])
def test_each_bad_jsonl_line_is_named_with_its_field(tmp_path, line, field):
    path = write(tmp_path, "p.jsonl", '{"prompt": "good"}\n' + line + "\n")
    assert errors_of(path) == [(path, 2, field)]


def test_all_errors_of_a_file_are_reported_together(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": ""}\n{"prompt": "ok"}\n{"prompt": "x", "steps": 0}\nnope\n')
    assert errors_of(path) == [(path, 1, "prompt"), (path, 3, "steps"), (path, 4, "json")]


def test_errors_beyond_the_cap_are_counted_not_listed(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": ""}\n' * (MAX_ERRORS + 7))
    with pytest.raises(PromptFileError) as caught:
        parse_prompt_file(path)
    assert len(caught.value.errors) == MAX_ERRORS and caught.value.more == 7
    assert "27 error(s)" in str(caught.value)


def test_an_error_message_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"prompt": "x", "width": 1000}\n')
    with pytest.raises(PromptFileError) as caught:
        parse_prompt_file(path)
    assert f"{path}:1: width: must be a multiple of 16, got 1000" in str(caught.value)


# CSV
def test_a_csv_file_reads_its_columns_and_leaves_empty_cells_to_the_defaults(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,width,seed\n\"a fox, red\",512,\nowl,,9\n")
    fox, owl = parse_prompt_file(path, defaults={"width": 768, "seed": 1})
    assert (fox.line, fox.spec.prompt, fox.spec.width, fox.spec.seed) == (2, "a fox, red", 512, 1)
    assert (owl.line, owl.spec.width, owl.spec.seed) == (3, 768, 9)


def test_a_csv_without_a_prompt_column_is_refused_at_its_header(tmp_path):
    path = write(tmp_path, "p.csv", "text,width\nfox,512\n")
    assert errors_of(path) == [(path, 1, "prompt")]


def test_a_csv_with_an_unknown_column_is_refused_at_its_header(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,sampler\nfox,euler\n")
    assert errors_of(path) == [(path, 1, "sampler")]


@pytest.mark.parametrize("row, field", [
    (",512", "prompt"),
    ("fox,1000", "width"),
    ("fox,512,extra", "csv"),
    ("fox,wide", "width"),
])
def test_each_bad_csv_row_is_named_with_its_line_and_field(tmp_path, row, field):
    path = write(tmp_path, "p.csv", "prompt,width\nok,512\n" + row + "\n")
    assert errors_of(path) == [(path, 3, field)]


def test_a_csv_nan_guidance_is_refused(tmp_path):
    path = write(tmp_path, "p.csv", "prompt,guidance\nfox,nan\n")
    assert errors_of(path) == [(path, 2, "guidance")]


# Files as a whole
def test_an_unknown_suffix_is_refused(tmp_path):
    path = write(tmp_path, "p.yaml", "prompt: x\n")
    assert errors_of(path) == [(path, 0, "file")]


def test_a_missing_file_is_refused_with_its_name(tmp_path):
    path = str(tmp_path / "absent.txt")
    assert errors_of(path) == [(path, 0, "file")]


def test_a_file_that_is_not_utf8_is_refused_at_the_bad_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    assert errors_of(str(path)) == [(str(path), 2, "encoding")]


# Stdin
def test_stdin_with_plain_lines_is_read_as_text():
    entries = parse_prompt_file("-", stdin=io.StringIO("\n# c\na fox\nan owl\n"))
    assert [(e.line, e.spec.prompt) for e in entries] == [(3, "a fox"), (4, "an owl")]


def test_stdin_starting_with_a_json_object_is_read_as_json_lines():
    entries = parse_prompt_file("-", stdin=io.StringIO('\n{"prompt": "fox", "steps": 3}\n{"prompt": "owl"}\n'))
    assert [(e.line, e.spec.prompt, e.spec.steps) for e in entries] == [(2, "fox", 3), (3, "owl", 8)]


def test_bad_stdin_is_refused_naming_stdin_and_line():
    with pytest.raises(PromptFileError) as caught:
        parse_prompt_file("-", stdin=io.BytesIO(b'{"prompt": "fox"}\n{"prompt": "x", "steps": 0}\n'))
    assert [(e.file, e.line, e.field) for e in caught.value.errors] == [("<stdin>", 2, "steps")]


# The command line
def test_the_cli_refuses_a_bad_file_with_exit_2_and_one_line_per_error(tmp_path, capsys):
    path = write(tmp_path, "p.jsonl", '{"prompt": ""}\n{"prompt": "x", "steps": 0}\n')
    # No Redis is reachable at this URL: a bad file is refused before any connection is made.
    assert main(["--redis-url", "redis://127.0.0.1:1/0", "submit", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"zfarm: refused {path}: 2 error(s); nothing was queued",
                                f"  {path}:1: prompt: is empty",
                                f"  {path}:2: steps: must be in [1, 50], got 0"]
    assert "Traceback" not in err
