"""glmrel check: is a branch complete, consistent and servable? Light: no torch.

Reads config.json, the safetensors index and each shard's header (never tensor data), the
manifest, and replays vLLM's kernel rules, from a local folder or a published Hub revision
through one flow. Every problem becomes one failed check naming the file or tensor and what
was expected; nothing here raises a traceback for a bad branch.

Modules: report (the result), rules (each check), sources (a local folder, a Hub revision),
branch (the flow and the entry points). They import the checkpoint's layout (release.layout),
the manifest and vLLM's rules; nothing here imports the build.
"""

from .branch import check_branch, check_manifest_file, check_remote, check_source
from .report import CheckItem, CheckReport
from .rules import REQUIRED_FILES, THIRD_PARTY_HINT

__all__ = [
    "REQUIRED_FILES",
    "THIRD_PARTY_HINT",
    "CheckItem",
    "CheckReport",
    "check_branch",
    "check_manifest_file",
    "check_remote",
    "check_source",
]
