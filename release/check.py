"""glmrel check: is a branch folder complete, consistent and servable? Light: no torch.

Reads config.json, the safetensors index and each shard's header (never tensor data), the
manifest, and replays vLLM's kernel rules. Every problem becomes one failed check naming the
file or tensor and what was expected; nothing here raises a traceback for a bad branch.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import parse_local_safetensors_file_metadata
from huggingface_hub.utils import SafetensorsFileMetadata

from .architecture import Glm4MoeArch
from .errors import ReleaseError
from .manifest import MANIFEST_FILE, VERIFY_FILE, HashCache, Manifest, folder_entries, sha256_file
from .vllm_rules import ServeVerdict, serve_verdicts

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = frozenset({"F32", "F16", "BF16"})
TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
# glmrel's own records: a branch glmrel built carries them; a third-party branch does not.
RECORD_FILES = ("recipe.yaml", "provenance.json")
REQUIRED_FILES = MODEL_FILES + RECORD_FILES
BRANCH_GROUP = re.compile(r"_GS(\d+)$")
# group sizes glmrel builds and checks (the config's SUPPORTED_GROUP_SIZES; no import of the
# config module here, which keeps `check` light)
CHECKED_GROUP_SIZES = (-1, 32, 64, 128)
THIRD_PARTY_HINT = "a branch glmrel did not build has none of its records: check it with --third-party"


@dataclass(frozen=True)
class CheckItem:
    check: str
    ok: bool
    message: str
    skipped: bool = False


@dataclass
class CheckReport:
    path: str
    group_size: int | None
    items: list[CheckItem] = field(default_factory=list)
    vllm: list[ServeVerdict] = field(default_factory=list)
    tensors: int = 0
    shards: int = 0
    hashed: bool = True

    @property
    def failures(self) -> list[CheckItem]:
        return [i for i in self.items if not i.ok and not i.skipped]

    @property
    def skipped(self) -> list[CheckItem]:
        return [i for i in self.items if i.skipped]

    @property
    def passed(self) -> bool:
        return not self.failures

    def fail(self, check: str, message: str) -> None:
        self.items.append(CheckItem(check, False, message))

    def ok(self, check: str, message: str) -> None:
        self.items.append(CheckItem(check, True, message))

    def skip(self, check: str, why: str) -> None:
        """A check that did not run, and why (never counted as passed)."""
        self.items.append(CheckItem(check, False, why, skipped=True))

    def diagnose(self, check: str, message: str) -> None:
        """A failure that explains others: listed before every other failure."""
        first = next((n for n, i in enumerate(self.items) if not i.ok and not i.skipped), len(self.items))
        self.items.insert(first, CheckItem(check, False, message))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "group_size": self.group_size,
            "tensors": self.tensors,
            "shards": self.shards,
            "hashed": self.hashed,
            "checks": [asdict(i) for i in self.items],
            "skipped": [f"{i.check}: {i.message}" for i in self.skipped],
            "vllm": [v.to_json() for v in self.vllm],
        }

    def to_text(self, verbose: bool = False) -> str:
        counts = f" ({self.tensors} tensors in {self.shards} shards)" if self.shards else ""
        lines = [f"{self.path}: {'PASSED' if self.passed else 'FAILED'}{counts}"]
        for i in self.items:
            if i.skipped:
                lines.append(f"  skip [{i.check}] skipped: {i.message}")
            elif verbose or not i.ok:
                lines.append(f"  {'ok  ' if i.ok else 'FAIL'} [{i.check}] {i.message}")
        if not self.hashed:
            lines.append("  hashes: skipped (--no-hash); sizes were compared")
        if self.vllm:
            lines.append("  vLLM serving (bf16 activations), per tensor-parallel size:")
            for v in self.vllm:
                if v.target.startswith("Hopper") or verbose:
                    lines.append(f"    [{v.target}] {v.summary()}")
        return "\n".join(lines)


# ---------------------------------------------------------------- safetensors headers


def read_shard(path: Path) -> tuple[SafetensorsFileMetadata | None, list[str]]:
    """Parse one shard's header and validate its layout against the file's real size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return None, [f"{path.name}: cannot stat ({e.strerror})"]
    if size < 8:
        return None, [f"{path.name}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"]
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        return None, [f"{path.name}: header length {n} is absurdly large (limit {MAX_HEADER_BYTES})"]
    if n > size - 8:
        return None, [f"{path.name}: header length {n} runs past the end of the file ({size} bytes)"]
    try:
        meta = parse_local_safetensors_file_metadata(path)
    except Exception as e:  # huggingface_hub raises SafetensorsParsingError, JSON and key errors
        return None, [f"{path.name}: header is not valid safetensors JSON ({type(e).__name__}: {e})"]
    return meta, validate_layout(path.name, meta, size - 8 - n)


def validate_layout(fname: str, meta: SafetensorsFileMetadata, data_size: int) -> list[str]:
    """Every tensor has a known dtype, spans exactly its bytes, ends inside the data region, and
    no two tensors overlap. `data_size` is the file size less the 8-byte length and the header."""
    errors: list[str] = []
    spans = []
    for name, t in meta.tensors.items():
        begin, end = t.data_offsets
        if t.dtype not in DTYPE_BYTES:
            errors.append(f"{fname}: tensor {name} has unknown dtype {t.dtype}")
            continue
        numel = 1
        for d in t.shape:
            numel *= d
        if not 0 <= begin <= end:
            errors.append(f"{fname}: tensor {name} has offsets [{begin}, {end}] out of order")
        elif end > data_size:
            errors.append(
                f"{fname}: tensor {name} ends at byte {end} but the data region holds {data_size} bytes "
                "(truncated shard or out-of-range offsets)"
            )
        elif end - begin != numel * DTYPE_BYTES[t.dtype]:
            errors.append(
                f"{fname}: tensor {name} spans {end - begin} bytes, {t.dtype}{t.shape} needs {numel * DTYPE_BYTES[t.dtype]}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            errors.append(f"{fname}: tensors {n0} and {n1} overlap (bytes {b1}..{e0})")
            break
    return errors


# ---------------------------------------------------------------- expected inventory

Expect = tuple[frozenset[str], tuple[int, ...]]


def expected_inventory(arch: Glm4MoeArch, group_size: int, model_dtype: str) -> tuple[dict[str, Expect], set[str]]:
    """Every tensor a W4A16 GLM-4-MoE branch must hold: name -> (allowed dtypes, shape).

    Returns (required, optional). Quantized Linears carry weight_packed/scale/shape; embeddings,
    norms, routers, lm_head and the MTP layer(s) stay unquantized in the model's dtype (MTP
    tensors are copied from the base checkpoint, so any float dtype is accepted there).
    """
    md = frozenset({model_dtype})
    h, v = arch.hidden_size, arch.vocab_size
    inv: dict[str, Expect] = {
        "model.embed_tokens.weight": (md, (v, h)),
        "model.norm.weight": (md, (h,)),
    }
    optional: set[str] = set()
    if not arch.tie_word_embeddings:
        inv["lm_head.weight"] = (md, (v, h))

    def common(p: str, dtypes: frozenset[str]) -> None:
        inv[p + "input_layernorm.weight"] = (dtypes, (h,))
        inv[p + "post_attention_layernorm.weight"] = (dtypes, (h,))
        if arch.use_qk_norm:
            inv[p + "self_attn.q_norm.weight"] = (dtypes, (arch.head_dim,))
            inv[p + "self_attn.k_norm.weight"] = (dtypes, (arch.head_dim,))

    def router(p: str, dtypes: frozenset[str]) -> None:
        inv[p + "mlp.gate.weight"] = (dtypes, (arch.n_routed_experts, h))
        inv[p + "mlp.gate.e_score_correction_bias"] = (
            frozenset({"F32"}) if dtypes == md else FLOATS,
            (arch.n_routed_experts,),
        )

    for layer in range(arch.num_hidden_layers):
        p = f"model.layers.{layer}."
        common(p, md)
        shapes = arch.quantized_linear_shapes(layer)
        for mod, (out, inp) in shapes.items():
            groups = 1 if group_size == -1 else inp // group_size
            inv[p + mod + ".weight_packed"] = (frozenset({"I32"}), (out, inp // 8))
            inv[p + mod + ".weight_scale"] = (md, (out, groups))
            inv[p + mod + ".weight_shape"] = (frozenset({"I64"}), (2,))
            if arch.attention_bias and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                inv[p + mod + ".bias"] = (md, (out,))
        if layer >= arch.first_k_dense_replace:
            router(p, md)
    for layer in arch.mtp_layers:
        p = f"model.layers.{layer}."
        common(p, FLOATS)
        router(p, FLOATS)
        for mod, (out, inp) in arch.quantized_linear_shapes(arch.num_hidden_layers - 1).items():
            inv[p + mod + ".weight"] = (FLOATS, (out, inp))
            if arch.attention_bias and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                inv[p + mod + ".bias"] = (FLOATS, (out,))
        inv[p + "eh_proj.weight"] = (FLOATS, (h, 2 * h))
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            inv[p + norm + ".weight"] = (FLOATS, (h,))
        for shared in ("shared_head.head.weight", "embed_tokens.weight"):  # some GLM releases share these
            inv[p + shared] = (FLOATS, (v, h))
            optional.add(p + shared)
    return inv, optional


QUANT_SUFFIX = re.compile(r"\.(weight_packed|weight_scale|weight_shape|weight_zero_point|weight_g_idx)$")
FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)(_\w+)?$")


def _compare_inventory(
    report: CheckReport,
    found: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, Expect],
    optional: set[str],
    mtp_layers: list[int] = [],  # noqa: B006 (read only)
) -> None:
    problems: list[str] = []
    quantized_modules = {QUANT_SUFFIX.sub("", k) for k in expected if k.endswith(".weight_packed")}
    for name, (dtypes, shape) in expected.items():
        got = found.get(name)
        if got is None:
            if name not in optional:
                problems.append(f"missing tensor {name} (expected {'/'.join(sorted(dtypes))}{list(shape)})")
            continue
        if got[0] not in dtypes or got[1] != shape:
            problems.append(
                f"tensor {name} is {got[0]}{list(got[1])}, expected {'/'.join(sorted(dtypes))}{list(shape)}"
            )
    for name in found.keys() - expected.keys():
        if FUSED_EXPERTS.search(name):
            problems.append(
                f"tensor {name} is a fused expert tensor; vLLM maps experts stored per expert (mlp.experts.{{e}}.*)"
            )
        elif name.endswith(".weight") and name[: -len(".weight")] in quantized_modules:
            problems.append(f"tensor {name} is a dense weight left beside the packed one of a quantized module")
        else:
            problems.append(f"unexpected tensor {name}")
    fused = sorted(n for n in found if FUSED_EXPERTS.search(n))
    if fused:
        report.diagnose(
            "inventory",
            f"the routed experts are stored fused ({len(fused)} tensors such as {fused[0]}): vLLM's compressed-tensors "
            "MoE loader maps experts stored one by one (mlp.experts.{e}.gate_proj/up_proj/down_proj); the missing "
            "per-expert tensors below follow from this",
        )
        problems = [p for p in problems if not (p.startswith("missing tensor") and ".mlp.experts." in p)] + [
            f"missing {sum(1 for p in problems if p.startswith('missing tensor') and '.mlp.experts.' in p)} "
            "per-expert tensors (mlp.experts.{e}.*), stored fused instead"
        ]
    for layer in mtp_layers:
        prefix = f"model.layers.{layer}."
        required = [n for n in expected if n.startswith(prefix) and n not in optional]
        if required and not any(n.startswith(prefix) for n in found):
            report.diagnose(
                "inventory",
                f"the MTP layer is missing: none of its {len(required)} tensors ({prefix}*) is in the branch; vLLM's "
                "MTP speculative decoding loads them (glmrel carries them over from the base model unquantized)",
            )
            problems = [p for p in problems if not p.startswith(f"missing tensor {prefix}")]
    for p in problems[:50]:
        report.fail("inventory", p)
    if len(problems) > 50:
        report.fail("inventory", f"... and {len(problems) - 50} more inventory problems")
    if not problems:
        report.ok(
            "inventory",
            f"all {len(expected) - len(optional & (expected.keys() - found.keys()))} expected tensors present with the right dtypes and shapes",
        )


# ---------------------------------------------------------------- config metadata


def _ignored(name: str, ignore: list[str]) -> bool:
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):
                return True
        elif entry == name:
            return True
    return False


def _check_quantization_config(report: CheckReport, cfg: dict, arch: Glm4MoeArch, group_size: int | None) -> int | None:
    before = len(report.failures)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        report.fail("config", "config.json has no quantization_config (is this an unquantized checkpoint?)")
        return None
    expect_top = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed"}
    for k, want in expect_top.items():
        if qc.get(k) != want:
            report.fail("config", f"quantization_config.{k} is {qc.get(k)!r}, expected {want!r}")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        report.fail("config", f"quantization_config.config_groups has {len(groups)} groups, expected exactly 1")
        return None
    ((gname, group),) = groups.items()
    w = group.get("weights") or {}
    want_w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for k, value in want_w.items():
        if w.get(k) != value:
            report.fail("config", f"config_groups.{gname}.weights.{k} is {w.get(k)!r}, expected {value!r}")
    found_gs = w.get("group_size")
    if group_size is not None and found_gs != group_size:
        report.fail(
            "config", f"config_groups.{gname}.weights.group_size is {found_gs!r}, but the branch is GS{group_size}"
        )
    for act in ("input_activations", "output_activations"):
        if group.get(act) is not None:
            report.fail("config", f"config_groups.{gname}.{act} is set; W4A16 keeps activations unquantized")
    if group.get("targets") != ["Linear"]:
        report.fail("config", f"config_groups.{gname}.targets is {group.get('targets')!r}, expected ['Linear']")
    ignore = qc.get("ignore") or []
    needed = ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in arch.moe_layers]
    needed += [f"model.layers.{i}.self_attn.q_proj" for i in arch.mtp_layers]
    missing = [n for n in needed if not _ignored(n, ignore)]
    if missing:
        report.fail(
            "config",
            f"quantization_config.ignore does not cover {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
        )
    if len(report.failures) == before:
        report.ok(
            "config",
            f"compressed-tensors pack-quantized INT4 symmetric group {found_gs}; lm_head, routers and MTP ignored",
        )
    return found_gs if isinstance(found_gs, int) else None


# ---------------------------------------------------------------- files


def _check_required(
    report: CheckReport, names: set[str], tokenizer_config: Callable[[], dict], third_party: bool = False
) -> None:
    for req in MODEL_FILES if third_party else REQUIRED_FILES:
        if req not in names:
            report.fail("files", f"required file {req} is missing")
    if third_party:
        report.skip("records", f"{', '.join(RECORD_FILES)}: glmrel's build records (--third-party)")
    elif not (set(RECORD_FILES) | {MANIFEST_FILE, VERIFY_FILE}) & names:
        report.diagnose(
            "records",
            f"none of glmrel's records (recipe.yaml, provenance.json, manifest.json, verify.json); {THIRD_PARTY_HINT}",
        )
    if not ({"tokenizer.json", "tokenizer.model"} & names):
        report.fail("files", "no tokenizer (tokenizer.json or tokenizer.model)")
    if "chat_template.jinja" not in names and not tokenizer_config().get("chat_template"):
        report.fail("files", "no chat template (chat_template.jinja or tokenizer_config.json's chat_template)")


def _check_index(
    report: CheckReport, names: set[str], read_index: Callable[[], Any]
) -> tuple[list[str], dict[str, str] | None]:
    """Which shards to read: those the index names (each must exist, no stray shard), or the
    single shard when there is no index. Returns (shard names, weight map or None)."""
    shards_present = sorted(n for n in names if n.endswith(".safetensors"))
    if INDEX_FILE not in names:
        if len(shards_present) == 1:
            return shards_present, None
        if not shards_present:
            report.fail("files", "no *.safetensors weights")
        else:
            report.fail("files", f"{len(shards_present)} shards but no {INDEX_FILE}")
        return [], None
    try:
        weight_map = read_index()["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        report.fail("files", f"{INDEX_FILE} is unreadable or has no weight_map ({e!r})")
        weight_map = {}
    referenced = sorted(set(weight_map.values()))
    shards = []
    for shard in referenced:
        if "/" in shard or "\\" in shard or shard.startswith(".."):
            report.fail("files", f"{INDEX_FILE} names shard {shard!r} outside the branch folder")
        elif shard not in names:
            report.fail("files", f"{INDEX_FILE} names shard {shard} which is missing")
        else:
            shards.append(shard)
    for stray in sorted(set(shards_present) - set(referenced)):
        report.fail("files", f"shard {stray} is not referenced by {INDEX_FILE} (stray shard)")
    return shards, weight_map


def _json_file(path: Path) -> Any:
    return json.loads(path.read_text())


def _folder_entries(report: CheckReport, folder: Path) -> set[str]:
    """Names of the regular files a branch folder publishes; every symbolic link, sub-folder or
    other entry is a failure (publish refuses them too: nothing outside the folder is read)."""
    files, others = folder_entries(folder)
    for p, kind in others:
        if kind == "link":
            report.fail(
                "files", f"{p.name} is a symbolic link (to {os.readlink(p)}); a branch holds regular files only"
            )
        elif kind == "folder":
            report.fail("files", f"{p.name}/ is a sub-folder; a branch holds a flat set of files (move it out)")
        else:
            report.fail("files", f"{p.name} is not a regular file")
    return {p.name for p in files}


def _check_manifest_entries(
    report: CheckReport, manifest: Manifest, sizes: dict[str, int], digest: Callable[[str], str | None], how: str
) -> None:
    """The files against the manifest: the same names, sizes and (where `digest` gives one) sha256."""
    before = len(report.failures)
    for extra in sorted(sizes.keys() - manifest.files.keys()):
        report.fail("manifest", f"file {extra} is not in the manifest")
    for gone in sorted(manifest.files.keys() - sizes.keys()):
        report.fail("manifest", f"file {gone} is listed in the manifest but missing")
    for name in sorted(sizes.keys() & manifest.files.keys()):
        entry = manifest.files[name]
        if sizes[name] != entry.size:
            report.fail(
                "manifest",
                f"file {name} is {sizes[name]} bytes, the manifest says {entry.size} (changed after the manifest was written)",
            )
            continue
        got = digest(name)
        if got is not None and got != entry.sha256:
            report.fail(
                "manifest",
                f"file {name} has a different sha256 than the manifest (changed after the manifest was written)",
            )
    if len(report.failures) == before:
        report.ok("manifest", f"{len(sizes)} files match the manifest ({how})")


def _check_verification(report: CheckReport, record: Any, manifest: Manifest | None, branch: str) -> None:
    """verify.json must exist, record a passed verification, and be about this very content:
    the digest it names equals the manifest's digest of the branch's files."""
    rerun = f"run `glmrel verify --branch {branch}` (or `glmrel build-all`)"
    if record is None:
        report.fail("verification", f"no {VERIFY_FILE}: this content was never verified; {rerun}")
        return
    if not isinstance(record, dict):
        report.fail("verification", f"{VERIFY_FILE} is not a JSON object; {rerun}")
        return
    if record.get("passed") is not True:
        why = "; ".join(str(f) for f in record.get("failures") or []) or "passed is not true"
        report.fail("verification", f"{VERIFY_FILE} records a FAILED verification ({why}); a failed branch never ships")
        return
    if manifest is None:
        report.fail("verification", f"without a manifest the content {VERIFY_FILE} names cannot be compared")
        return
    verified, now = record.get("content_sha256"), manifest.content_digest()
    if verified != now:
        report.fail(
            "verification",
            f"{VERIFY_FILE} is about other content (it verified {str(verified)[:12] or 'an unnamed digest'}, "
            f"the files are {now[:12]}): the branch changed after it was verified; {rerun}",
        )
        return
    report.ok(
        "verification",
        f"verified this content ({now[:12]}): mean KL {record.get('mean_kl')}, top-1 {record.get('top1_agreement')}",
    )


def _check_files(
    report: CheckReport, folder: Path, no_hash: bool, third_party: bool, rehash: bool = True
) -> tuple[list[Path], dict[str, str] | None, Manifest | None]:
    """Entry safety, required files, index vs shards, manifest sizes/hashes. Returns the shards
    to read, the index's weight map (None without an index) and the manifest (if usable)."""
    names = _folder_entries(report, folder)

    def tokenizer_config() -> dict:
        try:
            return dict(_json_file(folder / "tokenizer_config.json"))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return {}

    _check_required(report, names, tokenizer_config, third_party)
    shard_names, weight_map = _check_index(report, names, lambda: _json_file(folder / INDEX_FILE))
    shards = [folder / n for n in shard_names]

    manifest = None
    if third_party:
        report.skip("manifest", f"{MANIFEST_FILE}: glmrel's file record (--third-party)")
        return shards, weight_map, None
    if MANIFEST_FILE not in names:
        report.fail(
            "manifest", f"no {MANIFEST_FILE} in the branch (build-all writes it; or run `glmrel manifest PATH`)"
        )
        return shards, weight_map, None
    try:
        manifest = Manifest.load(folder / MANIFEST_FILE)
    except ReleaseError as e:
        report.fail("manifest", e.message)
        return shards, weight_map, None
    files = sorted(names - {MANIFEST_FILE})
    sizes = {n: (folder / n).stat().st_size for n in files}
    if no_hash:
        digest: Callable[[str], str | None] = lambda n: None  # noqa: E731
        how = "sizes"
    elif rehash:
        digest, how = (lambda n: sha256_file(folder / n)), "sizes and sha256"
    else:
        # a file whose size, mtime, inode and ctime are those it had when hashed is not read
        # again (git's index does the same; ctime cannot be set back); the rest are hashed now
        listed = [folder / n for n in files if n in manifest.files and sizes[n] == manifest.files[n].size]
        known, read = HashCache(folder).hashes_and_read(listed)
        digest = lambda n: known[n][1] if n in known else None  # noqa: E731
        vouched = len(listed) - len(read)
        how = "sizes and sha256" + (f"; {vouched} unchanged since hashed, not read again" if vouched else "")
    _check_manifest_entries(report, manifest, sizes, digest, how)
    return shards, weight_map, manifest


# ---------------------------------------------------------------- entry point


def expected_group_size(folder: Path, explicit: int | None) -> int | None:
    if explicit is not None:
        return explicit
    m = BRANCH_GROUP.search(folder.name)
    return int(m[1]) if m else None


def check_branch(
    path: Path,
    *,
    group_size: int | None = None,
    no_hash: bool = False,
    third_party: bool = False,
    rehash: bool = True,
) -> CheckReport:
    """Check one branch folder. The group size comes from the argument or the folder's `_GS<n>` suffix.
    `third_party`: a branch glmrel did not build; its records (manifest, provenance, recipe,
    verification) are listed as skipped instead of required. `rehash` False: a file the
    release's hash cache vouches for (unchanged size, mtime, inode and ctime since it was
    hashed) is not read again (`publish` with nothing changed reads no weight file)."""
    folder = Path(path)
    if not folder.is_dir() or folder.is_symlink():
        raise ReleaseError(
            f"{folder} is not a folder", hint="pass the path of a built branch, e.g. out/demo/W4A16_GS64"
        )
    report = CheckReport(str(folder), expected_group_size(folder, group_size), hashed=not no_hash)
    shards, weight_map, manifest = _check_files(report, folder, no_hash, third_party, rehash)
    if third_party:
        report.skip("verification", f"{VERIFY_FILE}: glmrel's verification record (--third-party)")
    else:
        try:
            record = _json_file(folder / VERIFY_FILE) if (folder / VERIFY_FILE).is_file() else None
        except (OSError, json.JSONDecodeError):
            record = "unreadable"
        _check_verification(report, record, manifest, folder.name)
    found = _read_all_shards(report, [(p.name, functools.partial(read_shard, p)) for p in shards])
    try:
        cfg = _json_file(folder / "config.json")
    except (OSError, json.JSONDecodeError) as e:
        report.fail("config", f"config.json is unreadable: {e}")
        return report
    _check_model(report, cfg, str(folder / "config.json"), found, weight_map)
    return report


Found = dict[str, tuple[str, tuple[int, ...], str]]


def group_size_from_scales(arch: Glm4MoeArch, found: Found) -> int | None:
    """The group size the stored scales imply (input dim / scale columns), when every
    quantized Linear's scales agree; None when there are none or they disagree. A Linear with
    one scale column per row fits per-channel scales and any group at least its input wide."""
    sizes, single = set(), []
    for layer in range(arch.num_hidden_layers):
        for mod, (_out, inp) in arch.quantized_linear_shapes(layer).items():
            got = found.get(f"model.layers.{layer}.{mod}.weight_scale")
            if got is None or len(got[1]) != 2 or got[1][1] < 1:
                continue
            groups = got[1][1]
            if groups == 1:
                single.append(inp)
            else:
                sizes.add(inp // groups if inp % groups == 0 else 0)
    if not sizes:
        return -1 if single else None
    if len(sizes) != 1 or 0 in sizes:
        return None
    (size,) = sizes
    return size if all(inp <= size for inp in single) else None


def _check_model(
    report: CheckReport, cfg: dict, cfg_source: str, found: Found, weight_map: dict[str, str] | None
) -> None:
    """What a branch holds against what its config.json says it must: quantization metadata,
    index vs shard headers, the full tensor inventory, and vLLM's kernel rules. Where the
    config's group size disagrees with the scales, that is said first, and the inventory is
    read at the scales' group size (so it lists real problems, not that one 50 times)."""
    try:
        arch = Glm4MoeArch.from_config(cfg, cfg_source)
    except ReleaseError as e:
        report.fail("config", e.message)
        return
    gs_config = _check_quantization_config(report, cfg, arch, report.group_size)
    gs_scales = group_size_from_scales(arch, found)
    # each diagnosis goes before every failure so far: the last one said is read first
    if gs_config is not None and gs_config not in CHECKED_GROUP_SIZES:
        report.diagnose(
            "config",
            f"group_size {gs_config} is not one glmrel builds and checks ({', '.join(map(str, CHECKED_GROUP_SIZES))}); "
            "vLLM's Marlin kernels take -1, 32, 64 and 128",
        )
    if gs_config is not None and gs_scales is not None and gs_config != gs_scales:
        report.diagnose(
            "config",
            f"config.json says group_size {gs_config}, the scales say {gs_scales}: the quantization_config does not "
            "describe these weights (vLLM would read them wrongly)",
        )
    if report.group_size is None:
        report.group_size = gs_scales if gs_scales is not None else gs_config
    if weight_map is not None:
        mapped, present = set(weight_map), set(found)
        for name in sorted(mapped - present)[:20]:
            report.fail("files", f"{INDEX_FILE} maps tensor {name} but no shard holds it")
        for name in sorted(present - mapped)[:20]:
            report.fail("files", f"tensor {name} is in a shard but not in {INDEX_FILE}")
        for name in sorted(mapped & present):
            if weight_map[name] != found[name][2]:
                report.fail("files", f"{INDEX_FILE} maps {name} to {weight_map[name]} but it is in {found[name][2]}")
                break
    model_dtype = TORCH_TO_ST.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "BF16")
    if report.group_size is not None:
        expected, optional = expected_inventory(arch, report.group_size, model_dtype)
        _compare_inventory(report, {k: (v[0], v[1]) for k, v in found.items()}, expected, optional, arch.mtp_layers)
        report.vllm = serve_verdicts(arch, report.group_size, act_dtype={"F16": "float16"}.get(model_dtype, "bfloat16"))
    else:
        report.fail("config", "cannot tell the branch's group size (no _GS<n> suffix and no group_size in config)")


ShardReader = Callable[[], tuple[SafetensorsFileMetadata | None, list[str]]]


def _read_all_shards(report: CheckReport, shards: list[tuple[str, ShardReader]]) -> Found:
    found: Found = {}
    errors = 0
    for shard, read in shards:
        meta, problems = read()
        for p in problems:
            report.fail("headers", p)
        errors += len(problems)
        if meta is None:
            continue
        for name, t in meta.tensors.items():
            if name in found:
                report.fail("headers", f"tensor {name} appears in both {found[name][2]} and {shard}")
            found[name] = (t.dtype, tuple(t.shape), shard)
    report.tensors, report.shards = len(found), len(shards)
    if not errors and shards:
        report.ok("headers", f"{len(shards)} shard headers valid")
    return found


def check_manifest_file(path: Path, group_size: int | None = None) -> CheckReport:
    """CI's light check of a committed manifest: schema, required files, quantization metadata."""
    report = CheckReport(str(path), group_size)
    try:
        m = Manifest.load(Path(path))
    except ReleaseError as e:
        report.fail("manifest", e.message)
        return report
    gs = group_size if group_size is not None else expected_group_size(Path(m.branch), None)
    report.group_size = gs
    for req in REQUIRED_FILES + (VERIFY_FILE, INDEX_FILE):
        if req not in m.files:
            report.fail("manifest", f"required file {req} is not listed")
    if not any(n.endswith(".safetensors") for n in m.files):
        report.fail("manifest", "no *.safetensors shard is listed")
    for name, entry in m.files.items():
        if "/" in name or name.startswith(".") or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256) or entry.size < 0:
            report.fail("manifest", f"entry {name!r} is malformed (name, size or sha256)")
    q = m.quantization
    want = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
    }
    for k, v in want.items():
        if q.get(k) != v:
            report.fail("quantization", f"{k} is {q.get(k)!r}, expected {v!r}")
    if gs is not None and q.get("group_size") != gs:
        report.fail("quantization", f"group_size is {q.get('group_size')!r}, but the branch is GS{gs}")
    if "lm_head" not in (q.get("ignore") or []):
        report.fail("quantization", "lm_head is not in ignore")
    if report.passed:
        report.ok("manifest", f"{len(m.files)} files, {m.total_bytes} bytes, GS{q.get('group_size')}")
    return report


# ---------------------------------------------------------------- a published revision


def check_remote(
    repo_id: str,
    revision: str,
    *,
    group_size: int | None = None,
    api: Any = None,
    token: str | None = None,
    third_party: bool = False,
) -> CheckReport:
    """Check a published Hub revision without downloading weights.

    The file list, sizes and LFS sha256 come from `list_repo_tree`; small (non-LFS) files are
    downloaded and hashed; shard headers are read with `parse_safetensors_file_metadata` (HTTP
    Range requests). Shards are taken from the index rather than `get_safetensors_metadata`,
    which reads only `model.safetensors` when that file exists — and compressed-tensors writes
    the MTP layer to a second shard beside it, listed in the index.
    """
    import os
    import tempfile

    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = api or HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    report = CheckReport(f"{repo_id}@{revision}", expected_group_size(Path(revision), group_size))
    try:
        tree = {
            f.path: f
            for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
            if getattr(f, "size", None) is not None and f.path != ".gitattributes"
        }
    except RepositoryNotFoundError as e:
        raise ReleaseError(
            f"repository {repo_id} was not found (or the token cannot read it)",
            hint="check the repo id, and HF_TOKEN for a private repo",
        ) from e
    except RevisionNotFoundError as e:
        raise ReleaseError(
            f"{repo_id} has no revision {revision}",
            hint=f"list its branches and tags with `hf repo-refs {repo_id}` or publish first",
        ) from e
    except (HfHubHTTPError, httpx.HTTPError) as e:
        raise ReleaseError(
            f"cannot list {repo_id}@{revision} on {api.endpoint}: {type(e).__name__}: {e}",
            hint="check the network and HF_ENDPOINT",
        ) from e
    names = {p for p in tree if "/" not in p}
    for nested in sorted(set(tree) - names):
        report.fail("files", f"{nested} is in a subfolder; a branch holds a flat set of files")

    with tempfile.TemporaryDirectory(prefix="glmrel-remote-") as tmp:

        def fetch(name: str) -> Path:
            # the cache's snapshot entry is a link into its blob store (inside `tmp`)
            return Path(api.hf_hub_download(repo_id, name, revision=revision, cache_dir=tmp)).resolve()

        def json_of(name: str) -> Any:
            try:
                return _json_file(fetch(name))
            except (HfHubHTTPError, httpx.HTTPError) as e:
                raise OSError(f"cannot download {name}: {e}") from e

        def tokenizer_config() -> dict:
            try:
                return dict(json_of("tokenizer_config.json"))
            except (OSError, json.JSONDecodeError, TypeError, ValueError):
                return {}

        _check_required(report, names, tokenizer_config, third_party)
        shard_names, weight_map = _check_index(report, names, lambda: json_of(INDEX_FILE))

        manifest = None
        if third_party:
            report.skip("manifest", f"{MANIFEST_FILE}: glmrel's file record (--third-party)")
            report.skip("verification", f"{VERIFY_FILE}: glmrel's verification record (--third-party)")
        elif MANIFEST_FILE not in names:
            report.fail("manifest", f"no {MANIFEST_FILE} in the revision")
        else:
            try:
                manifest = Manifest.from_json(json_of(MANIFEST_FILE), f"{revision}:{MANIFEST_FILE}")
            except (OSError, json.JSONDecodeError, ReleaseError) as e:
                report.fail("manifest", getattr(e, "message", str(e)))
        if manifest is not None:
            published = {n: tree[n] for n in names if n != MANIFEST_FILE}

            def digest(name: str) -> str:
                f = published[name]
                return f.lfs.sha256 if f.lfs is not None else sha256_file(fetch(name))

            _check_manifest_entries(
                report, manifest, {n: f.size for n, f in published.items()}, digest, "sizes; LFS and file sha256"
            )
        if not third_party:
            try:
                record = json_of(VERIFY_FILE) if VERIFY_FILE in names else None
            except (OSError, json.JSONDecodeError):
                record = "unreadable"
            _check_verification(report, record, manifest, revision)

        def header(shard: str) -> ShardReader:
            def read() -> tuple[SafetensorsFileMetadata | None, list[str]]:
                try:
                    meta = api.parse_safetensors_file_metadata(repo_id, shard, revision=revision)
                except Exception as e:  # huggingface_hub raises SafetensorsParsingError and HTTP errors
                    return None, [f"{shard}: header cannot be read ({type(e).__name__}: {e})"]
                # The header's own length is not returned, so size - 8 bounds the data region from
                # above; the LFS sha256 matched against the manifest pins the exact bytes.
                return meta, validate_layout(shard, meta, tree[shard].size - 8)

            return read

        found = _read_all_shards(report, [(s, header(s)) for s in shard_names])
        try:
            cfg = json_of("config.json")
        except (OSError, json.JSONDecodeError) as e:
            report.fail("config", f"config.json is unreadable: {e}")
            return report
        _check_model(report, cfg, f"{revision}:config.json", found, weight_map)
    return report
