"""What a branch must be, check by check, whichever source its files come from (a local
folder or a Hub revision: sources.py): required files, index against shards, the manifest's
names, sizes and digests, the verification record, the quantization metadata, the tensor
inventory (`layout.expected_inventory`) and vLLM's kernel rules. Each problem is one failed
item of the report naming the file or tensor; nothing raises for a bad branch."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..architecture import Glm4MoeArch
from ..errors import ReleaseError
from ..layout import (
    FUSED_EXPERTS,
    INDEX_FILE,
    QUANT_SUFFIX,
    SUPPORTED_GROUP_SIZES,
    TORCH_TO_ST,
    Expect,
    Found,
    expected_inventory,
    group_size_from_scales,
    mtp_prefix,
    name_in_folder,
)
from ..manifest import MANIFEST_FILE, VERIFY_FILE, Manifest
from ..serving.rules import serve_verdicts
from .report import CheckReport
from .sources import ShardReader

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
# glmrel's own records: a branch glmrel built carries them; a third-party branch does not.
RECORD_FILES = ("recipe.yaml", "provenance.json")
REQUIRED_FILES = MODEL_FILES + RECORD_FILES
BRANCH_GROUP = re.compile(r"_GS(\d+)$")
REFUSED = "it is not a regular file of the branch"  # why a shard the `files` check refused is not read
THIRD_PARTY_HINT = "a branch glmrel did not build has none of its records: check it with --third-party"


def compare_inventory(
    report: CheckReport,
    found: dict[str, tuple[str, tuple[int, ...]]],
    expected: dict[str, Expect],
    optional: set[str],
    mtp_layers: list[int] = [],  # noqa: B006 (read only)
    unchecked: set[str] = set(),  # noqa: B006 (read only): held by shards that could not be read
) -> None:
    problems: list[str] = []
    quantized_modules = {QUANT_SUFFIX.sub("", k) for k in expected if k.endswith(".weight_packed")}
    for name, (dtypes, shape) in expected.items():
        got = found.get(name)
        if got is None:
            if name not in optional and name not in unchecked:
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
        if required and not any(n in unchecked for n in required) and not any(n.startswith(prefix) for n in found):
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
        absent = expected.keys() - found.keys()
        checked = len(expected) - len((optional | unchecked) & absent)
        report.ok(
            "inventory",
            f"all {checked} expected tensors present with the right dtypes and shapes"
            if not unchecked & absent
            else f"the {checked} expected tensors of the shards that were read present with the right dtypes and shapes",
        )


# ---------------------------------------------------------------- config metadata


def ignored(name: str, ignore: list[str]) -> bool:
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):
                return True
        elif entry == name:
            return True
    return False


def check_quantization_config(report: CheckReport, cfg: dict, arch: Glm4MoeArch, group_size: int | None) -> int | None:
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
    needed += [mtp_prefix(i) + "self_attn.q_proj" for i in arch.mtp_layers]
    missing = [n for n in needed if not ignored(n, ignore)]
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


def check_required(
    report: CheckReport, names: set[str], tokenizer_config: Callable[[], dict], third_party: bool = False
) -> None:
    for req in MODEL_FILES if third_party else REQUIRED_FILES:
        if req not in names and req not in report.rejected:  # a refused one (a link...) was said
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


def check_index(
    report: CheckReport, names: set[str], read_index: Callable[[], Any]
) -> tuple[list[str], dict[str, str] | None, dict[str, str]]:
    """Which shards to read: those the index names (each must exist, no stray shard), or the
    single shard when there is no index. Returns (shard names to read, weight map or None, and
    the named shards that cannot be read, with why): a shard the `files` check refused (a link,
    a sub-folder) is not said again here."""
    shards_present = sorted(n for n in names if n.endswith(".safetensors"))
    if INDEX_FILE not in names:
        if len(shards_present) == 1:
            return shards_present, None, {}
        refused = sorted(n for n in report.rejected if n.endswith(".safetensors"))
        if not shards_present and len(refused) == 1:  # the one shard is a link (said): not "no weights"
            return [], None, {refused[0]: REFUSED}
        if not shards_present:
            report.fail("files", "no *.safetensors weights")
        else:
            report.fail("files", f"{len(shards_present)} shards but no {INDEX_FILE}")
        return [], None, {}
    try:
        weight_map = read_index()["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:  # ValueError: not JSON, not UTF-8
        report.fail("files", f"{INDEX_FILE} is unreadable or has no weight_map ({type(e).__name__}: {str(e)[:200]})")
        weight_map = {}
    referenced = sorted(set(weight_map.values()))
    shards: list[str] = []
    unread: dict[str, str] = {}
    for shard in referenced:
        if not name_in_folder(shard):
            report.fail("files", f"{INDEX_FILE} names shard {shard!r} outside the branch folder")
            unread[shard] = "it is outside the branch folder"
        elif shard in report.rejected:
            unread[shard] = REFUSED
        elif shard not in names:
            report.fail("files", f"{INDEX_FILE} names shard {shard} which is missing")
            unread[shard] = "it is missing"
        else:
            shards.append(shard)
    for stray in sorted(set(shards_present) - set(referenced)):
        report.fail("files", f"shard {stray} is not referenced by {INDEX_FILE} (stray shard)")
    return shards, weight_map, unread


def check_manifest_entries(
    report: CheckReport, manifest: Manifest, sizes: dict[str, int], digest: Callable[[str], str | None], how: str
) -> None:
    """The files against the manifest: the same names, sizes and (where `digest` gives one) sha256."""
    before = len(report.failures)
    for extra in sorted(sizes.keys() - manifest.files.keys()):
        report.fail("manifest", f"file {extra} is not in the manifest")
    for gone in sorted(manifest.files.keys() - sizes.keys() - report.rejected):  # a refused one was said
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


def check_verification(report: CheckReport, record: Any, manifest: Manifest | None, branch: str) -> None:
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


def expected_group_size(folder: Path, explicit: int | None) -> int | None:
    if explicit is not None:
        return explicit
    m = BRANCH_GROUP.search(folder.name)
    return int(m[1]) if m else None


def check_model(
    report: CheckReport,
    cfg: dict,
    cfg_source: str,
    found: Found,
    weight_map: dict[str, str] | None,
    unread: dict[str, str] | None = None,
) -> None:
    """What a branch holds against what its config.json says it must: quantization metadata,
    index vs shard headers, the full tensor inventory, and vLLM's kernel rules. Where the
    config's group size disagrees with the scales, that is said first, and the inventory is
    read at the scales' group size (so it lists real problems, not that one 50 times).
    `unread`: shards that could not be read (and why; their own failure was said): the tensors
    they hold are listed as not checked, once a shard, instead of as missing one by one."""
    unread = unread or {}
    try:
        arch = Glm4MoeArch.from_config(cfg, cfg_source)
    except ReleaseError as e:
        report.fail("config", e.message)
        return
    gs_config = check_quantization_config(report, cfg, arch, report.group_size)
    gs_scales = group_size_from_scales(arch, found)
    # each diagnosis goes before every failure so far: the last one said is read first
    if gs_config is not None and gs_config not in SUPPORTED_GROUP_SIZES:
        report.diagnose(
            "config",
            f"group_size {gs_config} is not one glmrel builds and checks ({', '.join(map(str, SUPPORTED_GROUP_SIZES))}); "
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
    unchecked: set[str] = set()
    if weight_map is not None:
        for shard, why in sorted(unread.items()):
            held = {n for n, s in weight_map.items() if s == shard}
            unchecked |= held
            report.skip("inventory", f"{len(held)} tensors {INDEX_FILE} maps to {shard}: not checked, {why}")
        mapped, present = set(weight_map) - unchecked, set(found)
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
        if weight_map is None and unread:  # the one shard could not be read: nothing to compare
            report.skip("inventory", f"the tensors: not checked, the only shard {next(iter(unread))} could not be read")
        else:
            compare_inventory(
                report,
                {k: (v[0], v[1]) for k, v in found.items()},
                expected,
                optional,
                arch.mtp_layers,
                unchecked=unchecked,
            )
        report.vllm = serve_verdicts(arch, report.group_size, act_dtype={"F16": "float16"}.get(model_dtype, "bfloat16"))
    else:
        report.fail("config", "cannot tell the branch's group size (no _GS<n> suffix and no group_size in config)")


def read_all_shards(report: CheckReport, shards: list[tuple[str, ShardReader]]) -> tuple[Found, dict[str, str]]:
    """Every shard's header: the tensors found, and the shards whose header could not be read
    (with why; the header's own failure says what is wrong)."""
    found: Found = {}
    unread: dict[str, str] = {}
    errors = 0
    for shard, read in shards:
        meta, problems = read()
        for p in problems:
            report.fail("headers", p)
        errors += len(problems)
        if meta is None:
            unread[shard] = "its header cannot be read"
            continue
        for name, t in meta.tensors.items():
            if name in found:
                report.fail("headers", f"tensor {name} appears in both {found[name][2]} and {shard}")
            found[name] = (t.dtype, tuple(t.shape), shard)
    report.tensors, report.shards = len(found), len(shards)
    if not errors and shards:
        report.ok("headers", f"{len(shards)} shard headers valid")
    return found, unread
