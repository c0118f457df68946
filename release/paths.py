"""Where glmrel's shipped files live: in a source checkout, beside the package (`templates/`,
`recipes/`); in an installed wheel, under the environment's data directory
(`<prefix>/share/glmrel/`), where pyproject's `data-files` put them."""

from __future__ import annotations

import sysconfig
from pathlib import Path

SHARE = Path("share") / "glmrel"


def shipped(name: str) -> Path:
    """The folder `name` (templates, recipes) of this checkout, else of the installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    return Path(sysconfig.get_path("data")) / SHARE / name
