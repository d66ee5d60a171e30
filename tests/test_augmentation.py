import itertools
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.conftest import shared_volume
from unet3d.augmentation import AugmentationConfig, cut_patch, draw_augmentation, finish_patch, sample_patch, spatial
from unet3d.augmentation.spatial import random_elastic_field, random_linear_map, spline_interpolation_matrix

SPATIAL_ONLY = dict(gamma=(1.0, 1.0), intensity_scale=(1.0, 1.0), intensity_shift=(0.0, 0.0))
NO_AUGMENTATION = dict(rotation_deg=0.0, scale=(1.0, 1.0), elastic_sigma=0.0, flip=False, **SPATIAL_ONLY)


def normalized(image: np.ndarray) -> torch.Tensor:
    image = image.astype(np.float32)
    return torch.from_numpy((image - image.mean()) / image.std())[None]


@pytest.fixture
def nuclei_volume(nuclei):
    """Smoothed nuclei image (1, 31, 61, 57) and labels that are a function of it: quantized intensity."""
    image = normalized(ndimage.gaussian_filter(nuclei[0].astype(np.float32), 1.0))
    labels = quantized(image[0])  # 4 intensity classes
    return image, labels


def hippocampus_case():
    import nibabel

    image = nibabel.load(shared_volume("hippocampus", "images", "hippocampus_001.nii.gz")).get_fdata()
    labels = nibabel.load(shared_volume("hippocampus", "labels", "hippocampus_001.nii.gz")).get_fdata()
    return normalized(image.T), torch.from_numpy(np.rint(labels.T).astype(np.int64))


def mirrored_reference(image: torch.Tensor, labels: torch.Tensor, start, shape):
    """numpy's reflect padding of the whole volume, then plain slicing: the definition of the window."""
    pad = [(max(0, -s), max(0, s + n - size)) for s, n, size in zip(start, shape, labels.shape)]
    padded_image = np.pad(image.numpy(), [(0, 0)] + pad, mode="reflect")
    padded_labels = np.pad(labels.numpy(), pad, mode="constant", constant_values=-1)
    box = tuple(slice(s + before, s + before + n) for s, (before, _), n in zip(start, pad, shape))
    return padded_image[(slice(None),) + box], padded_labels[box]


THRESHOLDS = torch.tensor([-0.5, 0.5, 1.5])


def quantized(image: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(image.contiguous(), THRESHOLDS)


def agreement_off_edges(image_patch: torch.Tensor, label_patch: torch.Tensor) -> float:
    """Fraction of labeled voxels whose label is their quantized image value, off class edges.

    Trilinear image and nearest-neighbour labels legitimately disagree where a threshold lies
    within half a voxel; "off edges" means the value is further from every threshold than half
    a voxel step of the local gradient. A one-voxel misalignment still shows there.
    """
    values, labels = image_patch[0].numpy(), label_patch.numpy()
    gradient = np.sqrt(sum(g**2 for g in np.gradient(values)))
    to_threshold = np.abs(values[..., None] - THRESHOLDS.numpy()).min(-1)
    judged = (labels >= 0) & (to_threshold > 0.5 * gradient)
    assert judged.sum() > 1000, "too few voxels to judge alignment"
    return float((quantized(image_patch[0]).numpy()[judged] == labels[judged]).mean())


def test_plain_crop_is_numpy_slicing(nuclei):
    image, labels = normalized(nuclei[0]), torch.from_numpy(nuclei[1].astype(np.int64))
    img, lab = sample_patch(image, labels, (15, 30, 28), (20, 41, 30), np.random.default_rng(0))
    assert torch.equal(img, image[:, 5:25, 10:51, 13:43])  # start = floor(center + 0.5) - shape // 2
    assert torch.equal(lab, labels[5:25, 10:51, 13:43]) and lab.dtype == torch.int64
    disabled = AugmentationConfig(enabled=False)
    img2, lab2 = sample_patch(image, labels, (15.4, 29.6, 28.2), (20, 41, 30), np.random.default_rng(1), disabled)
    assert torch.equal(img2, img) and torch.equal(lab2, lab)


@pytest.mark.parametrize("center, shape", [((2, 58, 1), (20, 30, 40)), ((15, 30, 28), (90, 150, 140))])
def test_outside_the_volume_image_is_mirrored_and_labels_unlabeled(nuclei, center, shape):
    image, labels = normalized(nuclei[0]), torch.from_numpy(nuclei[1].astype(np.int64))
    img, lab = sample_patch(image, labels, center, shape, np.random.default_rng(0))
    as_stored = sample_patch(image, torch.from_numpy(nuclei[1]), center, shape, np.random.default_rng(0))
    assert torch.equal(as_stored[1], lab)  # uint8 labels too: -1 does not wrap around
    start = np.floor(np.asarray(center) + 0.5).astype(int) - np.asarray(shape) // 2
    want_image, want_labels = mirrored_reference(image, labels, start, shape)
    assert np.array_equal(img.numpy(), want_image)
    assert np.array_equal(lab.numpy(), want_labels) and (lab == -1).any()


@pytest.mark.parametrize("center, shape", [((15, 30, 28), (21, 40, 40)), ((0, 60, 3), (30, 44, 35)), ((15, 30, 28), (70, 90, 80))])
def test_neutral_augmentation_reproduces_the_crop(nuclei, center, shape):
    """Augmentation whose every range is neutral gives the crop, bit for bit."""
    image, labels = normalized(nuclei[0]), torch.from_numpy(nuclei[1].astype(np.int64))
    crop = sample_patch(image, labels, center, shape, np.random.default_rng(0))
    neutral = sample_patch(image, labels, center, shape, np.random.default_rng(0), AugmentationConfig(**NO_AUGMENTATION))
    assert torch.equal(neutral[0], crop[0]) and torch.equal(neutral[1], crop[1])


@pytest.mark.parametrize("center, shape", [((15, 30, 28), (16, 40, 40)), ((0, 60, 3), (15, 41, 36)), ((15, 30, 28), (70, 90, 81))])
def test_flips_are_copied_exactly_as_resampling_would_place_them(nuclei, center, shape):
    """Flip-only transforms skip interpolation; the copy must land where resampling would."""
    image, labels = normalized(nuclei[0]), torch.from_numpy(nuclei[1].astype(np.int64))
    for flips in itertools.product([1.0, -1.0], repeat=3):
        linear = np.diag(flips)
        flipped = spatial.flips_of(linear)
        assert np.array_equal(flipped, np.asarray(flips) < 0)
        copied = spatial.flipped_crop(image, labels, center, shape, flipped)
        resampled = spatial.sample_transformed(image, labels, center, shape, linear, None)
        assert torch.allclose(copied[0], resampled[0], atol=1e-4)
        assert torch.equal(copied[1], resampled[1])
    assert spatial.flips_of(np.diag([1.0, 1.1, -1.0])) is None


def test_rotated_and_zoomed_patch_reads_the_transformed_positions():
    """On an image whose channels are the voxel coordinates, trilinear sampling is exact: every
    voxel of the patch must hold the position the linear map sends it to (non-cubic region)."""
    shape, center = (12, 30, 20), (20, 32, 28)
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (40, 64, 56)],
                                             indexing="ij"))
    labels = torch.zeros(coordinates.shape[1:], dtype=torch.int64)
    angle = np.deg2rad(25.0)
    linear = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    linear = linear @ np.diag([0.9, 1.1, 0.8]) @ np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.1, 0.0, 1.0]])
    patch, _ = spatial.sample_transformed(coordinates, labels, center, shape, linear, None)
    offsets = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij"), -1)
    expected = np.asarray(center) + offsets @ linear.T
    assert np.abs(patch.permute(1, 2, 3, 0).numpy() - expected).max() < 1e-3


@pytest.mark.parametrize("config", [AugmentationConfig(), AugmentationConfig(elastic_sigma=0.0),
                                    AugmentationConfig(**NO_AUGMENTATION), None])
def test_a_region_cut_from_the_control_points_gives_the_same_patch(nuclei_volume, config):
    """What a GPU is sent (the region bounded from the elastic control points, field made there)
    gives the patch made on the CPU, up to float rounding of the wider region's coordinates."""
    image, labels = nuclei_volume
    for seed, center in itertools.product(range(3), [(15, 30, 28), (1, 2, 55)]):
        draws = [draw_augmentation(np.random.default_rng(seed), config, (20, 40, 36), (1.0, 1.0, 1.5), 1)
                 for _ in range(2)]
        cpu = finish_patch(cut_patch(image, labels, center, (20, 40, 36), draws[0], (1.0, 1.0, 1.5)))
        sent = cut_patch(image, labels, center, (20, 40, 36), draws[1], (1.0, 1.0, 1.5), exact=False)
        device = finish_patch(sent.to("cpu"))
        assert torch.allclose(cpu[0], device[0], atol=1e-4)
        assert (cpu[1] == device[1]).float().mean() > 0.999  # nearest-neighbour ties may round either way
        assert torch.equal(cpu[0], sample_patch(image, labels, center, (20, 40, 36), np.random.default_rng(seed),
                                                config, (1.0, 1.0, 1.5))[0])


def test_labels_stay_aligned_with_the_image(nuclei_volume):
    image, labels = nuclei_volume
    config = AugmentationConfig(rotation_deg=30.0, scale=(0.8, 1.2), elastic_spacing=16.0, elastic_sigma=4.0, **SPATIAL_ONLY)
    aligned, shifted = [], []
    for seed in range(4):
        img, lab = sample_patch(image, labels, (15, 30, 28), (28, 56, 56), np.random.default_rng(seed), config)
        aligned.append(agreement_off_edges(img, lab))
        shifted.append(agreement_off_edges(img, torch.roll(lab, 1, dims=2)))
    assert min(aligned) >= 0.98, aligned  # measured 0.995-0.997
    assert max(shifted) < 0.96, shifted  # one voxel off: measured 0.91-0.93, so the measure can fail


def test_sparse_annotation_mask_moves_with_the_image(nuclei_volume):
    image, dense = nuclei_volume
    sparse = torch.full_like(dense, -1)
    sparse[15], sparse[:, 30], sparse[:, :, 28] = dense[15], dense[:, 30], dense[:, :, 28]  # three orthogonal slices
    config = AugmentationConfig(**SPATIAL_ONLY)
    for seed in range(3):
        img, lab = sample_patch(image, sparse, (15, 30, 28), (28, 56, 56), np.random.default_rng(seed), config)
        _, dense_lab = sample_patch(image, dense, (15, 30, 28), (28, 56, 56), np.random.default_rng(seed), config)
        labeled = lab >= 0
        assert 0.02 < labeled.float().mean() < 0.3
        assert torch.equal(lab[labeled], dense_lab[labeled])  # same transform for mask and labels
        assert agreement_off_edges(img, lab) >= 0.98


def test_same_seed_same_patch_different_seed_different_patch(nuclei_volume):
    image, labels = nuclei_volume
    config = AugmentationConfig()
    first = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(7), config)
    again = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(7), config)
    other = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(8), config)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_global_random_state_is_not_used(nuclei_volume):
    image, labels = nuclei_volume
    np.random.seed(1), torch.manual_seed(1)
    first = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(3), AugmentationConfig())
    np.random.seed(2), torch.manual_seed(2)
    second = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(3), AugmentationConfig())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_spline_matrix_interpolates_control_points_and_keeps_constants():
    matrix = spline_interpolation_matrix(97, 32.0)
    assert matrix.shape == (97, 4)
    assert np.allclose(matrix[[0, 32, 64, 96]], np.eye(4), atol=1e-12)
    assert np.allclose(matrix.sum(axis=1), 1.0)  # a constant field stays constant


def test_elastic_field_is_smooth_with_the_configured_spread():
    config = AugmentationConfig(elastic_spacing=32.0, elastic_sigma=4.0)
    rng = np.random.default_rng(0)
    fields = torch.stack([random_elastic_field(rng, config, (97, 97, 97), (1.0, 1.0, 1.0)) for _ in range(4)])
    at_control_points = fields[:, ::32, ::32, ::32].std().item()
    assert 0.85 * 4.0 < at_control_points < 1.15 * 4.0
    assert 0.6 * 4.0 < fields.std().item() < 4.0  # between control points the spline pulls towards 0
    neighbour_step = (fields[:, :, 1:] - fields[:, :, :-1]).abs()
    assert neighbour_step.mean() < 0.2 and neighbour_step.max() < 1.0  # white noise would step ~4.5 on average


def test_physical_rotation_on_anisotropic_voxels():
    spacing = np.array([2.0, 1.0, 1.0])  # mildly anisotropic: still rotated about every axis
    config = AugmentationConfig(rotation_deg=40.0)
    for seed in range(5):
        linear = random_linear_map(np.random.default_rng(seed), config, spacing)
        physical = np.diag(spacing) @ linear @ np.diag(1 / spacing)  # the map in physical units
        gram = physical.T @ physical
        assert np.allclose(gram, gram[0, 0] * np.eye(3))  # a rotation (and flips) times one zoom
        assert abs(physical[0, 1]) + abs(physical[0, 2]) > 1e-3  # z does mix with y and x


def test_strongly_anisotropic_axis_is_never_resampled():
    """A volume whose value is its z index: out-of-plane resampling would produce fractions."""
    slice_index = torch.arange(20, dtype=torch.float32)[:, None, None].expand(20, 96, 96)[None].clone()
    labels = slice_index[0].long()
    config = AugmentationConfig(rotation_deg=45.0, **SPATIAL_ONLY)
    def fractional_voxels(spacing):
        img, lab = sample_patch(slice_index, labels, (10, 48, 48), (12, 64, 64), np.random.default_rng(3), config, spacing)
        labeled = lab >= 0
        source_slice = img[0].round().long()
        in_plane_constant = (source_slice == source_slice[:, :1, :1]).all() and (lab == source_slice)[labeled].all()
        return ((img - img.round()).abs() > 1e-3).float().mean().item(), bool(in_plane_constant)
    assert fractional_voxels((10.0, 1.0, 1.0)) == (0.0, True)  # em-like: in-plane rotation only
    fraction, in_plane_constant = fractional_voxels((1.0, 1.0, 1.0))
    assert fraction > 0.5 and not in_plane_constant  # isotropic: rotations out of the plane do mix slices


def test_intensity_augmentation_leaves_labels_alone(nuclei_volume):
    image, labels = nuclei_volume
    spatial = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(5), AugmentationConfig(**SPATIAL_ONLY))
    full = sample_patch(image, labels, (15, 30, 28), (20, 40, 40), np.random.default_rng(5), AugmentationConfig())
    assert torch.equal(full[1], spatial[1])
    assert not torch.allclose(full[0], spatial[0], atol=1e-2)
    order = torch.argsort(spatial[0].flatten())
    assert (full[0].flatten()[order].diff() >= -1e-5).all()  # gamma, contrast, brightness are monotone


def test_volume_smaller_than_the_patch():
    image, labels = hippocampus_case()
    assert max(labels.shape) < 100
    center = tuple((n - 1) / 2 for n in labels.shape)
    img, lab = sample_patch(image, labels, center, (100, 100, 100), np.random.default_rng(0), AugmentationConfig())
    assert img.shape == (1, 100, 100, 100) and lab.shape == (100, 100, 100)
    assert torch.isfinite(img).all()
    inside = (lab >= 0).float().mean().item()
    assert 0.02 < inside < 0.2  # about the volume's 35×50×35 out of 100³
    assert set(torch.unique(lab[lab >= 0]).tolist()) <= {0, 1, 2} and (lab > 0).any()


def test_config_round_trips_through_json_and_checks_ranges():
    config = AugmentationConfig(rotation_deg=10.0, scale=(0.9, 1.1), gamma=(0.8, 1.2))
    assert AugmentationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="scale"):
        AugmentationConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="elastic_sigma"):
        AugmentationConfig(elastic_sigma=-1.0)


def test_bad_arguments_are_rejected(nuclei_volume):
    image, labels = nuclei_volume
    with pytest.raises(ValueError, match="differ in shape"):
        sample_patch(image, labels[:-1], (15, 30, 28), (8, 8, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="three positive"):
        sample_patch(image, labels, (15, 30, 28), (8, 0, 8), np.random.default_rng(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_gives_the_cpu_patch(nuclei_volume):
    image, labels = nuclei_volume
    config = AugmentationConfig()
    cpu = sample_patch(image, labels, (15, 30, 28), (28, 56, 56), np.random.default_rng(4), config)
    gpu = sample_patch(image.cuda(), labels.cuda(), (15, 30, 28), (28, 56, 56), np.random.default_rng(4), config)
    assert gpu[0].is_cuda and torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-3)
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.999  # rounding ties may differ on a few voxels
