"""Calibration data: chat conversations -> tokenized samples, with a record of what was chosen."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import CalibrationSpec
from ..errors import ReleaseError, not_utf8


@dataclass(frozen=True)
class CalibrationProvenance:
    source: str
    kind: str  # "hub" or "file"
    split: str
    revision: str | None
    file_sha256: str | None
    rows_available: int
    num_samples: int
    seed: int
    max_seq_length: int
    indices_sha256: str
    total_tokens: int
    truncated_samples: int
    rendering: str = "tokenizer.apply_chat_template(messages, tokenize=False); add_special_tokens=False"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MESSAGES_HINT = (
    'each row\'s {col} must be a list of messages like [{{"role": "user", "content": "..."}}, '
    '{{"role": "assistant", "content": "..."}}], with string role and content'
)


def message_problem(messages: Any) -> str | None:
    """What is wrong with one row's chat messages, or None: a non-empty list of
    {role, content} objects whose role and content are strings."""
    if not isinstance(messages, list):
        return f"is a {type(messages).__name__}, not a list of messages"
    if not messages:
        return "is an empty list"
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {j} is a {type(m).__name__}, not an object with role and content"
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"a {type(m[key]).__name__}"
                return f"message {j}'s {key} is {got}, not a string"
    return None


def _bad_row(where: str, column: str, problem: str) -> ReleaseError:
    return ReleaseError(
        f"calibration {where}: {column} {problem}",
        hint=MESSAGES_HINT.format(col=column) + "; fix or drop that row (set calibration.messages_column if the "
        "conversations are in another column)",
    )


def _scan_jsonl(path: Path, column: str) -> None:
    """Validate a .jsonl file line by line before `datasets` reads it, so a bad line is named
    (datasets only says "An error occurred while generating the dataset")."""
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReleaseError(
                        f"calibration file {path} line {n} is not valid JSON ({e.msg}, column {e.colno})",
                        hint=f'each line of a .jsonl file is one JSON object, e.g. {{"{column}": [{{"role": "user", '
                        '"content": "..."}]}',
                    ) from e
                if not isinstance(row, dict):
                    raise _bad_row(f"file {path} line {n}", "the line", f"is a {type(row).__name__}, not an object")
                if column in row and (problem := message_problem(row[column])):
                    raise _bad_row(f"file {path} line {n}", column, problem)
        except UnicodeDecodeError as e:
            raise ReleaseError(
                not_utf8(f"calibration file {path}", e),
                hint="write the .jsonl file as UTF-8",
            ) from e


def load_messages(spec: CalibrationSpec):
    """Load the raw conversations as a `datasets.Dataset` (Hub id or local file)."""
    import datasets

    if spec.dataset is not None:
        try:
            ds = datasets.load_dataset(spec.dataset, split=spec.split, revision=spec.revision)
        except Exception as e:  # datasets raises many types for offline / missing repos
            raise ReleaseError(
                f"could not load calibration dataset {spec.dataset!r} (split {spec.split!r}): {e}",
                hint="check network access and the dataset id, or set calibration.path to a local .jsonl/.parquet",
            ) from e
    else:
        path = Path(spec.path)  # type: ignore[arg-type]
        if not path.is_file():
            raise ReleaseError(
                f"calibration file {path} does not exist", hint="set calibration.path to a .jsonl or .parquet file"
            )
        if path.stat().st_size == 0:
            raise ReleaseError(
                f"the calibration file {path} is empty",
                hint="add chat conversations, one JSON object with a messages list per line",
            )
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ReleaseError(f"calibration file {path} must be .jsonl, .json or .parquet")
        if path.suffix == ".jsonl":
            _scan_jsonl(path, spec.messages_column)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:
            raise ReleaseError(
                f"could not read calibration file {path}: {e}",
                hint="a .json file is one JSON array or JSON lines; a .parquet file needs a messages column",
            ) from e
    if spec.messages_column not in ds.column_names:
        raise ReleaseError(
            f"calibration data has no {spec.messages_column!r} column (columns: {', '.join(ds.column_names)})",
            hint="set calibration.messages_column to the column holding chat messages",
        )
    for i, messages in enumerate(ds[spec.messages_column]):
        if problem := message_problem(messages):
            raise _bad_row(f"row {i} of {spec.source_id}", spec.messages_column, problem)
    return ds


def build_calibration_set(spec: CalibrationSpec, tokenizer) -> tuple[Any, CalibrationProvenance]:
    """Choose `num_samples` conversations with the configured seed and tokenize them.

    Each conversation is rendered with the model's chat template (so calibration sees the
    exact token layout served by vLLM), then tokenized without adding special tokens again.
    """
    import datasets

    if not getattr(tokenizer, "chat_template", None):
        raise ReleaseError(
            "the base model's tokenizer has no chat template",
            hint="add chat_template.jinja (or tokenizer_config.json's chat_template) to the model folder",
        )
    raw = load_messages(spec)
    n_rows = len(raw)
    if n_rows == 0:
        raise ReleaseError("the calibration set is empty", hint="point calibration at a file or dataset with rows")
    if n_rows < spec.num_samples:
        raise ReleaseError(
            f"the calibration set has {n_rows} rows, fewer than calibration.num_samples={spec.num_samples}",
            hint="lower calibration.num_samples or use a larger calibration set",
        )
    order = list(range(n_rows))
    random.Random(spec.seed).shuffle(order)

    rows: dict[str, list] = {"input_ids": [], "attention_mask": []}
    chosen: list[int] = []
    truncated = 0
    for idx in order:
        if len(chosen) == spec.num_samples:
            break
        text = tokenizer.apply_chat_template(raw[idx][spec.messages_column], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(full) < spec.min_tokens:
            continue
        enc = tokenizer(text, max_length=spec.max_seq_length, truncation=True, padding=False, add_special_tokens=False)
        truncated += len(full) > spec.max_seq_length
        rows["input_ids"].append(enc["input_ids"])
        rows["attention_mask"].append(enc["attention_mask"])
        chosen.append(idx)
    if len(chosen) < spec.num_samples:
        raise ReleaseError(
            f"only {len(chosen)} of {n_rows} calibration conversations have at least {spec.min_tokens} tokens; "
            f"{spec.num_samples} are needed",
            hint="lower calibration.num_samples or calibration.min_tokens, or use longer conversations",
        )
    provenance = CalibrationProvenance(
        source=spec.source_id,
        kind="hub" if spec.dataset else "file",
        split=spec.split,
        revision=spec.revision,
        file_sha256=_file_sha256(Path(spec.path)) if spec.path else None,
        rows_available=n_rows,
        num_samples=len(chosen),
        seed=spec.seed,
        max_seq_length=spec.max_seq_length,
        indices_sha256=hashlib.sha256(json.dumps(chosen).encode()).hexdigest(),
        total_tokens=sum(len(x) for x in rows["input_ids"]),
        truncated_samples=truncated,
    )
    return datasets.Dataset.from_dict(rows), provenance
