"""What a person sees while glmrel works, and where the libraries' own output goes.

llm-compressor (loguru, to stdout), transformers, datasets and torch (Python logging) and
their progress bars would otherwise fill the console with hundreds of lines a user cannot act
on ("No accelerator available!" once a layer, a load report listing the MTP layer's tensors as
UNEXPECTED). While a long command runs, `library_output` sends all of it to a log file beside
the build (`glmrel -v` shows it instead), so the console holds glmrel's own progress, its
figures and what needs attention; a library message that matters is said in glmrel's words
(`load_report`). Under `--json`, `json_stdout` keeps standard output for the one JSON
document: anything else written there, by any library or child process, goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

# progress bars the libraries draw themselves (tqdm reads TQDM_DISABLE; the Hub client its own)
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def json_stdout() -> Iterator[Callable[[str], None]]:
    """Standard output reserved for one JSON document: while the block runs, file descriptor 1
    points at stderr (so a library's print, a C extension's or a child process's goes there);
    yields `emit(text)`, which writes to the real standard output."""
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. click's test runner)

        def emit_to_stream(text: str) -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        yield emit_to_stream
        return
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)

    def emit(text: str) -> None:
        sys.stdout.flush()
        os.write(saved, (text + "\n").encode())

    try:
        yield emit
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


class Console:
    """Where glmrel's own lines go (`out`, `err`), whatever the libraries' output is routed to."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err

    def echo(self, text: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        stream.write(text + "\n")
        stream.flush()


@contextmanager
def library_output(log_file: Path | None, verbose: bool = False) -> Iterator[Console]:
    """While the block runs, everything the process writes to its standard output and error
    at the file-descriptor level (llm-compressor's logger, transformers' and torch's logging,
    progress bars, warnings from C++, child processes such as torchrun's ranks) goes to
    `log_file`; glmrel's own lines go to the console through the yielded `Console`. With
    `verbose`, or where the streams are not real files (click's test runner), nothing is
    redirected and `Console` writes to the usual streams."""
    targets = []
    made: list[Path] = []  # the log's folders this call creates: removed again if nothing was logged
    if not verbose and log_file is not None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            targets = [sys.stdout.fileno(), sys.stderr.fileno()]
            folder = log_file.parent
            while not folder.exists() and folder != folder.parent:
                made.append(folder)
                folder = folder.parent
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        except (AttributeError, OSError, ValueError):
            targets = []
    if not targets:
        yield Console(sys.stdout, sys.stderr)
        return
    saved = [os.dup(fd) for fd in targets]
    console = Console(
        os.fdopen(os.dup(saved[0]), "w", encoding="utf-8", errors="replace", closefd=True),
        os.fdopen(os.dup(saved[1]), "w", encoding="utf-8", errors="replace", closefd=True),
    )
    for fd in targets:
        os.dup2(log_fd, fd)
    os.close(log_fd)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip(targets, saved):
            os.dup2(old, fd)
            os.close(old)
        console.out.close()
        console.err.close()
        if log_file is not None:
            _drop_if_empty(log_file, made)


def _drop_if_empty(log_file: Path, made: list[Path]) -> None:
    """A log nothing was written to is removed, with the folders made for it (the output_dir
    of a command refused before any work): a refused command leaves nothing behind."""
    try:
        if log_file.is_file() and not log_file.is_symlink() and log_file.stat().st_size == 0:
            log_file.unlink()
            for folder in made:  # deepest first; one that holds anything else stays
                folder.rmdir()
    except OSError:
        pass


class LoadReport(logging.Handler):
    """Collects transformers' load reports while a checkpoint loads (`load_report`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.messages.append(message)


@contextmanager
def load_report(mtp_layers: list[int], echo: Callable[[str], None]) -> Iterator[None]:
    """Load a checkpoint with transformers and say in glmrel's words what its load report
    means: the MTP layer's tensors are unused by the model class (expected: glmrel carries
    them over unquantized); anything else the report names is shown as needing attention."""
    handler = LoadReport()
    lg = logging.getLogger("transformers")
    lg.addHandler(handler)
    try:
        yield
    finally:
        lg.removeHandler(handler)
    for message in handler.messages:
        rows = re.findall(r"^(\S.*?)\s*\|\s*([A-Z_]+)\s*\|", _plain(message), flags=re.M)
        rows = [(k, s) for k, s in rows if k != "Key"]
        mtp = tuple(f"model.layers.{n}." for n in mtp_layers)
        expected = [k for k, s in rows if s == "UNEXPECTED" and k.startswith(mtp)]
        other = [(k, s) for k, s in rows if (k, s) not in {(e, "UNEXPECTED") for e in expected}]
        if expected:
            echo(
                f"the base checkpoint's MTP layer ({sum(map(_tensors_in_row, expected))} tensors under "
                f"{', '.join(p + '*' for p in mtp)}) is not part of transformers' model class: expected, "
                "glmrel carries it over unquantized"
            )
        if other:
            listed = ", ".join(f"{k} ({s})" for k, s in other[:5]) + (
                f" and {len(other) - 5} more" if len(other) > 5 else ""
            )
            echo(f"warning: transformers' load report names {len(other)} tensor(s) besides the MTP layer: {listed}")


def _tensors_in_row(key: str) -> int:
    """How many tensors one row of transformers' load report names: it folds the experts' names
    into one row (`mlp.experts.{0, 1, 2}.up_proj.weight`: three)."""
    count = 1
    for group in re.findall(r"\{([^{}]*)\}", key):
        count *= len([part for part in group.split(",") if part.strip()])
    return count


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class JsonOut:
    """A command's one JSON document under --json: `emit` writes it to the real standard output
    once; a command that fails before it emits gets an error document with what it had so far
    (`partial`) from the CLI's group."""

    def __init__(self, emit: Any) -> None:
        self._emit = emit
        self.partial: dict = {}
        self.emitted = False

    def emit(self, data: Any) -> None:
        self._emit(json.dumps(data, indent=2, sort_keys=True))
        self.emitted = True
