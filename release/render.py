"""Model cards for every branch and the landing page on main, from Jinja templates and build records.

Every figure on a card comes from a file in the branch: config.json, provenance.json,
verify.json, expert_coverage.json and the safetensors sizes; the vLLM verdicts are recomputed
from config.json with the same rules `check` uses. Rendering is deterministic: the same
records give byte-identical cards.
"""

from __future__ import annotations

import io
import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .architecture import Glm4MoeArch
from .build.coverage import ExpertCoverage
from .config import BranchSpec, ReleaseConfig, check_release_refs, ref_name_problem
from .errors import ReleaseError
from .evaluation.cards import branch_eval, eval_results, eval_view, landing_eval
from .layout import mtp_ignore_entry
from .manifest import require_sealed, write_if_changed
from .paths import shipped
from .serving.external import BASE_VLLM_FILE
from .serving.rules import TARGETS, VLLM_VERSION, servable_tp, serve_verdicts, serving_layout

DEFAULT_TEMPLATES = shipped("templates")  # the checkout's, or the installed wheel's
CARD_FILE = "README.md"
PLOT_FILE = "expert_coverage.png"
DIVERGENCE_PLOT = "layer_divergence.png"
COMMON_TP = (4, 8)
# License ids the Hub accepts in model-card metadata (huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
    lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
    odc-by odbl openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
    lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
    llama3.3 llama4 gemma unknown other""".split()
)
TAGS = ["compressed-tensors", "awq", "w4a16", "int4", "moe", "glm4_moe", "vllm", "quantized"]


@dataclass(frozen=True)
class RenderResult:
    cards: dict[str, Path]
    version: str

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "cards": {k: str(v) for k, v in self.cards.items()}}


# ---------------------------------------------------------------- changelog


class ChangelogEntry(BaseModel):
    """One version of the release's changelog: what changed in the published model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    summary: str = Field(min_length=1)
    changes: list[str] = []

    @field_validator("version")
    @classmethod
    def _a_git_ref(cls, v: str) -> str:
        problem = ref_name_problem(v)
        if problem is not None:
            raise ValueError(f"version {v!r} {problem}")
        return v


def _changelog_error(path: Path, entries: Any, err: ValidationError) -> ReleaseError:
    lines = []
    for e in err.errors():
        index, *field_path = e["loc"]
        entry = entries[index] if isinstance(index, int) and isinstance(entries, list) else None
        version = entry.get("version", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        where = ".".join(str(x) for x in field_path) or "(the entry)"
        got = e.get("input")
        if isinstance(got, dict) and len(got) == 1 and e["type"] == "string_type":
            ((k, v),) = got.items()
            msg = f"is a mapping ({k!r}: ...), not a string: YAML read its ': ' as a key; quote the whole line"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        else:
            msg = e["msg"]
        lines.append(f"{version}: {where} {msg}")
    return ReleaseError(
        f"invalid changelog {path}:\n  " + "\n  ".join(lines),
        hint="each entry is {version, summary, changes: [strings]}; quote a change that contains ': '",
    )


def load_changelog(path: Path | None, version: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Entries up to and including `version` (default: the latest), oldest first. Every
    entry is validated (`ChangelogEntry`): a change YAML parsed as a mapping is an error."""
    if path is None:
        raise ReleaseError(
            "the config has no changelog", hint="set changelog: to a YAML list of {version, summary, changes}"
        )
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        raise ReleaseError(
            f"cannot read changelog {path}: {e}", hint="the release changelog is a UTF-8 YAML list; fix it"
        ) from e
    if not isinstance(raw, list) or not raw:
        raise ReleaseError(
            f"changelog {path} must be a non-empty YAML list of entries",
            hint="- version: v1\n  summary: ...\n  changes: [...]",
        )
    try:
        entries = TypeAdapter(list[ChangelogEntry]).validate_python(raw)
    except ValidationError as e:
        raise _changelog_error(Path(path), raw, e) from e
    versions = [e.version for e in entries]
    dupes = sorted({v for v in versions if versions.count(v) > 1})
    if dupes:
        raise ReleaseError(f"changelog {path} repeats version {', '.join(dupes)}", hint="each version appears once")
    if version is None:
        version = versions[-1]
    if version not in versions:
        raise ReleaseError(
            f"changelog {path} has no version {version!r} (it has: {', '.join(versions)})",
            hint="add an entry for this version to the release changelog, or pass one that exists",
        )
    return version, [e.model_dump() for e in entries[: versions.index(version) + 1]]


# ---------------------------------------------------------------- records


def _read_json(folder: Path, name: str, required: bool = True) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file():
        if required:
            raise ReleaseError(f"{path} is missing", hint="run `glmrel build-all` to produce the branch records first")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ReleaseError(
            f"{path} is not readable JSON: {e}", hint="build the branch again: `glmrel build-all --force`"
        ) from e


def awq_engine_text(prov: dict[str, Any]) -> str | None:
    """What the card says of the AWQ engine a branch was built with (its provenance's record);
    None for branches recorded before glmrel wrote one."""
    # provenance's engine description (older branches kept it among their timings)
    engine = prov.get("awq_engine") or (prov.get("timings_s") or {}).get("awq_engine") or {}
    if engine.get("engine") == "stock":
        return "llm-compressor's AWQ as released"
    if engine.get("engine") != "glmrel":
        return None
    text = "glmrel's patches to llm-compressor's AWQ (`release/awq/`)"
    search = engine.get("expert_search")
    if search == "gram":
        return text + "; each routed expert's `down_proj` scale searched on the Gram matrix of every calibration token"
    if engine.get("max_expert_tokens"):
        return text + (
            f"; each routed expert's `down_proj` scale searched on a sample of at most "
            f"{engine['max_expert_tokens']} of its calibration tokens"
        )
    return text


def describe_ignore(ignore: list[str], arch: Glm4MoeArch) -> list[str]:
    """quantization_config.ignore in words: the routers as one item, the MTP layer's regex as
    what it is, anything else by name (Markdown)."""
    routers = [n for n in ignore if re.fullmatch(r"model\.layers\.\d+\.mlp\.gate", n)]
    mtp = {mtp_ignore_entry(n): n for n in arch.mtp_layers}
    out = []
    for name in ignore:
        if name in routers:
            if name == routers[0]:
                out.append(f"the {len(routers)} MoE routers (`model.layers.N.mlp.gate`)")
        elif name in mtp:
            out.append(f"the MTP layer (`model.layers.{mtp[name]}.*`, all its tensors)")
        elif name.startswith("re:"):
            out.append(f"tensors matching the regex `{name[3:]}`")
        else:
            out.append(f"`{name}`")
    return out


def divergence_summary(quality: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the card says of the per-layer divergence verify recorded (None: not recorded)."""
    layers = (quality or {}).get("layers") or []
    if not layers:
        return None
    worst = max(layers, key=lambda d: d["rel_error"])
    return {
        "layers": len(layers),
        "first": layers[0]["rel_error"],
        "last": layers[-1]["rel_error"],
        "worst": worst["rel_error"],
        "worst_layer": worst["layer"],
        "min_cosine": min(d["cosine"] for d in layers),
        "method": quality.get("method") if quality else "",
    }


def mtp_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The MTP drafter's run `vllm-check` recorded (a branch's verify.json or base-vllm.json)."""
    run = (record or {}).get("vllm_run", record) or {}
    mtp = run.get("mtp") if isinstance(run, dict) else None
    if not isinstance(mtp, dict) or not mtp.get("draft_tokens"):
        return None
    return {**mtp, "vllm": run.get("version"), "device": run.get("device")}


def branch_record(cfg: ReleaseConfig, branch: BranchSpec) -> dict[str, Any]:
    """Everything a card says about one branch, read from the branch's own files."""
    folder = cfg.output_dir / branch.name
    model_cfg = _read_json(folder, "config.json")
    prov = _read_json(folder, "provenance.json")
    quality = _read_json(folder, "verify.json", required=False)
    evaluated = branch_eval(folder, branch.name)
    coverage_raw = _read_json(folder, "expert_coverage.json", required=False)
    assert model_cfg is not None and prov is not None
    arch = Glm4MoeArch.from_config(model_cfg, str(folder / "config.json"))
    qc = model_cfg.get("quantization_config") or {}
    weights = ((qc.get("config_groups") or {}).get("group_0") or {}).get("weights") or {}
    if weights.get("group_size") != branch.group_size:
        raise ReleaseError(
            f"{folder}/config.json has group_size {weights.get('group_size')}, the config says {branch.group_size}",
            hint="rebuild the branch with `glmrel build-all --force`",
        )
    shards = sorted(folder.glob("*.safetensors"))
    weight_bytes = sum(p.stat().st_size for p in shards)
    verdicts = serve_verdicts(arch, branch.group_size)
    hopper = TARGETS[0][0]
    tp = servable_tp(verdicts, hopper)
    tp_ep = servable_tp(verdicts, hopper, expert_parallel=True)
    unsupported = [n for n in COMMON_TP if n not in tp and n <= arch.num_attention_heads]
    reasons = {v.tp: v.summary() for v in verdicts if v.target == hopper and not v.expert_parallel and not v.servable}
    coverage = ExpertCoverage.from_json(coverage_raw) if coverage_raw else None
    cov = None
    if coverage:
        s = coverage.summary()
        cov = {
            "total_tokens": coverage.total_tokens,
            "experts": s["experts"],
            "layers": len(coverage.routed),
            "routed_min": s["routed_min"],
            "routed_max": s["routed_max"],
            "calibrated_min": s["calibrated_min"],
            "calibrated_max": s["calibrated_max"],
            "routed_zero": s["routed_below"]["0"],
            "routed_below_16": s["routed_below"]["16"],
            "routed_below_128": s["routed_below"]["128"],
            "all_experts": coverage.moe_calibrate_all_experts,
        }
    return {
        "name": branch.name,
        "description": branch.description,
        "group_size": branch.group_size,
        "bits": weights.get("num_bits"),
        "symmetric": weights.get("symmetric"),
        "strategy": weights.get("strategy"),
        "format": qc.get("format"),
        "awq_engine": awq_engine_text(prov),
        "ignore": qc.get("ignore") or [],
        "kept": describe_ignore(qc.get("ignore") or [], arch),
        "weight_gib": round(weight_bytes / 2**30, 3),
        "weight_mib": round(weight_bytes / 2**20, 1),
        "shards": len(shards),
        "tp": tp,
        "tp_ep": tp_ep,
        "tp_serve": max([n for n in tp if n <= 8], default=None),
        "unsupported_common_tp": unsupported,
        "unsupported_reasons": {n: reasons.get(n, "") for n in unsupported},
        # the same GPUs in a layout vLLM serves: TP x PP
        "layouts": {n: serving_layout(verdicts, n, hopper) for n in unsupported},
        "quality": quality,
        "divergence": divergence_summary(quality),
        "eval": eval_view(evaluated),
        "mtp": mtp_view(quality),
        "eval_results": eval_results(cfg, branch.name, evaluated),
        "coverage": cov,
        "has_plot": (folder / PLOT_FILE).is_file(),
        "calibration": prov["calibration"],
        "calibration_pass": prov.get("calibration_pass"),
        # a side branch's scale searches near the propagating branch's choices (awq.side_grid_window)
        "side_grid_window": (prov.get("awq") or {}).get("side_grid_window"),
        "moe_calibrate_all_experts": prov.get("moe_calibrate_all_experts"),
        "libraries": prov.get("libraries", {}),
        "tool": prov.get("tool", {}),
        "arch": prov["base_model"]["architecture"],
        "dtype": model_cfg.get("dtype") or model_cfg.get("torch_dtype"),
    }


# ---------------------------------------------------------------- metadata


def card_data(cfg: ReleaseConfig, branch: str | None = None, results: list[EvalResult] | None = None) -> ModelCardData:
    """The card's front matter; a branch's card also carries its evaluation results (model-index)."""
    license_id = cfg.base_model.license or "other"
    if license_id not in HUB_LICENSES:
        raise ReleaseError(
            f"license {license_id!r} is not a license id the Hub accepts",
            hint="use a Hub license id (e.g. apache-2.0, mit) or `other` with license_name/license_link",
        )
    datasets = [cfg.calibration.dataset] if cfg.calibration.dataset else None
    return ModelCardData(
        base_model=cfg.base_model.card_base_model,
        base_model_relation="quantized" if cfg.base_model.card_base_model else None,
        license=license_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        datasets=datasets,
        language=list(cfg.serving.language) or None,
        vllm_version=VLLM_VERSION,  # the vLLM release whose rules decided the cards' serving verdicts
        model_name=f"{cfg.hub_repo} ({branch})" if results else None,
        eval_results=results or None,
    )


# ---------------------------------------------------------------- rendering


def _environment(templates: Path) -> jinja2.Environment:
    if not templates.is_dir():
        raise ReleaseError(
            f"templates folder {templates} does not exist",
            hint="set templates: in the config or drop it for the defaults",
        )
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def _render(env: jinja2.Environment, name: str, context: dict[str, Any]) -> str:
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as e:
        raise ReleaseError(f"template {e.filename or name} line {e.lineno}: {e.message}") from e
    except jinja2.UndefinedError as e:
        where = name
        for frame in reversed(traceback.extract_tb(e.__traceback__)):
            if frame.filename.endswith(".j2"):
                where = f"{Path(frame.filename).name} line {frame.lineno}"
                break
        raise ReleaseError(
            f"template {where}: {e.message}", hint="the build records lack this value; rebuild or fix the template"
        ) from e


def compose_card(data: ModelCardData, body: str) -> str:
    """Front matter from ModelCardData, then the body; checked to round-trip through ModelCard."""
    text = f"---\n{data.to_yaml()}\n---\n{body}"
    parsed = ModelCard(text).data.to_dict()
    for key, value in data.to_dict().items():
        if parsed.get(key) != value:
            raise ReleaseError(
                f"card metadata {key} does not round-trip through ModelCard ({value!r} -> {parsed.get(key)!r})"
            )
    return text


def serve_flags(cfg: ReleaseConfig) -> str:
    """The base model's chat-format parsers for `vllm serve` (config `serving`), or ''."""
    flags = []
    if cfg.serving.tool_call_parser:
        flags += ["--enable-auto-tool-choice", f"--tool-call-parser {cfg.serving.tool_call_parser}"]
    if cfg.serving.reasoning_parser:
        flags.append(f"--reasoning-parser {cfg.serving.reasoning_parser}")
    return " ".join(flags)


def mtp_flag(cfg: ReleaseConfig) -> str:
    """`--speculative-config` for the kept MTP layer, or '' (config serving.mtp_speculative_tokens)."""
    n = cfg.serving.mtp_speculative_tokens
    return "" if not n else f'--speculative-config \'{{"method": "mtp", "num_speculative_tokens": {n}}}\''


def render_release(cfg: ReleaseConfig, version: str | None = None) -> RenderResult:
    """Write README.md (+ expert-coverage plot) into every branch and the landing page into main/."""
    version, changelog = load_changelog(cfg.changelog, version)
    check_release_refs(version, [b.name for b in cfg.branches])
    for b in cfg.branches:  # a card describes what was built: never weights changed since
        if (cfg.output_dir / b.name).is_dir():
            require_sealed(cfg.output_dir / b.name, b.name)
    env = _environment(cfg.templates or DEFAULT_TEMPLATES)
    data = card_data(cfg)
    branches = [branch_record(cfg, b) for b in cfg.branches]
    context: dict[str, Any] = {
        "release": {
            "name": cfg.name,
            "repo": cfg.hub_repo,
            "base_model": cfg.base_model.card_base_model or cfg.base_model.display_id,
            "base_revision": cfg.base_model.revision,
            "license": data.license,
        },
        "version": version,
        "changelog": changelog,
        "branches": branches,
        "vllm_version": VLLM_VERSION,
        "serve_flags": serve_flags(cfg),
        "mtp_flag": mtp_flag(cfg),
        "eval_note": cfg.eval.note,
        # the base model's vllm-check run, once for every card (the branches' drafters are read against it)
        "mtp_base": mtp_view(_read_json(cfg.output_dir, BASE_VLLM_FILE, required=False)),
    }
    cards: dict[str, Path] = {}
    for record in branches:
        folder = cfg.output_dir / record["name"]
        if record["coverage"]:
            write_coverage_plot(
                ExpertCoverage.from_json(_read_json(folder, "expert_coverage.json") or {}), folder / PLOT_FILE
            )
            record["has_plot"] = True
        if record["divergence"]:
            write_divergence_plot({record["name"]: record["quality"]["layers"]}, folder / DIVERGENCE_PLOT)
        results = record.pop("eval_results")
        branch_data = card_data(cfg, record["name"], results) if results else data
        text = compose_card(branch_data, _render(env, "branch.md.j2", {**context, "b": record}))
        write_if_changed(folder / CARD_FILE, text)
        cards[record["name"]] = folder / CARD_FILE
    main = cfg.output_dir / "main"
    main.mkdir(parents=True, exist_ok=True)
    series = {r["name"]: r["quality"]["layers"] for r in branches if r["divergence"]}
    context["has_divergence_plot"] = bool(series)
    context["eval"] = landing_eval(branches)
    if series:
        write_divergence_plot(series, main / DIVERGENCE_PLOT)
    write_if_changed(main / CARD_FILE, compose_card(data, _render(env, "landing.md.j2", context)))
    cards["main"] = main / CARD_FILE
    return RenderResult(cards, version)


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ReleaseError(
            "matplotlib is needed to draw the card's plots", hint="pip install 'glmrel[quantize]'"
        ) from e
    return plt


def _save_png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    write_if_changed(path, buf.getvalue())


def write_divergence_plot(series: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Each decoder layer's output against the base model's (relative error), per branch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for name, layers in series.items():
        ax.plot([d["layer"] for d in layers], [d["rel_error"] for d in layers], marker="o", ms=3, lw=1.5, label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the layer output")
    ax.set_title("Where quantization error enters: each layer's output vs. the base model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def write_coverage_plot(coverage: ExpertCoverage, path: Path) -> None:
    """Tokens per expert under plain top-k routing (sorted, per MoE layer) vs. MoE-aware calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    n_experts = 0
    for layer in sorted(coverage.routed):
        counts = sorted(coverage.routed[layer], reverse=True)
        n_experts = len(counts)
        ax.plot(range(1, n_experts + 1), [max(c, 0.8) for c in counts], color="tab:blue", alpha=0.5, lw=1)
    calibrated = min(min(v) for v in coverage.calibrated.values()) if coverage.calibrated else 0
    ax.axhline(
        calibrated,
        color="tab:green",
        lw=2.5,
        label=f"MoE-aware calibration: every expert sees all {calibrated:,} tokens",
    )
    ax.plot([], [], color="tab:blue", label=f"plain top-k routing, one line per MoE layer ({len(coverage.routed)})")
    ax.set_yscale("log")
    ax.set_xlabel("experts, sorted by routed tokens")
    ax.set_ylabel("calibration tokens (0 drawn at the bottom)")
    ax.set_title("Calibration tokens per expert")
    ax.set_xlim(1, max(n_experts, 2))
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
