"""layout.copy_tensors: a safetensors file written by copying its tensors' bytes from other files
(a side branch's shards, the MTP layer's shard) is the file safetensors' own `save_file` writes
of those tensors, byte for byte, and it never loads them; where the library's layout is not the
one this module writes, it falls back to `save_file` itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from release.errors import ReleaseError
from release.layout import _library_order, copy_tensors


def _sources(tmp_path):
    """Two source files, with tensors of several dtypes and shapes interleaved with others."""
    g = torch.Generator().manual_seed(0)
    a = {
        "model.layers.4.eh_proj.weight": torch.randn(6, 12, generator=g).to(torch.bfloat16),
        "model.layers.4.enorm.weight": torch.randn(6, generator=g),
        "model.layers.3.mlp.gate.weight": torch.randn(5, 6, generator=g),
        "model.layers.4.mlp.experts.0.down_proj.weight_packed": torch.randint(-8, 7, (3, 2), dtype=torch.int32),
        "model.layers.4.flag": torch.tensor([True, False, True]),
        "model.layers.4.scalar": torch.tensor(2.5, dtype=torch.float16),
        "model.layers.4.empty": torch.zeros(0, 4),
        "model.layers.4.ß-non-ascii": torch.arange(5, dtype=torch.int8),
    }
    b = {
        "model.layers.4.hnorm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
        "model.layers.4.big": torch.randn(300, 70, generator=g).double(),
        "model.layers.2.other": torch.ones(3),
    }
    save_file(a, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    save_file(b, str(tmp_path / "b.safetensors"))
    tensors = {**a, **b}
    source = {**dict.fromkeys(a, tmp_path / "a.safetensors"), **dict.fromkeys(b, tmp_path / "b.safetensors")}
    return tensors, source


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_the_copy_is_the_librarys_own_file_byte_for_byte(tmp_path, metadata):
    tensors, source = _sources(tmp_path)
    names = [n for n in tensors if n.startswith("model.layers.4.")]
    assert _library_order({n: "BF16" for n in names}, metadata) is not None, "this safetensors' layout is known"
    copy_tensors(tmp_path / "copy.safetensors", names, source, metadata)
    save_file({n: tensors[n] for n in names}, str(tmp_path / "library.safetensors"), metadata=metadata)
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    got = load_file(str(tmp_path / "copy.safetensors"))
    assert got.keys() == set(names) and all(torch.equal(got[n], tensors[n]) for n in names)


def test_a_layout_it_does_not_know_falls_back_to_the_library(tmp_path, monkeypatch):
    """Another safetensors (a header this module would not write the same): `save_file` writes it."""
    from release import layout

    tensors, source = _sources(tmp_path)
    names = sorted(tensors)
    monkeypatch.setattr(layout, "_st_header", lambda entries, metadata: b"not the library's")
    assert _library_order({n: "F32" for n in names}, None) is None
    copy_tensors(tmp_path / "copy.safetensors", names, source, {"format": "pt"})
    save_file({n: tensors[n] for n in names}, str(tmp_path / "library.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


def test_copies_between_file_systems_and_without_the_kernel_call_are_the_same(tmp_path, monkeypatch):
    """Where `os.copy_file_range` is missing or refuses (another file system), the bytes go
    through a buffer: the same file."""
    import os

    tensors, source = _sources(tmp_path)
    names = sorted(tensors)
    copy_tensors(tmp_path / "kernel.safetensors", names, source, None)

    def refused(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    copy_tensors(tmp_path / "buffered.safetensors", names, source, None)
    assert (tmp_path / "kernel.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()


def test_a_truncated_or_tampered_source_is_refused_before_a_byte_is_copied(tmp_path):
    """What safetensors checks when it loads a tensor: its bytes fit its shape and dtype and the
    file. A source cut short, or whose header says another shape, is named with the fix."""
    import json

    tensors, source = _sources(tmp_path)
    path = tmp_path / "b.safetensors"
    data = path.read_bytes()
    names = [n for n in tensors if source[n] == path]
    path.write_bytes(data[: len(data) - 1000])  # the header still names the last bytes
    with pytest.raises(ReleaseError, match="run past the file's end") as e:
        copy_tensors(tmp_path / "copy.safetensors", names, source, None)
    assert "build again" in e.value.hint and not (tmp_path / "copy.safetensors").exists()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["model.layers.4.hnorm.weight"]["shape"] = [7]  # 6 bf16 values stored, 7 claimed
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(ReleaseError, match=r"hnorm.weight's bytes do not match its shape \[7\] and dtype BF16"):
        copy_tensors(tmp_path / "copy.safetensors", names, source, None)


def test_a_source_cut_short_while_copying_is_named(tmp_path, monkeypatch):
    """A source that ends early while its bytes are copied (another process truncating it)."""
    import os

    tensors, source = _sources(tmp_path)
    names = sorted(tensors)

    def refused(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: b"")
    with pytest.raises(ReleaseError, match="ended before its tensors' bytes"):
        copy_tensors(tmp_path / "copy.safetensors", names, source, None)
    assert not (tmp_path / "copy.safetensors").exists(), "nothing half-written is left"


def test_the_copy_holds_no_tensor_in_memory(tmp_path):
    """A 512 MiB tensor copied: the process's peak RSS grows by far less than the tensor (the
    library's `save_file` of a loaded tensor holds it, and its bytes, whole)."""
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(256, 1 << 20, dtype=torch.bfloat16)}, str(big))
    code = (
        "import resource, sys; from pathlib import Path; from release.layout import copy_tensors; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "copy_tensors(Path(sys.argv[1]), ['w'], {'w': Path(sys.argv[2])}, None); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    root = Path(__file__).resolve().parent.parent
    copy = tmp_path / "copy.safetensors"
    grown_kib = int(subprocess.check_output([sys.executable, "-c", code, str(copy), str(big)], cwd=root))
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB copying 512 MiB"
    from release.manifest import sha256_file

    assert sha256_file(copy) == sha256_file(big), "one tensor, no metadata: the library's file is the source's"


def test_the_mtp_carry_writes_what_compressed_tensors_writes(tmp_path):
    """calibrate._carry_mtp_layers (a byte copy) against compressed-tensors'
    `save_mtp_tensors_to_checkpoint` (the layer loaded and saved), on a two-shard base whose MTP
    layer shares a shard with another layer: the same MTP shard and index, byte for byte; the
    configs differ only in the ignore entry, glmrel's exact where the library's leaves the dots
    unescaped. A base without the layer is refused, as before."""
    import json
    from types import SimpleNamespace

    from compressed_tensors.utils import save_mtp_tensors_to_checkpoint

    from release.build.calibrate import _carry_mtp_layers
    from release.layout import mtp_ignore_entry

    tensors, source = _sources(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    for path in set(source.values()):
        (base / path.name).write_bytes(path.read_bytes())
    weight_map = {name: path.name for name, path in source.items()}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    folders = {}
    for who in ("library", "glmrel"):
        out = tmp_path / who
        out.mkdir()
        save_file({"model.embed_tokens.weight": torch.ones(4, 2)}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"quantization_config": {"ignore": ["lm_head"]}}, indent=2))
        folders[who] = out
    save_mtp_tensors_to_checkpoint(
        str(base), str(folders["library"]), mtp_prefix="model.layers.4.", shard_name="model-mtp-4.safetensors"
    )
    _carry_mtp_layers(base, folders["glmrel"], SimpleNamespace(mtp_layers=(4,)))
    for f in ("model-mtp-4.safetensors", "model.safetensors.index.json"):
        assert (folders["glmrel"] / f).read_bytes() == (folders["library"] / f).read_bytes(), f
    ignores = {
        who: json.loads((o / "config.json").read_text())["quantization_config"]["ignore"] for who, o in folders.items()
    }
    assert ignores == {"library": ["lm_head", "re:^model.layers.4..*"], "glmrel": ["lm_head", mtp_ignore_entry(4)]}
    with pytest.raises(ReleaseError, match="MTP layer 7 was not found"):
        _carry_mtp_layers(base, folders["glmrel"], SimpleNamespace(mtp_layers=(7,)))
