import math
import subprocess
import sys

import pytest
import torch

from unet3d.inference import choose_output_tile, estimate_tile_bytes
from unet3d.inference.memory import _LiveBytes, fix_mmap_threshold, forward_peak_bytes, meta_cat
from unet3d.inference.predictor import prepare_network
from unet3d.inference.tiling import _input_shape, blend_bytes, near_cubic_tile, thick_window, tiles_work
from unet3d.model import UNet, UNetConfig

MIB = 1 << 20


def test_live_bytes_counts_views_once_and_forgets_freed_tensors():
    counter = _LiveBytes()
    with counter:
        a = torch.empty(MIB // 4)  # 1 MiB
        view = a[10:]
        b = a + 1  # 2 MiB alive
        del a, view
        c = b * 2  # a freed: still 2 MiB
        c.relu_()  # in place: no new storage
        del b, c
    assert counter.peak == 2 * MIB and not counter.live


@pytest.mark.parametrize("config", [
    UNetConfig(in_channels=1, num_classes=3, width=4, levels=3, padding="valid"),
    UNetConfig(in_channels=3, num_classes=2, width=4, levels=2, padding="same", norm="none"),
    UNetConfig(in_channels=3, num_classes=2, width=4, levels=2, padding="valid", dims=2),
])
def test_meta_replay_matches_a_real_forward_pass(config):
    """The weightless replay holds exactly the bytes a real inference pass holds (plus scratch)."""
    shape = config.geometry.valid_input_shape((20, 28, 28))
    net = prepare_network(UNet(config).eval(), torch.device("cpu"))
    counter = _LiveBytes()
    with torch.inference_mode(), counter:
        x = torch.randn(1, config.in_channels, *shape)
        x = x.contiguous(memory_format=torch.channels_last_3d) if config.dims == 3 else x
        logits = net(x)
        probabilities = torch.softmax(logits, dim=1).contiguous()
        del x, logits, probabilities
    assert forward_peak_bytes(config, shape) == counter.peak + counter.scratch


@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("contiguous", "contiguous"),
                                     ("channels_last", "contiguous")])
def test_meta_cat_is_torch_cat_on_the_meta_device(layouts):
    formats = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}
    for dim, channels in ((1, (8, 16)), (-4, (8, 16)), (2, (8, 8))):
        tensors = [torch.empty(1, c, 4, 6, 6, device="meta", memory_format=formats[f]) for c, f in zip(channels, layouts)]
        made, reference = meta_cat(tensors, dim), torch.cat(tensors, dim)
        assert (made.shape, made.stride(), made.dtype) == (reference.shape, reference.stride(), reference.dtype)


def test_choosing_a_tile_does_not_import_torch_dynamo():
    """PyTorch's dispatch modes and its Python meta kernel for cat import torch._dynamo on first use:
    3 s, once per process, which was half of `unet3d predict` on a small volume."""
    code = ("import sys; from unet3d.inference import choose_output_tile; from unet3d.model import UNetConfig; "
            "choose_output_tile(UNetConfig(in_channels=1, num_classes=3, width=8, levels=3, padding='same'), "
            "(64, 64, 64), 1 << 30); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_valid_inference_never_holds_a_whole_first_level_map():
    """Every level above the bottom runs in slabs and skips are cropped: the pass holds less than
    0.7 of one 32-channel map of a 156³ tile's first level (152³ voxels); with the first and last
    levels alone in slabs it held 0.76."""
    config = UNetConfig(in_channels=1, num_classes=2, width=16, levels=4, padding="valid")
    assert forward_peak_bytes(config, (156, 156, 156)) < 0.7 * 4 * 32 * 152**3


@pytest.mark.parametrize("padding, shape", [("valid", (156, 156, 156)), ("same", (144, 144, 144))])
def test_gpu_estimate_counts_half_precision_activations(padding, shape):
    """On CUDA autocast keeps activations in float16, the probabilities in float32: the estimate is
    a third to a half of the CPU's (measured on an H100: 0.9-1.3× the allocator's peak), so a GPU
    budget buys larger windows."""
    config = UNetConfig(in_channels=1, num_classes=3, width=16, levels=4, padding=padding)
    ratio = forward_peak_bytes(config, shape, 1, "cuda") / forward_peak_bytes(config, shape)
    assert 0.3 < ratio < 0.55
    cpu, gpu = (choose_output_tile(config, (256, 256, 256), 1 << 30, device_type=d) for d in ("cpu", "cuda"))
    assert math.prod(gpu) > math.prod(cpu)


def test_same_padding_inference_holds_the_first_skip_and_little_more_at_full_size():
    """Same padding keeps each level's whole output as its skip, but every level above the bottom
    runs in slabs: the pass holds less than two and a half 32-channel first-level maps of a 144³
    window (2.76 with the first and last levels alone in slabs, six and a half without slabs)."""
    config = UNetConfig(in_channels=1, num_classes=2, width=16, levels=4, padding="same")
    assert forward_peak_bytes(config, (144, 144, 144)) < 2.5 * 4 * 32 * 144**3


@pytest.mark.parametrize("volume", [(20, 512, 512), (64, 200, 200), (256, 512, 512)])
def test_valid_tiles_read_less_than_near_cubic_ones(volume):
    """Tiles shaped by the volume: never more work than near-cubic ones, and within the budget."""
    config = UNetConfig(in_channels=1, num_classes=2, width=16, levels=4, padding="valid")
    budget = 2048 * MIB

    def need(tile):
        return estimate_tile_bytes(config, _input_shape(config, tile))

    tile = choose_output_tile(config, volume, budget)
    cube = near_cubic_tile(config, volume, budget, need)
    assert need(tile) <= budget
    assert tiles_work(config, volume, tile) <= tiles_work(config, volume, cube)


@pytest.mark.parametrize("volume, budget", [((256, 256, 256), 120**3), ((1000, 64, 64), 500 * 64 * 64), ((20, 512, 512), 100**3), ((40, 40, 40), 10**9)])
def test_near_cubic_tile_is_as_large_as_fits_and_asks_few_estimates(volume, budget):
    """Every axis stops at the volume or where one more grid step would exceed the budget, with the
    axes grown as evenly as they can be; found with a few estimates, not one per step."""
    config = UNetConfig(in_channels=1, num_classes=2, width=8, levels=4, padding="same")
    calls = []

    def need(tile):
        calls.append(tuple(tile))
        return math.prod(tile)

    tile = near_cubic_tile(config, volume, budget, need)
    assert math.prod(tile) <= budget
    for axis, step in enumerate((8, 8, 8)):
        grown = list(tile)
        grown[axis] += step
        assert grown[axis] > max(volume[axis], step) or math.prod(grown) > budget
        assert tile[axis] == min(-(-volume[axis] // step) * step, max(tile)) or math.prod(grown) > budget
    assert len(calls) <= 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_mmap_threshold_is_set_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert fix_mmap_threshold()


def test_blended_windows_count_their_accumulators_and_stay_thick():
    config = UNetConfig(in_channels=1, num_classes=3, width=8, levels=3, padding="same")
    volume, budget = (64, 200, 200), 512 * MIB

    def network_bytes(window):
        return estimate_tile_bytes(config, window)

    window = choose_output_tile(config, volume, budget, overlap=0.25)
    assert network_bytes(window) + blend_bytes(config, volume, window) <= budget
    assert min(window) >= min(*near_cubic_tile(config, volume, budget, network_bytes), thick_window(config))
    cube = near_cubic_tile(config, volume, budget, network_bytes)
    assert tiles_work(config, volume, window, 0.25) < tiles_work(config, volume, cube, 0.25)


@pytest.mark.parametrize("volume", [(256, 256, 256), (256, 512, 512)])
def test_blended_windows_are_not_forced_thicker_than_they_need_be(volume):
    """The near-cubic window fits 2 GiB at 200³: windows as thick as thick_window (176) cover a 256³
    volume within the budget with less overlap. On 512×512 planes no window fits with its
    accumulators; the one chosen does less work and exceeds the budget less than the near-cubic."""
    config = UNetConfig(in_channels=1, num_classes=2, width=16, levels=4, padding="same")
    budget = 2048 * MIB

    def need(window):
        return estimate_tile_bytes(config, window) + blend_bytes(config, volume, window)

    window = choose_output_tile(config, volume, budget, overlap=0.25)
    cube = near_cubic_tile(config, volume, budget, lambda w: estimate_tile_bytes(config, w))
    assert min(cube) > thick_window(config) and min(window) >= thick_window(config)
    assert need(window) <= budget if volume[1] == 256 else budget < need(window) < need(cube)
    assert tiles_work(config, volume, window, 0.25) < tiles_work(config, volume, cube, 0.25)
