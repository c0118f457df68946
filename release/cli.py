"""The `glmrel` command line: parse options, call one library function, format its result.

Library errors (`ReleaseError`) become `Error: ...` / `Hint: ...` and exit status 1; set
GLMREL_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from . import __version__
from .cli_options import CONSOLE_KEY, JSON_KEY
from .cli_options import config_option as _config_option
from .cli_options import emit as _emit
from .cli_options import json_mode as _json_mode
from .cli_options import load as _load
from .cli_options import progress as _progress
from .cli_options import quiet_libraries as _quiet_libraries
from .cli_options import say as _say
from .cli_serving import ablate_cmd, eval_cmd, vllm_check_cmd
from .errors import ReleaseError
from .layout import SUPPORTED_GROUP_SIZES

BUG_HINT = "run again with GLMREL_DEBUG=1 to see the traceback, and report it with the command you ran"


class GlmrelGroup(click.Group):
    """Turns a ReleaseError (and any unforeseen exception) into one clear message plus a hint
    and a non-zero exit; under --json, also one JSON document with the error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ReleaseError as e:
            if os.environ.get("GLMREL_DEBUG"):
                raise
            self._fail(ctx, e.message, e.hint)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a bug, or a library failure glmrel did not foresee: no traceback either
            if os.environ.get("GLMREL_DEBUG"):
                raise
            self._fail(ctx, f"unexpected {type(e).__name__}: {e}", BUG_HINT)

    @staticmethod
    def _fail(ctx: click.Context, message: str, hint: str | None) -> None:
        out = ctx.meta.get(JSON_KEY)
        if out is not None and not out.emitted:  # the command's redirection has ended: stdout is stdout
            document = {**out.partial, "ok": False, "error": message, "hint": hint}
            click.echo(json.dumps(document, indent=2, sort_keys=True))
            out.emitted = True
        click.secho(f"Error: {message}", fg="red", err=True)
        if hint:
            click.echo(f"Hint: {hint}", err=True)
        ctx.exit(1)


@click.group(cls=GlmrelGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glmrel")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also show the libraries' logs and progress bars (llm-compressor, transformers, torch) on stderr; "
    "without it they go to <output_dir>/.glmrel-cache/logs/<command>.log.",
)
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Build, verify, describe and publish quantized GLM-4-MoE releases for vLLM.

    A release is one base model quantized into several Hub branches (e.g. W4A16_GS32,
    W4A16_GS64, W4A16_GS128) plus a landing page on main. Typical flow:

    \b
      glmrel build-all          # quantize + verify every branch (skips unchanged ones)
      glmrel check out/demo/W4A16_GS64
      glmrel render
      glmrel publish --changelog v1 --dry-run

    Every command reads the release config given by --config (default: the embedded demo).
    """
    ctx.obj = {"verbose": verbose}


@cli.command("demo-assets")
def demo_assets_cmd() -> None:
    """Build the embedded demo's tiny GLM-4-MoE, calibration file and held-out text.

    Built once (about a minute on 2 cores) and cached under .cache/; configs/demo.yaml
    reads them through the .cache/demo link.
    """
    from .tiny import default_cache_root, ensure_demo_assets

    assets = ensure_demo_assets(log=click.echo)
    link = default_cache_root() / "demo"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(assets.root.name)
    click.echo(f"demo assets: {assets.root}")


_gpus_option = click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Calibrate data-parallel on this many GPUs (llm-compressor's engine, launched with torchrun; "
    "each GPU calibrates its share of the samples, rank 0 writes the branch).",
)


_separate_option = click.option(
    "--separate",
    is_flag=True,
    help="Calibrate each branch in a pass of its own (default, on one GPU or several: one pass for all "
    "of them, the first branch's smoothed layers propagating; the others are smoothed beside it).",
)


@cli.command()
@_config_option
@click.option(
    "--branch",
    "branch_names",
    required=True,
    multiple=True,
    help="Branch name from the config, e.g. W4A16_GS64; repeat it to build several in one calibration pass.",
)
@click.option("--force", is_flag=True, help="Rebuild even if the branch is up to date.")
@_gpus_option
@_separate_option
def quantize(config_path: Path, branch_names: tuple[str, ...], force: bool, gpus: int, separate: bool) -> None:
    """Quantize branches with MoE-aware AWQ + W4A16 (llm-compressor oneshot).

    Each branch is written to a hidden temporary folder and moved into
    <output_dir>/<branch> only when complete. Unchanged inputs mean no work. Several
    --branch share one calibration pass (the first named propagates). With --gpus N each
    GPU calibrates its share of the samples and AWQ all-reduces its statistics, so every
    rank picks the same scales; rank 0 writes the branches.
    """
    from .build.quantize import build_branches

    cfg = _load(config_path)
    for name in branch_names:
        cfg.branch(name)  # an unknown name fails before any work
    _quiet_libraries(cfg, "quantize", False)
    builds = build_branches(cfg, list(branch_names), gpus, Path(config_path), force=force, echo=_say, separate=separate)
    for b in builds:
        _say(f"{b.branch}: {b.outcome} -> {b.path}")


@cli.command()
@_config_option
@click.option("--branch", "branch_name", required=True, help="Branch name from the config.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(config_path: Path, branch_name: str, as_json: bool) -> None:
    """Everything `check` does, plus the numerical checks that need torch.

    Reloads the branch with transformers + compressed-tensors, reports mean next-token KL
    divergence, top-1 agreement and perplexity against the base model on held-out text,
    decodes a short reply, tries vLLM where a GPU and vllm exist (else says why it skipped),
    and fails (exit 1) above the config's verify thresholds or on any failed check.
    """
    from .build.branch_folder import resolve_base_model
    from .build.pipeline import seal_branch
    from .verify.branch import BaseReference, load_heldout, verify_branch

    out = _json_mode(as_json)
    cfg = _load(config_path)
    branch = cfg.branch(branch_name)
    _quiet_libraries(cfg, "verify", as_json)
    ref = BaseReference(resolve_base_model(cfg), load_heldout(cfg), cfg.verify.max_tokens)
    folder = cfg.output_dir / branch.name
    r = verify_branch(cfg, branch.name, folder, ref)
    report = seal_branch(cfg, branch.name, folder)  # verify.json changed: a new manifest, then check
    _emit({"quality": r.to_json(), "check": report.to_json()}, out, report.to_text() + "\n" + r.to_text())
    if not (r.passed and report.passed):
        sys.exit(1)


@cli.command("build-all")
@_config_option
@click.option("--force", is_flag=True, help="Rebuild every branch even if up to date.")
@_gpus_option
@_separate_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_all_cmd(config_path: Path, force: bool, gpus: int, separate: bool, as_json: bool) -> None:
    """Quantize and verify every branch of the release, in config order.

    Branches whose inputs (config, recipe, calibration data, base model, tool and library
    versions) are unchanged and whose output is complete are skipped; --force redoes them.
    Stops with exit 1 if any branch fails verification.
    """
    from .build.pipeline import build_all

    out = _json_mode(as_json)
    cfg = _load(config_path)
    echo = _progress(as_json)
    _quiet_libraries(cfg, "build-all", as_json)
    console = click.get_current_context().meta[CONSOLE_KEY]
    with click.progressbar(length=len(cfg.branches), label="branches", file=console.err) as bar:
        seen: list[str] = []

        def progress(name: str) -> None:
            if seen:
                bar.update(1)
            seen.append(name)

        result = build_all(
            cfg,
            force=force,
            echo=echo,
            progress=progress,
            gpus=gpus,
            config_path=Path(config_path),
            separate=separate,
        )
        bar.update(1)
    lines = [
        f"{b.branch}: {b.outcome}, "
        f"KL {result.quality[b.branch].mean_kl:.5f}, top-1 {result.quality[b.branch].top1_agreement:.3f}"
        for b in result.builds
    ]
    _emit(result.to_json(), out, "\n".join(lines))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--remote", "repo_id", default=None, help="Check a published Hub repo (owner/name) instead of a folder.")
@click.option("--revision", default=None, help="With --remote: the branch, tag or commit to check.")
@click.option(
    "--group-size",
    type=click.Choice([str(g) for g in SUPPORTED_GROUP_SIZES]),
    default=None,
    help="Expected group size (default: from the folder's or revision's _GS<n> suffix).",
)
@click.option("--no-hash", is_flag=True, help="Compare file sizes with the manifest but skip sha256.")
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every file, even those the release's hash cache vouches for (unchanged size, mtime, inode and "
    "ctime since they were hashed).",
)
@click.option(
    "--third-party",
    is_flag=True,
    help="The branch was not built by glmrel: run every check that applies to any compressed-tensors GLM-4-MoE "
    "branch and list glmrel's records (manifest, provenance, recipe, verification) as skipped.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Also list passed checks and every GPU target.")
def check(
    path: Path | None,
    repo_id: str | None,
    revision: str | None,
    group_size: str | int | None,
    no_hash: bool,
    rehash: bool,
    third_party: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Check a branch folder, or a published Hub revision, without loading weights (no torch).

    Validates config.json's quantization_config, the files against the index and the
    manifest, every safetensors header, the full tensor inventory derived from the model's
    config, and which tensor-parallel sizes vLLM can serve the branch at (and with which
    kernel). With --remote REPO --revision REF the same checks run against the Hub: file
    list, sizes and LFS sha256 against the published manifest, and shard headers read with
    HTTP range requests; weights are never downloaded. Exit 0 only when every check passes.
    """
    from .check import check_branch, check_remote

    out = _json_mode(as_json)
    group_size = int(group_size) if group_size is not None else None
    if (path is None) == (repo_id is None):
        raise ReleaseError(
            "check needs exactly one of PATH or --remote REPO",
            hint="glmrel check out/demo/W4A16_GS64, or glmrel check --remote owner/name --revision W4A16_GS64",
        )
    if repo_id is not None:
        if not revision:
            raise ReleaseError(
                "--remote needs --revision", hint="name the branch or tag, e.g. --revision v1-W4A16_GS64"
            )
        from huggingface_hub import get_token

        from .publish import hub_repo_id

        report = check_remote(
            hub_repo_id(repo_id), revision, group_size=group_size, token=get_token(), third_party=third_party
        )
    elif revision is not None:
        raise ReleaseError("--revision only applies with --remote", hint="drop --revision to check a local folder")
    else:
        assert path is not None
        report = check_branch(path, group_size=group_size, no_hash=no_hash, third_party=third_party, rehash=rehash)
    _emit(report.to_json(), out, report.to_text(verbose))
    if not report.passed:
        sys.exit(1)


@cli.command()
@_config_option
@click.option(
    "--changelog", "version", default=None, help="Changelog version the cards describe (default: the latest)."
)
def render(config_path: Path, version: str | None) -> None:
    """Render every branch's README.md (and expert-coverage plot) and the landing page.

    Cards are built from the branch's own records (config, provenance, verify, coverage,
    file sizes) through the Jinja templates in templates/ (or the config's `templates`),
    with Hub metadata from huggingface_hub's ModelCardData. Writes <output_dir>/main/README.md
    for the landing page and refreshes each branch's manifest.
    """
    from .manifest import refresh_manifest
    from .render import render_release

    cfg = _load(config_path)
    result = render_release(cfg, version)
    for b in cfg.branches:
        refresh_manifest(cfg.output_dir / b.name, b.name)
    for name, path in result.cards.items():
        click.echo(f"{name}: {path}")


@cli.command("check-manifest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def check_manifest_cmd(paths: tuple[Path, ...], as_json: bool) -> None:
    """Check committed manifest files (CI's light job): schema, files, quantization metadata.

    The group size is read from each manifest's branch name (..._GS<n>).
    """
    from .check import check_manifest_file

    out = _json_mode(as_json)
    reports = [check_manifest_file(p) for p in paths]
    _emit([r.to_json() for r in reports], out, "\n".join(r.to_text() for r in reports))
    if not all(r.passed for r in reports):
        sys.exit(1)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--export",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also copy it to EXPORT/<branch>.json (e.g. manifests/<release>).",
)
def manifest(path: Path, export: Path | None) -> None:
    """Write (or refresh) PATH/manifest.json: every file's size and sha256.

    Files whose size, mtime, ctime and inode are unchanged since they were last hashed are
    not hashed again. A branch glmrel built whose weights or config changed since it was
    sealed is refused: a manifest never vouches for content other than what was built.
    """
    from .manifest import folder_branch, refresh_manifest
    from .owned import require_plain_file_or_nothing, require_writable_folder

    target = export / f"{folder_branch(path)}.json" if export else None
    if export and target:  # checked first: a bad --export writes nothing at all
        require_writable_folder(export, "--export")
        require_plain_file_or_nothing(target, "--export")
    m = refresh_manifest(path)
    click.echo(f"{path}/manifest.json: {len(m.files)} files, {m.total_bytes} bytes")
    if target:
        m.write(target)
        click.echo(f"exported to {target}")


@cli.command()
@_config_option
@click.option(
    "--changelog",
    "version",
    required=True,
    help="Release version to publish, e.g. v1 (must be in the release changelog).",
)
@click.option(
    "--remote",
    default=None,
    help="hf://owner/name for the Hub, or a git URL or path (default: the config's publish_remote).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@click.option(
    "--rehash",
    is_flag=True,
    help="Read every file again: hash each branch's files and read every published revision back, even those "
    "unchanged since they were last hashed and read back.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and results) as JSON.")
def publish(config_path: Path, version: str, remote: str | None, dry_run: bool, rehash: bool, as_json: bool) -> None:
    """Publish the built release: one branch per quant branch, main, and tags.

    First compares the local release with the remote's refs and prints a plan (repo to
    create, per branch the files to add / change / delete, tags to create). Refuses a branch
    that fails `check`. A second run with nothing changed does nothing; a run interrupted
    midway resumes. After pushing, reads every revision back and checks it.

    Remotes: hf://owner/name publishes to the Hugging Face Hub with HfApi (token from
    HF_TOKEN or `hf auth login`, never printed); quant branches start from the repo's
    initial commit, so they carry no landing-page files. Any other value is a git remote
    (a URL or a local path), where quant branches are orphan branches.

    Nothing is read twice when nothing changed: a file whose size, mtime, inode and ctime
    are those it had when hashed is not hashed again, and a branch head that already passed
    its full read-back from this remote is not read back again (--rehash does both anyway).
    """
    from .publish import apply_plan, plan_publish, verify_published

    out = _json_mode(as_json)
    cfg = _load(config_path)
    echo = _progress(as_json)
    plan, backend = plan_publish(cfg, version, remote, rehash=rehash)
    document: dict = {"plan": plan.to_json(), "dry_run": dry_run, "published": False, "read_back": []}
    if out is not None:
        out.partial = document  # a refusal from here on still prints the plan, with the error
    else:
        click.echo(plan.to_text())
    plan.refuse_conflicts()  # shown first: the user sees what changed
    if not dry_run:
        heads = {} if plan.empty else apply_plan(plan, backend, echo=echo)
        results = verify_published(cfg, backend, plan.version, url=plan.remote, reread=rehash)
        document.update(heads=heads, read_back=[asdict(r) for r in results])
        for r in results:
            echo(f"  {'ok  ' if r.passed else 'FAIL'} {r.ref}: {r.detail}")
        if not all(r.passed for r in results):
            raise ReleaseError("a published revision failed its read-back check", hint="see the FAIL lines above")
        document["published"] = True
        echo(
            f"published {plan.version} to {plan.remote}: {'nothing to do' if plan.empty else 'done'}; "
            "all revisions verified"
        )
    if out is not None:
        out.emit({"ok": True, **document})


cli.add_command(vllm_check_cmd)
cli.add_command(eval_cmd)
cli.add_command(ablate_cmd)


def _verbose_requested(argv: list[str]) -> bool:
    """`glmrel -v ...` (the group's option, before the command) or GLMREL_VERBOSE=1."""
    for arg in argv:
        if not arg.startswith("-"):
            break
        if arg in ("-v", "--verbose"):
            return True
    return os.environ.get("GLMREL_VERBOSE", "") not in ("", "0")


def main() -> None:
    from .build.distributed import CUDA_ALLOC_CONF
    from .console import QUIET_ENV

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    if not _verbose_requested(sys.argv[1:]):
        # read when the libraries are imported: set before any of them is
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    cli(prog_name="glmrel")


if __name__ == "__main__":  # pragma: no cover
    main()
