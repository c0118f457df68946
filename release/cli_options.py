"""What every glmrel command shares: the --config option, loading the config, the one JSON
document under --json, glmrel's own lines on the console, and the libraries' output sent to a
log (`release/cli.py` and `release/cli_serving.py` build their commands from these)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .console import JsonOut

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
JSON_KEY = "glmrel.json"


def config_option(f):
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=lambda: os.environ.get("GLMREL_CONFIG", str(DEFAULT_CONFIG)),
        show_default="$GLMREL_CONFIG or configs/demo.yaml",
        help="Release config (YAML).",
    )(f)


def load(config_path: Path):
    from .config import load_for_run

    return load_for_run(config_path)


def json_mode(as_json: bool) -> JsonOut | None:
    """Under --json, standard output holds exactly one JSON document whatever happens: every
    other write to it (glmrel's progress, a library's print, a child process) goes to stderr
    until the command ends (`console.json_stdout`)."""
    if not as_json:
        return None
    from .console import json_stdout

    ctx = click.get_current_context()
    out = JsonOut(ctx.with_resource(json_stdout()))
    ctx.meta[JSON_KEY] = out
    return out


CONSOLE_KEY = "glmrel.console"


def say(text: str, err: bool = False) -> None:
    """One of glmrel's own lines, on the console even while the libraries' output goes to
    their log (`quiet_libraries`)."""
    console = click.get_current_context().meta.get(CONSOLE_KEY)
    if console is not None:
        console.echo(text, err=err)
    else:
        click.echo(text, err=err)


def emit(data, out: JsonOut | None, text: str) -> None:
    if out is not None:
        out.emit({"ok": True, **data} if isinstance(data, dict) else data)
    else:
        say(text)


def progress(as_json: bool):
    """Where progress lines go: stdout for people, stderr under --json (stdout then holds
    exactly one JSON document)."""
    return lambda s: say(s, err=as_json)


def quiet_libraries(cfg, command: str, as_json: bool) -> None:
    """For the rest of the command, everything the libraries write goes to
    <output_dir>/.glmrel-cache/logs/<command>.log (`glmrel -v`: to the console as before);
    glmrel's own lines (`say`) stay on the console."""
    from .console import library_output
    from .manifest import CACHE_DIR

    ctx = click.get_current_context()
    verbose = bool((ctx.find_root().obj or {}).get("verbose"))
    log = cfg.output_dir / CACHE_DIR / "logs" / f"{command}.log"
    if not verbose:
        say(f"the libraries' output goes to {log} (glmrel -v shows it here)", err=as_json)
    ctx.meta[CONSOLE_KEY] = ctx.with_resource(library_output(log, verbose))
