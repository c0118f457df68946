"""glmrel publish: a plan against the remote's refs, then its application (git or Hub).

Each quant branch holds exactly its folder's files (no landing page); `main` holds the
landing page; a repo-wide tag (`v1`) and one immutable tag per branch (`v1-W4A16_GS64`).
Both backends commit on top of the head the plan saw and fail if it moved (a concurrent
publisher), skip what the remote already has (a second run does nothing, an interrupted run
resumes), and never move a published tag.

- git (`GitRemote`, any URL or path): orphan branches built with git plumbing in a local
  cache repository, pushed with `--force-with-lease`; annotated tags.
- Hub (`HubRemote`, `hf://owner/name`): huggingface_hub's HfApi; branches start from the
  repo's initial commit; one `create_commit` per branch with `parent_commit`.

Modules: plan (what publish will do, what a read-back found), git_remote and hub_remote (the
two backends), steps (open the remote, plan, apply, read back). They import check, config,
manifest and render; nothing here imports the build.
"""

from .git_remote import GitRemote, check_git_remote
from .hub_remote import HubRemote, hub_repo_id
from .plan import BranchPlan, FileChange, Plan, RemoteCheck, TagPlan
from .steps import apply_plan, check_landing, check_remote_name, open_remote, plan_publish, verify_published

__all__ = [
    "BranchPlan",
    "FileChange",
    "GitRemote",
    "HubRemote",
    "Plan",
    "RemoteCheck",
    "TagPlan",
    "apply_plan",
    "check_git_remote",
    "check_landing",
    "check_remote_name",
    "hub_repo_id",
    "open_remote",
    "plan_publish",
    "verify_published",
]
