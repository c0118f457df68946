"""Per-branch llm-compressor recipes, rendered from the readable template in recipes/."""

from __future__ import annotations

from pathlib import Path

import jinja2
import yaml

from ..architecture import Glm4MoeArch
from ..config import AwqSpec, BranchSpec
from ..errors import ReleaseError


def render_recipe(template: Path, arch: Glm4MoeArch, branch: BranchSpec, awq: AwqSpec) -> str:
    """Fill the recipe template for one branch; the result is what oneshot runs and the branch keeps."""
    if not template.is_file():
        raise ReleaseError(f"recipe template {template} does not exist", hint="set recipe: to a file in recipes/")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    hint = "recipes/glm4moe_awq_w4a16.yaml.j2 is the recipe glmrel ships; start from it"
    try:
        source = template.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        raise ReleaseError(f"cannot read recipe template {template}: {e}", hint=hint) from e
    try:
        text = env.from_string(source).render(
            group_size=branch.group_size,
            n_grid=awq.n_grid,
            duo_scaling=str(awq.duo_scaling),
            dense_layers=arch.dense_layers,
            moe_layers=arch.moe_layers,
        )
    except jinja2.TemplateError as e:
        raise ReleaseError(f"recipe template {template} failed to render: {e}", hint=hint) from e
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ReleaseError(f"recipe rendered from {template} is not valid YAML: {e}", hint=hint) from e
    if not isinstance(parsed, dict):
        raise ReleaseError(f"recipe rendered from {template} is not a YAML mapping", hint=hint)
    return text


def recipe_weight_args(recipe_text: str) -> dict:
    """The weight quantization arguments of a rendered recipe (what the branch must carry)."""
    parsed = yaml.safe_load(recipe_text)
    for stage in parsed.values():
        for mods in stage.values():
            qm = mods.get("QuantizationModifier") if isinstance(mods, dict) else None
            if qm:
                return qm["config_groups"]["group_0"]["weights"]
    raise ReleaseError("recipe has no QuantizationModifier config_groups.group_0.weights")
