import numpy as np
import pytest

from unet3d.baselines import random_forest_segment
from unet3d.data.features import ILASTIK_SCALES, feature_names, filter_features
from unet3d.data.features import (bank_halo, input_feature_spec, region_with_input_features,
                                       symmetric_eigenvalues_3x3, with_input_features)
from unet3d.data.labels import encode_labels
from unet3d.data.sparse import sparsify
from unet3d.evaluation.metrics import evaluate_volumes

IGNORE = 255


def test_feature_bank_has_ilastiks_61_features_per_channel_all_finite(nuclei):
    image, _ = nuclei
    crop = image[:10, :24, :24].astype(np.float32)
    two_channels = np.stack([crop, np.sqrt(crop)])
    features = filter_features(two_channels, ILASTIK_SCALES)
    names = feature_names(2, ILASTIK_SCALES)
    assert features.shape == (122, 10, 24, 24) and len(names) == len(set(names)) == 122
    assert features.dtype == np.float32 and np.isfinite(features).all()
    row = {name: f for name, f in zip(names, features)}
    hessian = sum(row[f"hessian_of_gaussian_eigenvalue_{i}(sigma=1.6, channel=1)"] for i in range(3))
    np.testing.assert_allclose(row["laplacian_of_gaussian(sigma=1.6, channel=1)"], hessian, rtol=1e-3, atol=1e-3)
    tensor = [row[f"structure_tensor_eigenvalue_{i}(sigma=3.5, channel=0)"] for i in range(3)]
    assert (tensor[0] >= tensor[1]).all() and (tensor[1] >= tensor[2]).all()
    assert tensor[2].min() >= -1e-3 * tensor[0].max()  # a structure tensor is positive semi-definite
    network_input = with_input_features(two_channels, input_feature_spec(None, ILASTIK_SCALES))
    assert np.array_equal(network_input, np.concatenate([two_channels, features]))


@pytest.mark.parametrize("spacing", [None, (3.0, 1.0, 1.0)])
def test_a_region_of_the_bank_is_computed_from_the_region_and_its_halo(nuclei, spacing):
    """Prediction streams filter-bank inputs region by region; they must equal the whole volume's."""
    image = nuclei[0][None].astype(np.float32)
    spec = input_feature_spec(spacing, (0.3, 1.0, 1.6))
    halo = bank_halo(spec)
    assert halo == ((3 if spacing else 8), 8, 8)  # 1.6: gradient 3.5σ → 6, then 0.8 smoothing 3σ → 2
    whole = with_input_features(image, spec)
    reads = []

    def read(box):
        reads.append(box)
        return image[(slice(None),) + box]

    for box in [(slice(10, 20), slice(20, 40), slice(20, 40)), (slice(0, 5), slice(50, 61), slice(3, 30))]:
        region = region_with_input_features(read, image.shape[1:], box, spec)
        np.testing.assert_allclose(region, whole[(slice(None),) + box], rtol=1e-5, atol=1e-5)
    z = halo[0]
    assert reads == [(slice(10 - z, 20 + z), slice(12, 48), slice(12, 48)),  # grown by the halo
                     (slice(0, 5 + z), slice(42, 61), slice(0, 38))]  # clipped at the volume's faces


@pytest.mark.parametrize("spacing", [None, (2.5, 1.0, 1.0), (10.0, 1.0, 1.0)])
def test_hessian_of_a_quadratic_is_exact_in_physical_units(spacing):
    """f = 3x² + y² − 2z² + xy/2 in physical coordinates: Hessian eigenvalues 6.06, 1.94, −4 everywhere."""
    ratios = np.ones(3) if spacing is None else np.asarray(spacing) / min(spacing)
    z, y, x = np.meshgrid(*(np.arange(24) * r for r in ratios), indexing="ij")
    quadratic = (3 * x**2 + y**2 - 2 * z**2 + 0.5 * x * y).astype(np.float32)
    scales = (0.7, 1.6)
    features = filter_features(quadratic[None], scales, spacing)[:, 10:14, 10:14, 10:14]  # away from the border
    expected = np.linalg.eigvalsh([[-4, 0, 0], [0, 2, 0.5], [0, 0.5, 6]])[::-1]
    for name, values in zip(feature_names(1, scales), features):
        if name.startswith("hessian_of_gaussian_eigenvalue_"):
            np.testing.assert_allclose(values, expected[int(name[31])], rtol=1e-4, atol=1e-4)
        elif name.startswith("laplacian_of_gaussian"):
            np.testing.assert_allclose(values, 4.0, rtol=1e-4)


def test_closed_form_eigenvalues_match_lapack_including_degenerate_matrices():
    rng = np.random.default_rng(0)
    matrices = rng.normal(size=(4000, 3, 3)) * 10.0 ** rng.integers(-4, 4, size=(4000, 1, 1))
    matrices = matrices + matrices.transpose(0, 2, 1)
    matrices[:500] = np.eye(3) * rng.normal(size=(500, 1, 1))  # triple eigenvalue
    matrices[500:1000] = np.diag([1.0, 1.0, -2.0])  # double eigenvalue
    matrices[1000:1500] = 0.0
    entries = [matrices[:, i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    expected = np.linalg.eigvalsh(matrices)[:, ::-1].T
    scale = np.abs(matrices).max(axis=(1, 2))
    assert (np.abs(symmetric_eigenvalues_3x3(*entries) - expected) <= 1e-9 * scale + 1e-300).all()


def _sparse_indices(truth: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray]:
    """(sparse label values with IGNORE, int64 class indices with -1) of the paper's slice rule."""
    sparse = sparsify(truth, slices, ignore_label=IGNORE)
    return sparse, encode_labels(sparse, range(int(truth.max()) + 1), IGNORE)


@pytest.mark.parametrize("slices", [(1, 1, 1), (3, 3, 2)])
def test_forest_densifies_nuclei_far_above_chance(nuclei, slices):
    image, truth = nuclei
    sparse, indices = _sparse_indices(truth, slices)
    result = random_forest_segment(image[None], indices, n_trees=30)
    assert result.labels.shape == truth.shape and result.probabilities.shape == (3,) + truth.shape
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, rtol=1e-5)
    assert (result.labels == result.probabilities.argmax(axis=0)).all()
    ious = [c["iou"] for c in evaluate_volumes(result.labels, truth, sparse, IGNORE)["classes"]]
    # Guessing by the class frequencies (62/24/14 %) gives IoUs of p/(2 − p): 0.44/0.14/0.08.
    assert ious[0] > 0.7 and ious[1] > 0.35 and ious[2] > 0.15, ious


def test_seeded_forest_is_deterministic_and_cap_on_training_voxels_is_honoured(nuclei):
    image, truth = nuclei
    _, indices = _sparse_indices(truth[:16], (1, 1, 1))
    runs = [random_forest_segment(image[None, :16], indices, n_trees=8, seed=3, max_train_voxels=500) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].probabilities, runs[1].probabilities)
    other_seed = random_forest_segment(image[None, :16], indices, n_trees=8, seed=4, max_train_voxels=500)
    assert not np.array_equal(runs[0].probabilities, other_seed.probabilities)


def test_unannotated_volume_is_refused(nuclei):
    image, _ = nuclei
    with pytest.raises(ValueError, match="no voxel"):
        random_forest_segment(image[None], np.full(image.shape, -1, dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        random_forest_segment(image[None], np.zeros(image.shape[1:], dtype=np.int64))


def test_a_forest_grown_within_a_time_limit_has_the_trees_of_one_fitted_at_once(nuclei):
    from itertools import count

    from unet3d.baselines.forest import fit_forest

    image, truth = nuclei
    bank = filter_features(image[None, :8], (1.0, 3.5))
    features = bank.reshape(bank.shape[0], -1)
    _, indices = _sparse_indices(truth[:8], (1, 1, 1))
    labels = indices.reshape(-1)
    voxels = np.flatnonzero(labels >= 0)
    ticks = count().__next__  # a clock one second later at every reading

    def fit(n_trees, seconds=None):
        return fit_forest(features, labels, voxels, n_trees, seed=5, n_jobs=1, seconds=seconds, clock=ticks)

    assert fit(30, seconds=1.0).n_estimators == 10  # too little time: the first round only
    roomy = fit(30, seconds=1e6)
    assert roomy.n_estimators == 30  # time to spare: all the trees asked for, not more
    at_once = fit(30)
    np.testing.assert_array_equal(roomy.predict_proba(features[:, :500].T), at_once.predict_proba(features[:, :500].T))
    # In between, growth stops when the next round's fit and prediction would pass the limit.
    assert 10 < fit(100, seconds=20.0).n_estimators < 100
