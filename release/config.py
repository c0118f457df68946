"""Release configuration: YAML -> validated pydantic models.

Every model forbids unknown fields, so a typo in a config fails with the field's name
instead of being silently ignored. Relative paths are resolved against the config file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ReleaseError, not_utf8
from .layout import SUPPORTED_GROUP_SIZES

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# how the AWQ engine searches each routed expert's down_proj scale (release/awq/ reads
# it from here: the config owns its options, and loading a config does not load the engine)
ExpertSearch = Literal["gram", "sampled", "sampled-batched"]


# refs git and the Hub treat specially: no release branch or tag may take these names
RESERVED_REFS = frozenset({"HEAD", "FETCH_HEAD", "ORIG_HEAD", "MERGE_HEAD", "main"})


def ref_name_problem(name: str) -> str | None:
    """Why `name` cannot be one git ref component (git-check-ref-format's rules, for names of
    letters, digits, '.', '_' and '-'), or None when it can."""
    if not BRANCH_NAME.match(name):
        return "must start with a letter or digit and hold only letters, digits, '.', '_' and '-'"
    if ".." in name:
        return "may not contain '..' (git refuses it in a ref name)"
    if name.endswith(".lock"):
        return "may not end with '.lock' (git keeps its lock files under such names)"
    if name.endswith("."):
        return "may not end with '.'"
    return None


def is_reserved_ref(name: str) -> bool:
    return name.upper() in {r.upper() for r in RESERVED_REFS}


def check_release_refs(version: str, branches: list[str]) -> None:
    """The refs a publish of `version` makes (branch per quant branch and main, tag `version`
    and `version-<branch>`) are valid git refs and name nothing twice: no tag equal to a
    branch or a reserved name, and no version whose tag is another version's branch tag
    (`v1-W4A16_GS32` is version v1's tag for W4A16_GS32). Checked before anything is pushed."""
    problem = ref_name_problem(version)
    if problem is None and is_reserved_ref(version):
        problem = "is a name git or the Hub reserves"
    if problem is None and version in branches:
        problem = "is the name of a branch of this release (its tag would sit beside the branch of that name)"
    if problem is None:
        clash = next((b for b in branches if version.endswith(f"-{b}")), None)
        if clash is not None:
            problem = f"ends in '-{clash}': its tag would be version {version[: -len(clash) - 1]}'s tag for {clash}"
    if problem is None:
        taken = set(branches) | RESERVED_REFS
        clash = next((f"{version}-{b}" for b in branches if f"{version}-{b}" in taken), None)
        if clash is not None:
            problem = f"would make tag {clash}, the name of a branch"
    if problem is not None:
        raise ReleaseError(
            f"changelog version {version!r} {problem}",
            hint="name versions like v1, v2, v1.1 in the release changelog (nothing was published)",
        )


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSpec(_Strict):
    """The unquantized parent: a local folder, or a Hub id pinned to a revision."""

    path: Path | None = Field(default=None, description="a local folder with the parent's config and safetensors")
    hub_id: str | None = Field(default=None, description="the parent's Hub id (owner/name), e.g. zai-org/GLM-4.7")
    revision: str | None = Field(default=None, description="the parent's commit on the Hub (required with hub_id)")
    license: str | None = Field(default=None, description="SPDX-like Hub license id of the parent")
    card_id: str | None = Field(default=None, description="Hub id to name as base_model in cards when `path` is local")

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("set exactly one of base_model.path or base_model.hub_id")
        if self.hub_id is not None and not HUB_REPO_ID.match(self.hub_id):
            raise ValueError(f"base_model.hub_id {self.hub_id!r} is not of the form owner/name")
        if self.hub_id is not None and not self.revision:
            raise ValueError("base_model.revision is required with hub_id (pin the parent you quantize)")
        return self

    @property
    def display_id(self) -> str:
        return self.hub_id if self.hub_id else str(self.path)

    @property
    def card_base_model(self) -> str | None:
        return self.hub_id or self.card_id


class CalibrationSpec(_Strict):
    """Where calibration conversations come from and how many are used."""

    dataset: str | None = Field(default=None, description="Hub dataset id, loaded with datasets.load_dataset")
    path: Path | None = Field(default=None, description="local JSON lines or parquet file with a messages column")
    split: str = Field(default="train", description="the dataset split")
    revision: str | None = Field(default=None, description="the dataset's commit on the Hub")
    messages_column: str = Field(
        default="messages", description="the column of chat messages, rendered with the model's template"
    )
    num_samples: int = Field(default=512, ge=1, description="conversations drawn (seeded) for calibration")
    max_seq_length: int = Field(default=2048, ge=8, description="tokens a conversation is cut to")
    min_tokens: int = Field(default=16, ge=1, description="samples shorter than this after rendering are dropped")
    seed: int = Field(default=42, description="the seed of the sample draw")
    activations_on_gpu: bool | Literal["auto"] = Field(
        default="auto",
        description="keep llm-compressor's cached layer inputs between layers on the GPU (about samples / GPUs x "
        "max_seq_length x hidden x 2 bytes: 10 GiB at GLM-4.7's 512 x 2048) instead of host RAM: no copy out "
        "and back at each layer boundary (measured at 512 x 2048 on an H200: 12.9 s to 0.5 s). auto: on where "
        "they take at most 10 % of the GPU's memory (an H200 at 512 x 2048, not an 80 GB card). Ignored without "
        "a GPU; the same values either way",
    )
    moe_calibrate_all_experts: bool = Field(
        default=True, description="every routed expert sees every calibration token (the output stays top-k routing's)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSpec:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("set exactly one of calibration.dataset or calibration.path")
        return self

    @property
    def source_id(self) -> str:
        return self.dataset if self.dataset else self.path.name  # type: ignore[union-attr]


class BranchSpec(_Strict):
    """One Hub branch of the release: a scheme at one group size."""

    name: str = Field(description="the Hub branch, e.g. W4A16_GS64 (a git ref name; main and HEAD are reserved)")
    scheme: Literal["W4A16"] = Field(default="W4A16", description="INT4 weights, 16-bit activations")
    group_size: int = Field(description="weights per quantization scale: 32, 64 or 128")
    description: str = Field(default="", description="a line for the cards and the landing page")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        problem = ref_name_problem(v)
        if problem is None and is_reserved_ref(v):
            problem = f"is reserved ({', '.join(sorted(RESERVED_REFS))})"
        if problem is not None:
            raise ValueError(f"branch name {v!r} {problem}")
        return v

    @field_validator("group_size")
    @classmethod
    def _supported_group(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size {v} is not one of {SUPPORTED_GROUP_SIZES}")
        return v


class AwqSpec(_Strict):
    """AWQ's settings (the recipe's) and glmrel's engine for it."""

    n_grid: int = Field(default=20, ge=1, description="grid points of AWQ's scale search")
    duo_scaling: bool = Field(default=True, description="AWQ scales from activations and weights (false: activations)")
    engine: Literal["glmrel", "stock"] = Field(
        default="glmrel",
        description="glmrel: llm-compressor's AWQ with release/awq/'s memory and MoE patches; "
        "stock: llm-compressor as released (for comparison)",
    )
    expert_search: ExpertSearch = Field(
        default="gram",
        description="how each routed expert's down_proj AWQ scale is searched (glmrel engine). gram: on the "
        "fp32 Gram matrix X^T X of every calibration token, all experts of a layer together (no rows kept); "
        "sampled: on max_expert_tokens rows per expert, one expert at a time (stock's loop); "
        "sampled-batched: the same rows, all experts together",
    )
    max_expert_tokens: int | None = Field(
        default=16384,
        ge=256,
        description="rows of each expert's down_proj input kept for its AWQ scale search, over all GPUs, "
        "with expert_search sampled or sampled-batched (null: every token, as stock); the activation mean "
        "still uses every token",
    )
    resident_cache_gib: float | None = Field(
        default=None,
        ge=0,
        description="GPU memory (GiB, per GPU) in which AWQ's cached layer inputs stay between the "
        "calibration forward and the scale search; the rest go to host RAM (glmrel engine; null: 35 % of "
        "the GPU's memory; 0: host RAM for all, as stock)",
    )
    deferred_write_back: bool = Field(
        default=True,
        description="copy each smoothed weight of a layer to its CPU offload once, at the end of the layer's "
        "AWQ smoothing, through pinned buffers (and split between data-parallel ranks) instead of at every "
        "write (glmrel engine; false: as stock). Same weights either way",
    )
    batched_balance_layers: bool = Field(
        default=True,
        description="at each AWQ grid point, quantize a mapping's balance layers of one shape together (the MoE "
        "block's 322 expert projections at GLM-4.7 size) instead of one by one (glmrel engine; false: as stock). "
        "Same weights either way",
    )
    fused_gpu_experts: bool = Field(
        default=True,
        description="on a GPU, run the routed experts as batched products in the calibration forward (every "
        "expert on every token) and as grouped products over their routed tokens in the scale search, instead "
        "of one expert at a time (glmrel engine). An expert's outputs may differ from the loop's in the last "
        "bit (GEMM blocking); the CPU keeps the loop. false: the loop on a GPU too",
    )
    search_batch_tokens: int | None = Field(
        default=16384,
        ge=1,
        description="tokens per forward in AWQ's grid search: consecutive calibration samples merged into one "
        "forward of at most this many tokens (glmrel engine; null: one sample a forward, as stock)",
    )
    batched_expert_hooks: bool = Field(
        default=True,
        description="with fused_gpu_experts: take AWQ's activation sums, the experts' Gram matrices and the "
        "coverage counts for a chunk of experts at once in the calibration forward instead of expert by expert "
        "(glmrel engine). The sums may differ from the per-expert ones in the last bit (reduction order). "
        "false: expert by expert",
    )
    causal_search_attention: bool = Field(
        default=True,
        description="with fused_gpu_experts, on a GPU: in AWQ's grid search, leave out a cached attention mask "
        "that is exactly the causal pattern, so SDPA runs its causal kernel (half the products, no repeated "
        "key/value heads) instead of adding the mask to every score (glmrel engine). Attention's output may "
        "differ in the last bit; the reference and every grid point take the same path. false: the mask",
    )
    triton_kernels: bool = Field(
        default=True,
        description="with fused_gpu_experts, on a GPU with Triton: the routed experts' SiLU gate and the weighted "
        "sum of each token's expert outputs as single kernels, each checked against torch's ops on a small case "
        "before use (glmrel engine). The gate may differ from torch's in the last bit of a few elements. false: "
        "torch's ops",
    )
    side_grid_window: int | None = Field(
        default=None,
        ge=1,
        description="one calibration pass for several group sizes: each side branch searches a mapping's AWQ "
        "scale only within this many grid steps of the propagating branch's choice, widened a step at a time "
        "while its best point is on an edge (glmrel engine). The whole grid's choice wherever a side branch's "
        "loss has one minimum along the ratio; fewer forwards per extra group size. null: every grid point",
    )


class OffloadSpec(_Strict):
    """Where the base model's weights live while `quantize` calibrates them."""

    cpu_gib: float | None = Field(
        default=None,
        gt=0,
        description="host RAM (GiB) the base model's weights may take while calibrating; the rest is "
        "offloaded to safetensors files in `folder` and read back one layer at a time (compressed-tensors' "
        "disk offload; under --gpus N one copy per node, loaded by rank 0). null: the whole model in host "
        "RAM. The same weights either way; the offload costs disk (about the model's size) and time",
    )
    folder: Path | None = Field(
        default=None,
        description="where offloaded weights are written (default: <output_dir>/.glmrel-cache/offload); "
        "emptied after each branch",
    )
    pass_store: Path | None = Field(
        default=None,
        description="where one calibration pass for several branches keeps each side branch's layers, "
        "quantized as they are smoothed, until that branch is assembled (about the branch's own size per side "
        "branch; default: a hidden folder in output_dir); a tmpfs such as /dev/shm keeps them in RAM. Removed "
        "when the pass ends",
    )


class ServingSpec(_Strict):
    """What the cards tell vLLM users to pass beside the quantization (the base model's own
    chat-format parsers and its MTP layer); null: not shown."""

    tool_call_parser: str | None = Field(default=None, description="vLLM --tool-call-parser (GLM-4.7: glm47)")
    reasoning_parser: str | None = Field(default=None, description="vLLM --reasoning-parser (GLM-4.7: glm47)")
    mtp_speculative_tokens: int | None = Field(
        default=None,
        ge=1,
        description="show speculative decoding with the kept MTP layer (vLLM --speculative-config method mtp) "
        "with this many tokens",
    )
    language: list[str] = Field(default_factory=list, description="card metadata: the model's languages")


class VerifySpec(_Strict):
    """Held-out text and the thresholds a branch must meet against the base model."""

    heldout: Path | None = Field(default=None, description="JSON list of held-out texts")
    max_tokens: int = Field(default=256, ge=8, description="tokens of each held-out text compared")
    max_kl: float = Field(default=0.5, gt=0, description="a branch fails above this mean next-token KL to the base")
    min_top1: float = Field(default=0.5, ge=0, le=1, description="... or below this top-1 agreement with the base")


class EvalTask(_Strict):
    """One lm-evaluation-harness task `glmrel eval` scores the base model and every branch on."""

    name: str = Field(description="the lm-eval task name (e.g. gsm8k, mmlu_pro, ifeval), or one under include_path")
    num_fewshot: int = Field(default=0, ge=0, description="few-shot examples per question")
    limit: int | None = Field(default=None, ge=1, description="score only the first N questions (null: all)")
    metric: str = Field(
        description="the metric the cards' recovery is computed on, as lm-eval names it in its results "
        "(e.g. acc, exact_match,strict-match, prompt_level_strict_acc)"
    )
    dataset: str | None = Field(
        default=None,
        description="the Hub dataset id the card's evaluation metadata names (default: the task's name)",
    )


class EvalSpec(_Strict):
    """Task recovery measured with lm-evaluation-harness through vLLM (`glmrel eval`): the base
    model's scores once per release, each branch's into its eval.json, recovery = branch / base."""

    tasks: list[EvalTask] = Field(default_factory=list, description="the tasks scored (none: `glmrel eval` refuses)")
    note: str = Field(default="", description="a line the cards show under the recovery tables (what the scores mean)")
    include_path: Path | None = Field(
        default=None, description="a folder of lm-eval task YAMLs (local tasks); lm-eval runs from it"
    )
    apply_chat_template: bool = Field(
        default=True, description="render each question through the model's chat template (chat models)"
    )
    thinking: bool | None = Field(
        default=False,
        description="the chat template's enable_thinking (GLM-4.7's thinking mode; null: the template's default)",
    )
    max_model_len: int = Field(default=4096, ge=64, description="vLLM's context length for the evaluation")
    max_gen_toks: int = Field(default=256, ge=1, description="tokens a generation task may generate at most")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor-parallel size for the branches")
    base_tensor_parallel_size: int | None = Field(
        default=None,
        ge=1,
        description="vLLM tensor-parallel size for the base model (default: tensor_parallel_size; GLM-4.7's 16-bit "
        "weights need 8 H200s, its GS128 branch is refused at 8)",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM's share of GPU memory (on CPU: of host RAM, for its KV cache)"
    )
    python: Path | None = Field(
        default=None,
        description="the vLLM environment's Python, with lm-eval (default: $GLMREL_VLLM_PYTHON, else "
        ".vllm-cpu-env/bin/python)",
    )

    @model_validator(mode="after")
    def _distinct_tasks(self) -> EvalSpec:
        twice = repeated([t.name for t in self.tasks])
        if twice:
            raise ValueError(f"eval task {twice[0]!r} is listed twice; list each task once")
        return self


class ReleaseConfig(_Strict):
    name: str = Field(description="the release's name, on the cards")
    base_model: BaseModelSpec
    hub_repo: str = Field(description="the Hub repo the release is published to (owner/name)")
    output_dir: Path = Field(description="where the branches, the landing page (main/) and glmrel's caches go")
    recipe: Path = Field(description="the llm-compressor recipe template (recipes/glm4moe_awq_w4a16.yaml.j2)")
    calibration: CalibrationSpec
    awq: AwqSpec = AwqSpec()
    offload: OffloadSpec = OffloadSpec()
    serving: ServingSpec = ServingSpec()
    branches: list[BranchSpec] = Field(min_length=1)
    verify: VerifySpec = VerifySpec()
    eval: EvalSpec = EvalSpec()
    templates: Path | None = Field(default=None, description="a folder of card templates (default: glmrel's)")
    changelog: Path | None = Field(default=None, description="the release's changelog (YAML: versions, summaries)")
    publish_remote: str | None = Field(
        default=None,
        description="hf://owner/name for the Hub, or a git URL or path (default: hf://<hub_repo>)",
    )
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        default="bfloat16", description="the dtype the base model is loaded and calibrated in"
    )
    cpu_numerics: Literal["native", "reproducible"] = Field(
        default="native",
        description="reproducible: pin torch's and MKL's CPU kernels to AVX2 and two threads (shared by the ranks of a --gpus run on CPU), so a CPU build "
        "gives the same bits on every run and on machines of one CPU vendor (the demo); native: the host's "
        "fastest kernels",
    )

    @field_validator("hub_repo")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not HUB_REPO_ID.match(v):
            raise ValueError(f"hub_repo {v!r} is not of the form owner/name")
        return v

    @model_validator(mode="after")
    def _unique_branches(self) -> ReleaseConfig:
        dupes = repeated([b.name for b in self.branches])
        if dupes:
            raise ValueError(f"branch names must be unique; repeated: {', '.join(dupes)}")
        return self

    def branch(self, name: str) -> BranchSpec:
        for b in self.branches:
            if b.name == name:
                return b
        raise ReleaseError(
            f"unknown branch {name!r}",
            hint=f"branches in this config: {', '.join(b.name for b in self.branches)}",
        )


_PATH_FIELDS = {
    ("base_model", "path"),
    ("calibration", "path"),
    ("verify", "heldout"),
    ("output_dir",),
    ("recipe",),
    ("templates",),
    ("changelog",),
    ("offload", "folder"),
    ("offload", "pass_store"),
    ("eval", "include_path"),
    ("eval", "python"),
}


def resolve_paths(raw: dict, root: Path) -> dict:
    """A raw config's relative paths (and a local publish_remote) made absolute against `root`."""
    for keys in _PATH_FIELDS:
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            p = Path(node[keys[-1]]).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else (root / p).resolve())
    remote = raw.get("publish_remote")
    if isinstance(remote, str) and not is_network_url(remote) and not Path(remote).is_absolute():
        raw["publish_remote"] = str((root / remote).resolve())
    return raw


def is_network_url(remote: str) -> bool:
    """A remote given as a URL (scheme:// or user@host:), not as a local path."""
    return re.match(r"^[a-z+]+://|^[^/]+@", remote) is not None


def format_validation_error(err: ValidationError, source: Path) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        lines.append(f"{loc}: {msg}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def load_config(path: str | Path) -> ReleaseConfig:
    """Read and validate a release config; raise ReleaseError naming each bad field."""
    source = Path(path)
    if source.is_dir():
        raise ReleaseError(
            f"config {source} is a folder, not a file", hint="pass --config PATH to a release YAML file in it"
        )
    if not source.is_file():
        what = "is not a regular file" if source.exists() else "does not exist"
        raise ReleaseError(f"config file {source} {what}", hint="pass --config PATH to a release YAML")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ReleaseError(
            not_utf8(f"config {source}", e),
            hint="save the config as UTF-8 YAML; configs/glm-4.7.yaml is a full example",
        ) from e
    except OSError as e:
        raise ReleaseError(
            f"cannot read config {source}: {e.strerror or e}", hint="check the file's permissions"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ReleaseError(
            f"config {source} is not valid YAML{where}: {getattr(e, 'problem', None) or e}",
            hint="fix the YAML at that line (indentation, a missing ':' or an unquoted ': ' inside a value); "
            "configs/glm-4.7.yaml is a full example",
        ) from e
    if not isinstance(raw, dict):
        raise ReleaseError(
            f"config {source} must be a YAML mapping at the top level, not {type(raw).__name__ if raw is not None else 'empty'}",
            hint="a release config maps its sections (base_model:, branches:, calibration:, ...); "
            "configs/glm-4.7.yaml is a full example",
        )
    raw = resolve_paths(raw, source.resolve().parent)
    try:
        return ReleaseConfig.model_validate(raw)
    except ValidationError as e:
        raise ReleaseError(
            format_validation_error(e, source),
            hint="fix the fields above; see configs/glm-4.7.yaml for a full example",
        ) from e


def load_for_run(path: str | Path) -> ReleaseConfig:
    """`load_config`, then the process settings the config asks for: the demo's reproducible CPU
    numerics, which must be set before torch is imported (the CLI and each torchrun rank)."""
    cfg = load_config(path)
    if cfg.cpu_numerics == "reproducible":
        from .numerics import pin_reproducible_cpu

        pin_reproducible_cpu()
    return cfg
