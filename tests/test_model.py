import numpy as np
import pytest
import torch

from unet3d.model import PRESETS, Geometry, UNet, UNetConfig, count_parameters, load_model, save_model
from unet3d.model.unet import SLAB_HALO, SLAB_ROWS
from unet3d.model.summary import summary_text


def test_paper_preset_has_the_papers_parameter_count():
    model = UNet(PRESETS["paper"])
    assert count_parameters(model) == 19_069_955
    batch_norm_channels = 32 + 64 + 64 + 128 + 128 + 256 + 256 + 512 + 2 * 256 + 2 * 128 + 2 * 64
    assert count_parameters(model, include_norm=True) == 19_069_955 + 2 * batch_norm_channels


def test_paper_tile_geometry():
    geometry = PRESETS["paper"].geometry
    assert geometry.output_shape((116, 132, 132)) == (28, 44, 44)
    assert geometry.margin() == (44, 44, 44)
    assert geometry.valid_input_size_1d(93) == 100 and geometry.valid_input_size_1d(99, direction="down") == 92
    assert geometry.output_size_1d(91) is None
    with torch.device("meta"):
        out = UNet(PRESETS["paper"])(torch.empty(1, 3, 116, 132, 132))
    assert tuple(out.shape) == (1, 3, 28, 44, 44)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("dims", [2, 3])
def test_output_shape_matches_geometry(levels, padding, dims):
    config = UNetConfig(width=2, levels=levels, padding=padding, dims=dims)
    shape = config.geometry.valid_input_shape((9, 30, 37))
    with torch.device("meta"):
        out = UNet(config)(torch.empty(2, 1, *shape))
    assert tuple(out.shape[2:]) == config.geometry.output_shape(shape)
    if dims == 2:
        assert out.shape[2] == shape[0] and config.geometry.margin()[0] == 0


@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_inference_frees_memory_as_it_goes_with_the_same_logits(levels, dims, norm, padding):
    """No gradients: cropped skip copies (valid), and (voxel-wise norm) every level above the bottom
    in slabs of SLAB_ROWS rows, the last slab partial, same-padding slabs reading a halo inside the map
    and zero padding at its border; the logits equal those of the plain pass (gradients on)."""
    torch.manual_seed(0)
    config = UNetConfig(width=2, levels=levels, padding=padding, dims=dims, norm=norm)
    model = UNet(config).eval()
    x = torch.randn(1, 1, *config.geometry.valid_input_shape((9, 45, 53) if padding == "valid" else (72, 72, 21)))
    rows = x.shape[3 if dims == 2 else 2] - (4 if padding == "valid" else 0)
    assert levels < 4 or (rows > 2 * SLAB_ROWS and rows % SLAB_ROWS)
    # a same-padding slab whose halo reaches the map's border yields more rows than asked (third level: 18 rows)
    assert levels < 4 or padding == "valid" or rows // 4 % SLAB_ROWS == SLAB_HALO
    with torch.no_grad():
        at_inference = model(x)
    # kernels depend on the shape (slabs) and on gradients (oneDNN for thin inputs at inference, PyTorch's
    # im2col with gradients), so the sums round differently; a wrong halo errs by ~1e-2
    torch.testing.assert_close(at_inference, model(x).detach(), rtol=1e-5, atol=1e-5)
    if levels > 1 and padding == "valid":  # the first skip: what the last decoder's up-convolution meets is its output + 4
        n = config.geometry.valid_input_size_1d(60)
        encoded = torch.randn(1, 4, n - 4, n - 4, n - 4).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            kept = model._kept_for_decoder(encoded, levels - 1)
        assert kept.shape[2:] == (config.geometry.output_size_1d(n) + 4,) * 3
        assert kept.untyped_storage().nbytes() == kept.numel() * 4  # a copy: the whole output can be freed
        assert kept.is_contiguous(memory_format=torch.channels_last_3d)


def test_invalid_input_size_names_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match="nearest valid sizes: 92 or 100"):
        Geometry(4, "valid").output_shape((93, 100, 100))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_forward_backward_on_a_real_crop(nuclei, norm):
    image, labels = nuclei
    config = UNetConfig(in_channels=1, num_classes=3, width=4, levels=2, padding="valid", norm=norm)
    crop_shape = config.geometry.valid_input_shape((20, 28, 28), "down")
    crop = image[tuple(slice(0, n) for n in crop_shape)].astype(np.float32)
    x = torch.from_numpy((crop - crop.mean()) / crop.std())[None, None]
    model = UNet(config)
    logits = model(x)
    margin = config.geometry.margin()
    target = labels[tuple(slice(m, m + n) for m, n in zip(margin, logits.shape[2:]))]
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(target.astype(np.int64))[None])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_batch_statistics_at_test_time():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 12, 12) * 5 + 3
    running = UNet(UNetConfig(width=2, levels=2, padding="same", norm_at_test="running")).eval()
    batch = UNet(UNetConfig(width=2, levels=2, padding="same", norm_at_test="batch")).eval()
    batch.load_state_dict(running.state_dict())
    before = {k: v.clone() for k, v in batch.state_dict().items()}
    assert not torch.allclose(running(x), batch(x))
    at_test = batch(x)
    assert all(torch.equal(before[k], v) for k, v in batch.state_dict().items() if "running" in k)
    assert torch.allclose(at_test, batch.train()(x), atol=1e-5)


def test_model_file_round_trip(tmp_path):
    config = UNetConfig(in_channels=2, num_classes=4, width=3, levels=3, padding="same", norm="group")
    model = UNet(config).eval()
    save_model(tmp_path / "m.safetensors", model, {"ignore_label": 255})
    loaded, info = load_model(tmp_path / "m.safetensors")
    assert loaded.config == config and info.ignore_label == 255 and info.class_values == [0, 1, 2, 3]
    x = torch.randn(1, 2, 8, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_summary_states_the_count_and_margin():
    text = summary_text(PRESETS["paper"])
    assert "19,069,955" in text and "(44, 44, 44)" in text and "28 x 44 x 44" in text


@pytest.mark.parametrize("channels", [1, 2, 3, 8])
@pytest.mark.parametrize("padding", [(0, 0, 0), (1, 1, 1), (0, 1, 1)])
def test_convolve_equals_pytorchs_convolution_at_inference(channels, padding):
    """CPU inference goes to oneDNN (where PyTorch would pick its slower im2col path for these small
    inputs); the result must be PyTorch's, in both memory layouts, and training keeps PyTorch's choice."""
    from unet3d.model.unet import _onednn_inference, convolve

    torch.manual_seed(0)
    x = torch.randn(1, channels, 6, 21, 17)
    weight, bias = torch.randn(8, channels, 3, 3, 3), torch.randn(8)
    expected = torch.nn.functional.conv3d(x, weight, bias, padding=padding)
    with torch.no_grad():
        assert _onednn_inference(x)
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            got = convolve(x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias, padding)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not _onednn_inference(x)


def test_the_model_description_is_one_typed_record_with_its_defaults_in_one_place(tmp_path):
    """A model file's description loads as a ModelInfo: what an older file leaves out gets the
    defaults (classes 0..K-1, no normalization), and writing it back keeps every field."""
    from unet3d.model import ModelInfo

    config = UNetConfig(in_channels=2, num_classes=3, width=2, levels=2, padding="same")
    bare = ModelInfo.of({}, config)
    assert bare.class_values == [0, 1, 2] and bare.normalization == {"method": "none", "channels": 2}
    assert bare.forest is None and bare.image_channels(config) == 2
    full = ModelInfo([1, 5, 9], {"method": "zscore", "channels": 2, "mean": [0.0, 1.0], "std": [1.0, 2.0]},
                     ignore_label=255, spacing=[2.0, 1.0, 1.0], training={"iterations": 3})
    save_model(tmp_path / "m.safetensors", UNet(config), full)
    assert load_model(tmp_path / "m.safetensors")[1] == full
    assert ModelInfo.of(full.to_dict(), config) == full
