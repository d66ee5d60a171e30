"""Time per augmented training patch: unet3d (torch grid_sample) vs scipy map_coordinates vs elasticdeform.

Usage: .venv/bin/python benchmarks/bench_augmentation.py [--quick]

All three apply the same kind of transform (flips, rotation, zoom, cubic B-spline elastic
deformation with spacing 32 / sigma 4, trilinear image with mirrored border, nearest labels with
-1 outside) and read only the region around the patch. The last columns time one forward and
backward pass of a small U-Net on the same patch, to put the augmentation cost in proportion.
Uses the ovule volume from the shared data when present, else the bundled nuclei example.

Augmentation is timed with one thread, as it runs in DataLoader workers (which torch limits to
one thread each), and with all threads, as in the main process; the training step with all.
On a busy machine the all-threads figure suffers most: every small parallel op waits for a core.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from timing import median_time
from unet3d.augmentation import AugmentationConfig, sample_patch
from unet3d.augmentation import spatial
from unet3d.model import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNET3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_volume() -> tuple[str, torch.Tensor, torch.Tensor]:
    """A real (1, Z, Y, X) normalized image and int64 labels."""
    path = SHARED_DATA / "ovule" / "ovule.h5"
    if path.exists():
        import h5py

        with h5py.File(path, "r") as f:
            image, labels = f["raw"][:].astype(np.float32), f["labels"][:].astype(np.int64)
        name = "ovule"
    else:
        import tifffile

        example = REPO / "src" / "unet3d" / "examples" / "nuclei_tiny"
        image = tifffile.imread(example / "image.tif").astype(np.float32)
        labels = tifffile.imread(example / "labels.tif").astype(np.int64)
        name = "nuclei_tiny"
    image = (image - image.mean()) / image.std()
    return name, torch.from_numpy(image)[None], torch.from_numpy(labels)


def random_transform(rng, config, shape):
    linear = spatial.random_linear_map(rng, config, (1.0, 1.0, 1.0))
    field = spatial.random_elastic_field(rng, config, shape, (1.0, 1.0, 1.0))
    return linear, field


def scipy_patch(image, labels, center, shape, rng, config):
    """The same transform, positions built in numpy and sampled with scipy.ndimage.map_coordinates."""
    linear, field = random_transform(rng, config, shape)
    pivot = spatial.patch_start(center, shape) + np.asarray(shape) // 2
    offsets = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")).astype(np.float32)
    positions = np.einsum("ak,kzyx->azyx", linear.astype(np.float32), offsets)
    positions += pivot[:, None, None, None] + field.numpy()[..., ::-1].transpose(3, 0, 1, 2)
    # map_coordinates reads only the voxels it needs from the full volume; order 1 needs no prefilter
    img = ndimage.map_coordinates(image[0].numpy(), positions, order=1, mode="mirror", output=np.float32)
    lab = ndimage.map_coordinates(labels.numpy(), positions, order=0, mode="constant", cval=-1)
    return img, lab


def elasticdeform_patch(image, labels, center, shape, rng, config):
    """elasticdeform on a mirrored window with a margin, the affine part given as its output affine."""
    import elasticdeform

    linear, _ = random_transform(rng, config, shape)
    margin = np.ceil(np.asarray(shape) * 0.25).astype(int)
    region_shape = np.asarray(shape) + 2 * margin
    start = spatial.patch_start(center, shape) - margin
    region_image, region_labels = spatial.window(image, labels, start, region_shape)
    points = [spatial.control_point_count(n, config.elastic_spacing) for n in region_shape]
    displacement = rng.normal(scale=config.elastic_sigma, size=(3, *points))
    middle = (region_shape - 1) / 2
    inverse = np.linalg.inv(linear)
    affine = np.hstack([inverse, (middle - inverse @ middle)[:, None]])
    crop = [slice(int(m), int(m) + n) for m, n in zip(margin, shape)]
    img, lab = elasticdeform.deform_grid([region_image[0].numpy(), region_labels.numpy().astype(np.float32)],
                                         displacement, order=[1, 0], mode=["mirror", "constant"], cval=[0.0, -1.0],
                                         crop=crop, affine=affine)
    return img, lab


def training_step_time(shape, repeats: int) -> float | None:
    """Forward + backward of a width-16, 4-level valid U-Net on one patch, or None for an invalid size."""
    config = UNetConfig(width=16, levels=4, num_classes=3)
    if config.geometry.valid_input_shape(shape) != tuple(shape):
        return None
    model = UNet(config).train()
    x = torch.randn(1, 1, *shape)
    target = torch.randint(0, 3, (1, *config.geometry.output_shape(shape)))

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()

    return median_time(step, max(1, repeats // 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no elasticdeform/scipy on the big patch")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    name, image, labels = load_volume()
    config = AugmentationConfig()
    small_image, small_labels = image[:, :35, :50, :35], labels[:35, :50, :35]  # hippocampus-sized
    cases = [
        (f"{name} {tuple(labels.shape)}", image, labels, (64, 64, 64)),
        (f"{name} {tuple(labels.shape)}", image, labels, (116, 132, 132)),
        (f"{name} crop {tuple(small_labels.shape)}", small_image, small_labels, (92, 92, 92)),
    ]
    try:
        import elasticdeform  # noqa: F401

        have_elasticdeform = True
    except ImportError:
        have_elasticdeform = False
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs; median of {repeats}, ms per patch")
    print(f"{'volume':<26} {'patch':<12} {'crop':>5} {'unet3d 1 thread':>16} {f'unet3d {threads} threads':>17} "
          f"{'scipy':>6} {'elasticdeform':>14} {'train step':>11} {'augment/step':>13}")
    for label, img, lab, shape in cases:
        center = tuple((n - 1) / 2 for n in lab.shape)
        rng = np.random.default_rng(0)
        torch.set_num_threads(1)
        crop = median_time(lambda: sample_patch(img, lab, center, shape, rng, None), repeats)
        single = median_time(lambda: sample_patch(img, lab, center, shape, rng, config), repeats)
        torch.set_num_threads(threads)
        parallel = median_time(lambda: sample_patch(img, lab, center, shape, rng, config), repeats)
        skip_others = args.quick and np.prod(shape) > 1_000_000
        scipy_time = None if skip_others else median_time(lambda: scipy_patch(img, lab, center, shape, rng, config), repeats)
        ed_time = None if skip_others or not have_elasticdeform else median_time(
            lambda: elasticdeform_patch(img, lab, center, shape, rng, config), repeats)
        step = training_step_time(shape, repeats)
        cells = [f"{1000 * t:.0f}" if t is not None else "-" for t in (crop, single, parallel, scipy_time, ed_time, step)]
        share = f"{100 * single / step:.1f}%" if step else "-"
        print(f"{label:<26} {'x'.join(map(str, shape)):<12} {cells[0]:>5} {cells[1]:>16} {cells[2]:>17} "
              f"{cells[3]:>6} {cells[4]:>14} {cells[5]:>11} {share:>13}")


if __name__ == "__main__":
    main()
