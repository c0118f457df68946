"""The release config's reference (`docs/config.md`), made from `ReleaseConfig`'s own fields:
every key, its type, default and description, so the page cannot drift from what `load_config`
accepts (tests/test_config.py compares the two; `make docs` rewrites the page)."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import ReleaseConfig

HEADER = """# The release config

A release is one YAML file (`configs/glm-4.7.yaml` is the reference release, `configs/demo.yaml`
the embedded demo). Relative paths are read from the config's own folder. Unknown keys are
refused. This page is made from the config's own definition (`release/config.py`) by
`make docs`.

| key | type | default | what it sets |
| --- | --- | --- | --- |
"""


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    return text.replace("|", "or").replace("<class '", "").replace("'>", "")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "`[]`"
    if isinstance(field.default, BaseModel):
        return "see below"
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows, nested = [], []
    hints = typing.get_type_hints(model)
    for name, field in model.model_fields.items():
        annotation = hints[name]
        key = f"{prefix}{name}"
        inner = typing.get_args(annotation) or (annotation,)
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            kind = "list of sections" if typing.get_origin(annotation) is list else "section"
            doc = " ".join((models[0].__doc__ or "").split())
            rows.append(f"| `{key}` | {kind} | {_default(field)} | {doc} |")
            nested.append((models[0], f"{key}[]." if kind == "list of sections" else f"{key}."))
        else:
            doc = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{key}` | {_type(annotation)} | {_default(field)} | {doc} |")
    for sub, sub_prefix in nested:
        rows += _rows(sub, sub_prefix)
    return rows


def reference_markdown() -> str:
    return HEADER + "\n".join(_rows(ReleaseConfig)) + "\n"


if __name__ == "__main__":  # python -m release.reference docs/config.md
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    text = reference_markdown()
    if target is None:
        print(text, end="")
    else:
        target.write_text(text)
