import numpy as np
import pytest
import torch
from torch import nn

from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.inference import choose_output_tile, estimate_tile_bytes, plan_tiles, predict_array, reflect_index
from unet3d.model import fold_batch_norm
from unet3d.inference.predictor import DEFAULT_MAX_MEMORY, default_max_memory, read_tile
from unet3d.inference.tiling import gaussian_weight, grid_step
from unet3d.model import UNet, UNetConfig
from unet3d.model import unet


def trained_looking(config: UNetConfig, seed: int = 0) -> UNet:
    """A random network whose batch norms hold non-trivial running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = UNet(config)
    for module in model.modules():
        if isinstance(module, unet.TestTimeBatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def normalized(image: np.ndarray) -> np.ndarray:
    image = image[None].astype(np.float32)
    return apply_normalization(image, fit_normalization([image]))


def whole_volume_probabilities(model: UNet, image: np.ndarray) -> np.ndarray:
    """One forward pass over the whole mirror-padded volume: what tiling must reproduce."""
    geometry = model.geometry
    shape = image.shape[1:]
    margin = geometry.margin()
    needed = geometry.valid_input_shape([n + 2 * m for n, m in zip(shape, margin)])
    padding = [(0, 0)] + [(m, k - n - m) for n, m, k in zip(shape, margin, needed)]
    padded = torch.from_numpy(np.pad(image, padding, mode="reflect"))[None]
    with torch.no_grad():
        probs = torch.softmax(model(padded), dim=1)[0].numpy()
    return probs[(slice(None),) + tuple(slice(0, n) for n in shape)]


def test_reflect_index_is_numpys_reflect_padding_even_far_beyond_tiny_volumes():
    for n in (1, 2, 5):
        values = np.arange(n)
        expected = np.pad(values, (23, 31), mode="reflect")
        assert np.array_equal(values[reflect_index(np.arange(-23, n + 31), n)], expected)


@pytest.mark.parametrize("start", [(-5, 3, 0), (-23, -9, 14), (8, -2, 17), (0, 0, 0)])
def test_tiles_read_at_borders_are_the_mirror_padded_volume(start):
    """read_tile reads one box and mirrors it where the tile goes; the tile equals numpy's reflect
    padding of the volume, also where it reaches past a tiny axis more than once."""
    volume = np.random.default_rng(0).standard_normal((2, 6, 11, 20), dtype=np.float32)
    config = UNetConfig(in_channels=2, num_classes=2, width=2, levels=2, padding="valid")
    plan = plan_tiles(config, volume.shape[1:], (4, 4, 4))
    size = plan.input_shape
    begin = tuple(s + plan.input_box((0, 0, 0))[0][a] for a, s in enumerate(start))
    pad = [(0, 0)] + [(50, 50)] * 3
    expected = np.pad(volume, pad, mode="reflect")[(slice(None),) + tuple(slice(b + 50, b + 50 + k) for b, k in zip(begin, size))]
    tile = read_tile(lambda box: volume[(slice(None),) + box], plan, start, torch.device("cpu"))
    assert tile.shape == (2, *size) and np.array_equal(tile.numpy(), expected)


def test_tiles_reproduce_one_whole_volume_pass(nuclei):
    image = normalized(nuclei[0])
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=3))
    tiled = predict_array(model, image, tile=(16, 32, 24))
    assert len(plan_tiles(model.config, image.shape[1:], (16, 32, 24)).starts) == 2 * 2 * 3
    np.testing.assert_allclose(tiled, whole_volume_probabilities(model, image), atol=1e-5)


def test_result_does_not_depend_on_tile_size_or_batch(nuclei):
    image = normalized(nuclei[0])[:, :, :48, :48]
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=3), seed=1)
    small = predict_array(model, image, tile=(8, 24, 24))
    large = predict_array(model, image, tile=(24, 40, 32), batch_size=2)
    np.testing.assert_allclose(small, large, atol=1e-5)
    assert np.array_equal(small.argmax(0), large.argmax(0))


def test_mirroring_tta_is_tile_size_invariant_too(nuclei):
    image = normalized(nuclei[0])[:, :16, :30, :30]
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=2), seed=1)
    small = predict_array(model, image, tile=(8, 16, 16), tta=True)
    large = predict_array(model, image, tile=(16, 30, 30), tta=True, batch_size=2)
    np.testing.assert_allclose(small, large, atol=1e-5)
    plain = predict_array(model, image, tile=(16, 30, 30))
    assert np.abs(plain - small).max() > 1e-3  # the mirrored passes did change something


def test_volume_smaller_than_the_margin_is_mirrored_repeatedly():
    from unet3d.io import read_image

    from conftest import shared_volume

    image, _ = read_image(str(shared_volume("hippocampus", "images", "hippocampus_001.nii.gz")))
    crop = normalized(image[0, :12, :30, :9])
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=3), seed=2)
    assert min(crop.shape[1:]) < model.geometry.margin()[0]
    np.testing.assert_allclose(predict_array(model, crop, tile=(8, 8, 8)), whole_volume_probabilities(model, crop), atol=1e-5)


def test_two_dimensional_net_tiles_seamlessly(nuclei):
    image = normalized(nuclei[0])[:, :12]
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=3, dims=2), seed=3)
    assert grid_step(model.geometry, 0) == 1
    np.testing.assert_allclose(predict_array(model, image, tile=(5, 16, 24)), whole_volume_probabilities(model, image), atol=1e-5)


def test_fold_batch_norm_is_exact_and_leaves_batch_statistics_alone(nuclei):
    x = torch.from_numpy(normalized(nuclei[0])[None, :, :16, :32, :32])
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=4, levels=3, padding="same"))
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, unet.TestTimeBatchNorm) for m in folded.modules())
    assert any(isinstance(m, unet.TestTimeBatchNorm) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    paper_style = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=4, levels=3, padding="same", norm_at_test="batch"))
    kept = fold_batch_norm(paper_style)
    assert sum(isinstance(m, unet.TestTimeBatchNorm) for m in kept.modules()) == 2 * 5  # two per convolution block


class PointwiseNet(nn.Module):
    """Same-padding stand-in whose probabilities are a known function of each voxel alone, so
    every correctly normalized blend of windows must give exactly that function back."""

    def __init__(self):
        super().__init__()
        self.config = UNetConfig(in_channels=1, num_classes=2, levels=3, padding="same")

    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def test_same_padding_windows_cover_every_voxel_and_weights_normalize(nuclei):
    image = normalized(nuclei[0])
    plan = plan_tiles(PointwiseNet().config, image.shape[1:], (16, 24, 24), overlap=0.5)
    coverage = np.zeros(image.shape[1:], int)
    for start in plan.starts:
        coverage[plan.output_region(start)] += 1
    assert coverage.min() >= 1 and coverage.max() > 1
    probs = predict_array(PointwiseNet(), image, tile=(16, 24, 24), overlap=0.5)
    expected = 1 / (1 + np.exp(-2 * image[0]))
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)


def test_same_padding_unet_blends_smoothly(nuclei):
    image = normalized(nuclei[0])[:, :, :40, :40]
    model = trained_looking(UNetConfig(in_channels=1, num_classes=2, width=2, levels=3, padding="same"))
    one_window = predict_array(model, image, tile=(32, 40, 40))
    blended = predict_array(model, image, tile=(16, 24, 24), overlap=0.5)
    np.testing.assert_allclose(blended.sum(0), 1, atol=1e-5)
    assert (one_window.argmax(0) == blended.argmax(0)).mean() > 0.9


def whole_same_padding_probabilities(model: UNet, image: np.ndarray) -> np.ndarray:
    """One forward pass of a same-padding network over the whole volume, mirrored at its far end
    up to a valid size: what seamless tiling must reproduce."""
    shape = image.shape[1:]
    needed = model.geometry.valid_input_shape(shape)
    padded = torch.from_numpy(np.pad(image, [(0, 0)] + [(0, k - n) for n, k in zip(shape, needed)], mode="reflect"))
    with torch.no_grad():
        probs = torch.softmax(fold_batch_norm(model)(padded[None]), dim=1)[0].numpy()
    return probs[(slice(None),) + tuple(slice(0, n) for n in shape)]


@pytest.mark.parametrize("levels", [3, 4])
def test_same_padding_tiles_seamlessly_whatever_the_tile(nuclei, levels):
    """Each output tile is read with the network's whole reach, clipped where a whole-volume pass
    pads: any tile size gives the whole-volume probabilities, tiles of one grid step included."""
    image = normalized(nuclei[0])[:, :, :45, :38]
    model = trained_looking(UNetConfig(in_channels=1, num_classes=3, width=2, levels=levels, padding="same"), seed=4)
    whole = whole_same_padding_probabilities(model, image)
    step = grid_step(model.geometry, 1)
    for tile in [(step, step, 2 * step), (16, 24, 8), (24, 48, 40)]:
        np.testing.assert_allclose(predict_array(model, image, tile=tile), whole, atol=1e-5)
    tiled = predict_array(model, image, tile=(8, 16, 16), batch_size=3)
    assert np.array_equal(tiled.argmax(0), predict_array(model, image, max_memory=64 << 20).argmax(0))


def test_the_network_reach_is_everything_an_output_depends_on():
    """With every weight positive and average pooling in place of max pooling, an output voxel's
    gradient reaches every input it depends on: its farthest is within `Geometry.reach`."""
    for levels in (2, 3, 4):
        model = UNet(UNetConfig(in_channels=1, num_classes=2, width=2, levels=levels, padding="same", norm="none"))
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.MaxPool3d):
                    setattr(module, name, nn.AvgPool3d(child.kernel_size, child.stride))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.abs_().add_(0.01)
        step = 2 ** (levels - 1)
        n = 16 * step
        farthest = 0
        for centre in range(n // 2, n // 2 + step):
            x = torch.rand(1, 1, step, step, n, dtype=torch.float64).add(0.1).requires_grad_(True)
            model.double()(x)[0, 0, 0, 0, centre].backward()
            reached = torch.nonzero(x.grad[0, 0].abs().sum((0, 1)) > 0).flatten()
            farthest = max(farthest, centre - int(reached.min()), int(reached.max()) - centre)
        assert farthest <= model.geometry.reach_1d(2) < farthest + step


def test_gaussian_weight_trusts_the_centre():
    weight = gaussian_weight((8, 16, 17))
    assert weight.shape == (8, 16, 17) and weight.dtype == torch.float32
    assert weight.max() == 1 == weight[3:5, 7:9, 8].min() and weight.min() == pytest.approx(1e-3)
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in (8, 16, 17)), indexing="ij")
    whole = np.exp(-0.5 * ((z / 1) ** 2 + (y / 2) ** 2 + (x / (17 / 8)) ** 2))
    np.testing.assert_allclose(weight.numpy(), np.maximum(whole / whole.max(), 1e-3), rtol=1e-6)


def test_memory_budget_picks_larger_tiles_for_more_memory():
    config = UNetConfig(in_channels=1, num_classes=3, width=8, levels=4)
    small = choose_output_tile(config, (200, 200, 200), 256 << 20)
    large = choose_output_tile(config, (200, 200, 200), 1 << 30)
    assert np.prod(large) > np.prod(small)
    for tile, budget in ((small, 256 << 20), (large, 1 << 30)):
        assert estimate_tile_bytes(config, config.geometry.input_shape_for_output(tile)) <= budget
        assert all(t % 8 == 0 for t in tile)
    assert choose_output_tile(config, (20, 30, 30), 4 << 30) == (24, 32, 32)  # never beyond the volume
    with pytest.raises(ValueError, match="smallest tile"):
        choose_output_tile(config, (200, 200, 200), 1 << 20)


def test_cpu_budget_defaults_to_one_gibibyte():
    assert default_max_memory(torch.device("cpu")) == DEFAULT_MAX_MEMORY == 1 << 30
