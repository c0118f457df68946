"""The commands that run a branch in vLLM's own environment: `vllm-check` (load, teacher-forced
agreement, a chat completion, MTP speculative decoding) and `eval` (task recovery with
lm-evaluation-harness). `release/cli.py` adds them to the `glmrel` group."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_options import config_option, json_mode, load, progress, quiet_libraries
from .errors import ReleaseError

PYTHON_HELP = "Python of the vLLM environment (default: $GLMREL_VLLM_PYTHON, else .vllm-cpu-env/bin/python)."
# the vLLM environment's Python, for every command that runs vLLM
python_option = click.option(
    "--python", "python", type=click.Path(path_type=Path, dir_okay=False), default=None, help=PYTHON_HELP
)


@click.command("vllm-check")
@config_option
@click.option("--branch", "branch_names", multiple=True, help="Branches to run (default: all of the config's).")
@click.option(
    "--folder",
    "folders",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Run on a branch folder outside the release (e.g. cloned from the published remote); prints only.",
)
@python_option
@click.option(
    "--base/--no-base",
    "with_base",
    default=None,
    help="Also run the base model (its MTP acceptance is the branches' yardstick); default: with the "
    "config's branches, not with --branch or --folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def vllm_check_cmd(
    config_path: Path, branch_names: tuple[str, ...], folders: tuple[Path, ...], python, with_base, as_json
) -> None:
    """Load each branch (and the base model) in a real vLLM (its own environment, in a
    subprocess) and score it.

    Teacher-forced top-1 agreement with transformers on the held-out text, one chat completion
    through vLLM's OpenAI server, and speculative decoding with the kept MTP layer as the
    drafter (drafts, accepted tokens, acceptance rate). For the config's branches the result
    goes into verify.json (a failure, a drafter vLLM cannot load included, fails the branch's
    verification) and the manifest; the base model's into <output_dir>/base-vllm.json.
    Re-render the cards to show it. Exit 1 if any model fails.
    """
    from .build.branch_folder import base_model_fingerprint, resolve_base_model
    from .manifest import refresh_manifest, require_built
    from .serving.external import record, record_base, run, summary, vllm_python

    out = json_mode(as_json)
    cfg = load(config_path)
    targets = [(b, cfg.output_dir / b) for b in (branch_names or [b.name for b in cfg.branches])] if not folders else []
    for name, folder in targets:
        cfg.branch(name)
        require_built(folder, name)  # its result is recorded in the branch: only about what was built
    py = vllm_python(python)
    targets += [(str(f), f) for f in folders]
    results = {}
    if with_base if with_base is not None else not (branch_names or folders):
        base = resolve_base_model(cfg)
        click.echo(f"[base] vLLM: loading {base}", err=as_json)
        results["base"] = run(cfg, base, py)
        record_base(cfg.output_dir, base_model_fingerprint(base), results["base"])
        click.echo(f"[base] {summary(results['base'])}", err=as_json)
    for name, folder in targets:
        click.echo(f"[{name}] vLLM: loading {folder}", err=as_json)
        result = run(cfg, folder, py)
        results[name] = result
        if not folders:
            record(folder, result)
            refresh_manifest(folder, name)
        click.echo(f"[{name}] {summary(result)}", err=as_json)
    if out is not None:
        out.emit({"ok": all(r["passed"] for r in results.values()), "results": results})
    if not all(r["passed"] for r in results.values()):
        sys.exit(1)


@click.command("eval")
@config_option
@click.option("--branch", "branch_names", multiple=True, help="Branches to score (default: all of the config's).")
@python_option
@click.option(
    "--force", is_flag=True, help="Score again even where a record of this content and these settings exists."
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def eval_cmd(config_path: Path, branch_names: tuple[str, ...], python: Path | None, force: bool, as_json: bool) -> None:
    """Task recovery: lm-evaluation-harness through vLLM on the base model and each branch.

    Runs the config's `eval:` tasks (few-shot counts, sample limits, chat template, thinking
    mode) with lm-eval's vllm model type in the vLLM environment (its own process). The base
    model is scored once per release (base-eval.json); each branch's scores, the base's and
    the recovery (branch / base) go into its eval.json, bound to its content. Then the cards
    are rendered again with the recovery tables and the Hub's evaluation metadata.
    """
    from .build.branch_folder import base_model_fingerprint, resolve_base_model
    from .evaluation.harness import evaluate, summary
    from .manifest import refresh_manifest
    from .render import render_release

    out = json_mode(as_json)
    cfg = load(config_path)
    echo = progress(as_json)
    quiet_libraries(cfg, "eval", as_json)
    base = resolve_base_model(cfg)
    names = list(branch_names) or [b.name for b in cfg.branches]
    records = evaluate(cfg, base, base_model_fingerprint(base), names, python, force=force, echo=echo)
    rendered = render_release(cfg)
    for b in cfg.branches:
        if (cfg.output_dir / b.name).is_dir():
            refresh_manifest(cfg.output_dir / b.name, b.name)
    for name, record in records.items():
        echo(summary(name, record))
    echo(f"rendered {len(rendered.cards)} cards for {rendered.version} with the recovery tables")
    if out is not None:
        out.emit({"ok": True, "records": records})


@click.command("ablate")
@config_option
@click.option("--branch", "branch_name", required=True, help="The branch to build in each variant.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    required=True,
    help="NAME:KEY=VALUE[,KEY=VALUE]: config overrides, e.g. no-moe-aware:calibration.moe_calibrate_all_experts=false.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Scratch folder for the variants' builds (default: <output_dir>-ablation).",
)
@python_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def ablate_cmd(
    config_path: Path,
    branch_name: str,
    variants: tuple[str, ...],
    work: Path | None,
    python: Path | None,
    as_json: bool,
) -> None:
    """Build one branch with other recipe settings in a scratch folder and score each variant
    like the release: verify's KL and top-1 against the base, and `glmrel eval`'s tasks.

    The release's own branch is the first row (scored as `glmrel eval` scores it); each
    variant gets its own config and output under --work, so nothing else of the release is
    touched. Prints the side-by-side and writes it to <work>/ablation.json and .md.
    """
    import json
    import shutil

    from .build.branch_folder import base_model_fingerprint, resolve_base_model
    from .build.pipeline import build_all
    from .evaluation.ablation import BASELINE, parse_variant, table, variant_config
    from .evaluation.harness import evaluate
    from .evaluation.records import BASE_EVAL_FILE
    from .manifest import VERIFY_FILE
    from .serving.external import vllm_python

    out = json_mode(as_json)
    cfg = load(config_path)
    cfg.branch(branch_name)
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ReleaseError("two variants have one name", hint="name each --variant differently")
    work = (work or cfg.output_dir.parent / f"{cfg.output_dir.name}-ablation").resolve()
    echo = progress(as_json)
    quiet_libraries(cfg, "ablate", as_json)
    base = resolve_base_model(cfg)
    fingerprint = base_model_fingerprint(base)
    configs = [variant_config(config_path, branch_name, n, o, work) for n, o in parsed]  # all checked first
    rows = []
    folder = cfg.output_dir / branch_name
    if not (folder / VERIFY_FILE).is_file():
        raise ReleaseError(
            f"the release's {branch_name} is not built and verified", hint="run `glmrel build-all` first"
        )
    vllm_python(python or cfg.eval.python)  # before anything is written under --work
    paths = []
    for path, text in configs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    rows.append(_ablation_row(BASELINE, {}, folder, evaluate(cfg, base, fingerprint, [branch_name], python, echo=echo)))
    for (name, overrides), path in zip(parsed, paths):
        echo(f"[{name}] building {branch_name} with {overrides} in {path.parent}")
        vcfg = load(path)
        shared = cfg.output_dir / BASE_EVAL_FILE
        if shared.is_file() and not (vcfg.output_dir / BASE_EVAL_FILE).exists():
            vcfg.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared, vcfg.output_dir / BASE_EVAL_FILE)  # reused where it matches
        build_all(vcfg, echo=echo, config_path=path)
        scored = evaluate(vcfg, base, fingerprint, [branch_name], python, echo=echo)
        rows.append(_ablation_row(name, overrides, vcfg.output_dir / branch_name, scored))
    text = table(rows)
    (work / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (work / "ablation.md").write_text(text + "\n")
    echo(text)
    if out is not None:
        out.emit({"ok": True, "rows": rows, "work": str(work)})


def _ablation_row(variant: str, overrides: dict, folder: Path, scored: dict) -> dict:
    """One row of the ablation: the branch folder's verification (KL, top-1) and its recovery."""
    import json

    from .manifest import VERIFY_FILE

    quality = json.loads((folder / VERIFY_FILE).read_text())
    return {
        "variant": variant,
        "overrides": overrides,
        "mean_kl": quality["mean_kl"],
        "top1": quality["top1_agreement"],
        "recovery": scored[folder.name]["recovery"],
    }
