"""Prompts of a run and where their outputs go."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class PromptJob:
    """One prompt of a run; ``index`` is 1-based (it drives the seeds), ``output_index`` names files."""

    index: int
    prompt: str
    prompt_id: str = ""
    negative_prompt: str = ""

    @property
    def output_index(self) -> int:
        return self.index - 1


def read_prompts(prompt: str | None = None, prompt_file: str | Path | None = None) -> list[PromptJob]:
    """Prompts from ``--prompt`` or a file: one per line (.txt), or JSONL when the first line starts with '{'
    (keys ``id``/``prompt_id`` and ``text``/``prompt``/``caption``, optional ``negative_prompt``)."""
    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of a prompt or a prompt file")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        return [PromptJob(1, prompt.strip())]
    path = Path(prompt_file)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompt file {path} has no prompts")
    if lines[0].lstrip().startswith("{"):
        return [_jsonl_job(i, line, path) for i, line in enumerate(lines, start=1)]
    return [PromptJob(i, line.strip()) for i, line in enumerate(lines, start=1)]


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without the byte order mark some editors write first (left in,
    it would hide the '{' that marks a JSONL file)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                          f"offset {error.start}): save it with UTF-8 encoding") from None


def _jsonl_job(index: int, line: str, path: Path) -> PromptJob:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} line {index} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} line {index} is a JSON {type(record).__name__}, not an object: write each line "
                          'as {"prompt": "...", "negative_prompt": "..."}')
    text = next((record[k] for k in ("text", "prompt", "caption") if record.get(k)), None)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{path} line {index} has no 'text', 'prompt' or 'caption'")
    prompt_id = str(record.get("id", record.get("prompt_id", "")))
    return PromptJob(index, text.strip(), prompt_id, str(record.get("negative_prompt", "")))


def output_path(folder: str | Path, stem: str, suffix: str, *, overwrite: bool) -> Path:
    """``folder/stem.suffix``, or the first free ``stem_N.suffix`` so earlier results are kept."""
    folder = Path(folder)
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while not overwrite and candidate.exists():
        candidate = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return candidate
