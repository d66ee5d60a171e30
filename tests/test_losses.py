import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet3d.data.labels import encode_labels
from unet3d.data.sparse import sparsify
from unet3d.losses import LOSSES, dice_cross_entropy, make_loss, soft_dice_loss, weighted_cross_entropy


@pytest.fixture
def sparse_batch(nuclei):
    """Logits of a random 3-class predictor and a target with the paper's (1,1,1) slices of a real crop."""
    _, truth = nuclei
    target = encode_labels(sparsify(truth[:12, :20, :20], (1, 1, 1), ignore_label=3), [0, 1, 2], 3)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, *target.shape, generator=generator, dtype=torch.float64)
    return logits, torch.from_numpy(target).long()[None]


def test_cross_entropy_of_one_voxel_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]]).reshape(1, 3, 1, 1, 1)
    target = torch.tensor([1]).reshape(1, 1, 1, 1)
    expected = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(expected)
    assert weighted_cross_entropy(logits, target, torch.tensor([1.0, 5.0, 1.0])).item() == pytest.approx(expected)


def test_class_weights_give_the_weighted_mean_over_labeled_voxels_by_hand():
    logits = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 3)  # voxels along the last axis
    target = torch.tensor([[0, 1, -1]])
    ce = [math.log(2), math.log(1 + math.exp(3.0))]  # voxel 0 (class 0), voxel 1 (class 1); voxel 2 unlabeled
    weights = torch.tensor([1.0, 3.0])
    expected = (1 * ce[0] + 3 * ce[1]) / (1 + 3)
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx((ce[0] + ce[1]) / 2)


def test_matches_torch_cross_entropy_with_weights_and_ignore_index(sparse_batch):
    logits, target = sparse_batch
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    reference = F.cross_entropy(logits, target, weight=weights, ignore_index=-1)
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(reference.item(), rel=1e-12)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=-1).item(), rel=1e-12
    )


def test_class_weights_shift_the_gradient_towards_the_weighted_class(sparse_batch):
    logits, target = sparse_batch

    def gradient_norm_at(class_index, weights):
        logits_ = logits.clone().requires_grad_()
        weighted_cross_entropy(logits_, target, weights).backward()
        return logits_.grad.movedim(1, -1)[target == class_index].norm().item()

    plain, boosted = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, 10.0, 1.0], dtype=torch.float64)
    ratio = gradient_norm_at(1, boosted) / gradient_norm_at(0, boosted)
    assert ratio == pytest.approx(10 * gradient_norm_at(1, plain) / gradient_norm_at(0, plain))


@pytest.mark.parametrize("name", LOSSES)
def test_unlabeled_voxels_change_neither_loss_nor_gradient(sparse_batch, name):
    logits, target = sparse_batch
    loss_fn = make_loss(name, class_weights=[0.7, 1.4, 1.2])
    unlabeled = (target < 0).unsqueeze(1).expand_as(logits)
    changed = torch.where(unlabeled, 50 * torch.randn_like(logits), logits)

    def loss_and_gradient(x):
        x = x.clone().requires_grad_()
        loss = loss_fn(x, target)
        loss.backward()
        return loss.item(), x.grad

    loss_a, grad_a = loss_and_gradient(logits)
    loss_b, grad_b = loss_and_gradient(changed)
    assert loss_a == loss_b
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_a[unlabeled] == 0)
    assert grad_a[~unlabeled].abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_a_batch_without_labeled_voxels_gives_zero_not_nan(sparse_batch, name):
    logits, target = sparse_batch
    logits = logits.clone().requires_grad_()
    loss = make_loss(name, class_weights=[1.0, 2.0, 3.0])(logits, torch.full_like(target, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_soft_dice_by_hand_skips_classes_absent_from_the_labeled_voxels():
    # class-0 probabilities 0.5 and ~1 at the two labeled voxels (both class 0); voxel 3 unlabeled
    logits = torch.tensor([[0.0, 0.0, -1e4], [30.0, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=torch.float64).T.reshape(1, 3, 3)
    target = torch.tensor([[0, 0, -1]])
    dice_class0 = 2 * (0.5 + 1.0) / ((0.5 + 1.0) + 2)
    # classes 1 and 2 have no labeled voxel: left out (averaging in class 1's Dice of 0 would give 1 - dice/2)
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - dice_class0, rel=1e-9)


def test_soft_dice_is_zero_for_a_perfect_prediction_of_the_labeled_voxels(nuclei):
    _, truth = nuclei
    target = torch.from_numpy(encode_labels(sparsify(truth[:8, :16, :16], (1, 1, 1), ignore_label=3), [0, 1, 2], 3)).long()[None]
    logits = 100.0 * F.one_hot(target.clamp(min=0), 3).movedim(-1, 1).double()
    logits = torch.where((target < 0).unsqueeze(1), torch.zeros_like(logits), logits)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-12)


def test_dice_cross_entropy_is_the_sum_of_its_parts(sparse_batch):
    logits, target = sparse_batch
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    combined = dice_cross_entropy(logits, target, weights, dice_weight=0.3)
    expected = weighted_cross_entropy(logits, target, weights) + 0.3 * soft_dice_loss(logits, target)
    assert combined.item() == pytest.approx(expected.item())
    assert make_loss("dice_ce", weights, dice_weight=0.3)(logits.float(), target).item() == pytest.approx(
        combined.item(), rel=1e-5
    )


def test_unknown_loss_name_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("focal", None)


def test_weights_work_as_numpy_and_follow_the_logits_dtype(sparse_batch):
    logits, target = sparse_batch
    loss = make_loss("ce", np.array([1.0, 2.0, 3.0]))(logits, target)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
