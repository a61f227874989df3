"""Prompt files: a UTF-8 byte order mark is tolerated (a JSONL file stays JSONL), and a file that is not
UTF-8 or a JSONL line that is JSON but not an object is refused with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelwizard_core.errors import ConfigError
from pixelwizard_core.pipeline.jobs import read_prompts


def test_jsonl_with_a_byte_order_mark_is_read_as_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"id": "a", "prompt": "a fox"}\n{"text": "a cat"}\n'.encode())
    jobs = read_prompts(prompt_file=path)
    assert [(j.prompt_id, j.prompt) for j in jobs] == [("a", "a fox"), ("", "a cat")]


def test_text_with_a_byte_order_mark_loses_it(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a fox\n", encoding="utf-8-sig")
    assert read_prompts(prompt_file=path)[0].prompt == "a fox"


def test_non_utf8_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("un caf\u00e9 la nuit\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"prompts.txt is not UTF-8 text \(byte 0xe9 at offset 6\): save it with "
                                          r"UTF-8 encoding"):
        read_prompts(prompt_file=path)


@pytest.mark.parametrize("line, kind", [('["a fox"]', "list"), ('"a fox"', "str"), ("42", "int")])
def test_jsonl_line_that_is_not_an_object_is_refused(tmp_path: Path, line: str, kind: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a fox"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"prompts.jsonl line 2 is a JSON {kind}, not an object: write each line "
                                          r'as \{"prompt"'):
        read_prompts(prompt_file=path)
