"""compat.atomic_update_offload (hook `distributed_disk_update`): ranks updating the same
disk-offloaded weight."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file


def test_update_replaces_the_symlink_and_never_writes_the_checkpoint(tmp_path):
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    from release.awq import Patches
    from release.build.compat import atomic_update_offload, distributed_disk_update_is_fixed_upstream

    assert not distributed_disk_update_is_fixed_upstream(), "compressed-tensors 0.19.0 inherits DiskCache's"
    stock = DistributedDiskCache.update_offload
    fixes = Patches()
    fixes.hook("distributed_disk_update", atomic_update_offload)
    ckpt = tmp_path / "model-00001.safetensors"
    save_file({"model.layers.0.w": torch.ones(4, 4)}, ckpt)
    before = ckpt.read_bytes()
    folder = tmp_path / "offload"
    folder.mkdir()
    cache = DistributedDiskCache.__new__(DistributedDiskCache)  # no process group needed to update
    cache.offload_dir = folder
    offloaded = torch.empty(4, 4, device="meta")
    link = folder / "ct_disk_cache_0_1.safetensors"
    os.symlink(ckpt, link)
    DistributedDiskCache.index[offloaded] = {
        "safetensors_file": str(link),
        "weight_name": "model.layers.0.w",
        "dtype": "float32",
    }
    try:
        # two ranks writing the same smoothed values: the second replaces the first, whole
        for _rank in range(2):
            cache.update_offload(offloaded, torch.full((16,), 2.0))
    finally:
        del DistributedDiskCache.index[offloaded]
        fixes.undo()
    assert DistributedDiskCache.update_offload is stock and "update_offload" not in vars(DistributedDiskCache)
    assert not link.is_symlink()
    assert torch.equal(load_file(link)["model.layers.0.w"], torch.full((4, 4), 2.0))
    assert ckpt.read_bytes() == before, "the base checkpoint is never written"
    assert sorted(p.name for p in folder.iterdir()) == [link.name], "no temporary file left"


def _two_layers(tmp_path):
    """A model whose `model.layers.1` is offloaded to disk (onloaded to the CPU), and its caches."""
    from compressed_tensors.offload import offload_module

    torch.manual_seed(0)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
    values = {k: v.clone() for k, v in root.model.layers[1].state_dict().items()}
    folder = tmp_path / "offload"
    folder.mkdir()
    offload_module(root.model.layers[1], "cpu", "disk", offload_dir=str(folder))
    return root, values


def test_onload_ahead_hands_over_the_next_layers_weights_and_drops_what_changed(tmp_path):
    from compressed_tensors.offload import disable_offloading
    from compressed_tensors.offload.cache.disk import DiskCache

    from release.awq import Patches
    from release.awq.read_ahead import OnloadAhead, onloaded_ahead_entries, patch_onloads, stock_onload

    root, values = _two_layers(tmp_path)
    layer = root.model.layers[1]
    assert not onloaded_ahead_entries(layer, ("cuda",)), "nothing is onloaded to a GPU here"
    ahead = OnloadAhead(stock_onload(), devices=("cpu",))
    patches = Patches()
    patch_onloads(patches, lambda: ahead)
    try:
        ahead.after(root, "model.layers.0")
        assert ahead.layers == 1 and ahead.tensors == 2 and ahead.bytes == (64 + 8) * 4
        with disable_offloading():
            got = {"weight": layer.weight, "bias": layer.bias}
        assert ahead.served == 2 and ahead.stale == 0 and ahead.failed is None
        # the helper's copy time and the main thread's own, for a profile to place (the record rounds
        # them to milliseconds: a toy layer's copies take less)
        assert ahead.copy_s > 0 and ahead.after_s > 0 and {"copy_s", "after_s", "wait_s"} <= ahead.counts().keys()
        # ... and when each ran, to line them up with the pipeline's passes
        (after, a0, a1), (copies, c0, c1) = sorted(ahead.spans, key=lambda span: span[0])
        assert (after, copies) == ("after", "copies") and a0 <= a1 and a0 <= c0 <= c1
        assert all(torch.equal(got[k], values[k]) for k in values), "the same weights as the stock onload"

        # the weight rewritten in place after its copy was made (within the file clock's tick, so
        # the file's stamp may not change): the update forgets the copy, the new value is onloaded
        ahead.after(root, "model.layers.0")
        layer._parameters.update_offload(layer._parameters.offloaded_values["weight"], torch.full((8, 8), 3.0))
        with disable_offloading():
            weight, bias = layer.weight, layer.bias
        assert torch.equal(weight, torch.full((8, 8), 3.0)) and torch.equal(bias, values["bias"])
        assert ahead.stale == 1 and ahead.served == 3
        # the file replaced behind the run's back (a new inode, as the ranks' rename writes it):
        # the stamp sees it
        ahead.after(root, "model.layers.0")
        ahead.wait()  # the copies made (and stamped) before the file is replaced
        path = DiskCache.index[layer._parameters.offloaded_values["bias"]]["safetensors_file"]
        save_file({"weight": torch.full((8,), 5.0)}, path + ".new")
        os.replace(path + ".new", path)
        with disable_offloading():
            assert torch.equal(layer.bias, torch.full((8,), 5.0))
            assert torch.equal(layer.weight, torch.full((8, 8), 3.0))
        assert ahead.stale == 2 and ahead.served == 4
        # the last layer has no next one; what the last layer left untaken is counted, not kept
        ahead.after(root, "model.layers.0")
        ahead.after(root, "model.layers.1")
        assert ahead.unused == 2 and not ahead.ready
    finally:
        patches.undo()
        ahead.close()


def test_onload_ahead_turns_itself_off_when_a_copy_fails(tmp_path):
    from release.awq.read_ahead import OnloadAhead

    root, _values = _two_layers(tmp_path)
    layer = root.model.layers[1]

    def failing(cache, offloaded):
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    ahead = OnloadAhead(failing, devices=("cpu",))
    try:
        ahead.after(root, "model.layers.0")
        offloaded = layer._parameters.offloaded_values["weight"]
        assert ahead.take(layer._parameters, offloaded) is None, "the stock onload stands in"
        assert ahead.failed is not None and "out of memory" in ahead.failed
        ahead.after(root, "model.layers.0")
        assert ahead.layers == 1 and ahead.pending is None, "off for the rest of the run"
    finally:
        ahead.close()


def test_source_stamp_follows_in_place_writes_of_a_cpu_offload():
    from compressed_tensors.offload.cache.cpu import CPUCache

    from release.awq.read_ahead import source_stamp

    cache = CPUCache.from_mapping({"w": torch.zeros(3)}, "cpu")
    offloaded = cache.offloaded_values["w"]
    before = source_stamp(cache, offloaded)
    cache.update_offload(offloaded, torch.ones(3))
    assert source_stamp(cache, offloaded) != before


def test_pinned_stages_copy_the_same_bytes_and_keep_the_sources_class():
    """read_ahead.PinnedStages (onload-ahead's copy of a CPU offload to the GPU): tensors larger
    than a stage, smaller, empty and of other dtypes come out with the same bytes, and a Parameter
    stays one with its attributes, as compressed-tensors' own onload (`send_tensors`) makes it.
    On the CPU the stages are unpinned and the copies synchronous; the GPU's DMA is exercised by
    the engine A/B (benchmarks/engine_ab.sh) that compares the chosen scales bit for bit."""
    from release.awq.read_ahead import PinnedStages

    stages = PinnedStages(stage_bytes=48, pin=False)
    weight = torch.nn.Parameter(torch.randn(7, 5), requires_grad=False)
    weight.marker = "kept"
    sources = [weight, torch.arange(3, dtype=torch.int32), torch.zeros(0), torch.tensor(2.5, dtype=torch.bfloat16)]
    for src in sources:
        got = stages.copy(src, torch.device("cpu"))
        assert got is not src and type(got) is type(src)
        assert got.numel() == 0 or got.data_ptr() != src.data_ptr()
        assert got.dtype == src.dtype and got.shape == src.shape and torch.equal(got, src)
    assert getattr(stages.copy(weight, torch.device("cpu")), "marker", None) == "kept"
    assert stages.turn in (0, 1)


def test_pinned_stages_onload_what_the_stock_onload_gives_or_leave_it_to_it(tmp_path):
    """PinnedStages.onload: a CPU offload's plain tensor and a disk offload's weight come out as
    compressed-tensors' own onload makes them (values, dtype, class, attributes); a strided view,
    a sparse tensor and a weight the disk index does not know are left to the stock onload."""
    from compressed_tensors.offload.cache.cpu import CPUCache

    from release.awq.read_ahead import PinnedStages

    stages = PinnedStages(stage_bytes=64, pin=False)
    cpu = torch.device("cpu")
    cache = CPUCache(onload_device="cpu")
    plain = torch.randn(4, 4)
    assert torch.equal(stages.onload(cache, plain, cpu), plain)
    assert stages.onload(cache, plain.t(), cpu) is None, "strided views take the stock onload"
    assert stages.onload(cache, plain.to_sparse(), cpu) is None
    root, values = _two_layers(tmp_path)
    disk = root.model.layers[1]._parameters
    for name in ("weight", "bias"):
        offloaded = disk.offloaded_values[name]
        stock, staged = disk.onload(offloaded), stages.onload(disk, offloaded, cpu)
        assert staged is not None and type(staged) is type(stock) and staged.dtype == stock.dtype
        assert torch.equal(staged, stock) and torch.equal(staged, values[name])
        assert staged.requires_grad == stock.requires_grad and staged.__dict__ == stock.__dict__
    assert stages.onload(disk, torch.zeros(2), cpu) is None, "not in the disk index"


def test_an_onload_of_what_the_helper_was_not_given_does_not_wait_for_its_copies(tmp_path):
    """The observers read the current layer's quantization parameters (onloads) before the
    propagation pass; those are not the next layer's weights, so they must not wait for the
    helper's copies (session 38's H100 run: 0.63 s a layer waited there)."""
    import threading

    from release.awq.read_ahead import OnloadAhead, stock_onload

    root, values = _two_layers(tmp_path)
    layer = root.model.layers[1]
    release = threading.Event()
    stock = stock_onload()

    def held(cache, offloaded):
        assert release.wait(10)
        return stock(cache, offloaded)

    ahead = OnloadAhead(held, devices=("cpu",))
    try:
        ahead.after(root, "model.layers.0")
        other = torch.zeros(3)
        assert ahead.take(layer._parameters, other) is None and ahead.pending is not None, "no wait"
        ahead.forget(other)
        assert ahead.pending is not None, "nor does a rewrite of something else"
        release.set()
        offloaded = layer._parameters.offloaded_values["weight"]
        assert torch.equal(ahead.take(layer._parameters, offloaded), values["weight"])
        assert ahead.pending is None and ahead.served == 1
    finally:
        release.set()
        ahead.close()
