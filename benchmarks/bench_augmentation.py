"""Time per augmented training patch: unet3d vs MONAI, scipy and elasticdeform, against the training step.

Usage: .venv-bench/bin/python -m benchmarks.bench_augmentation [--quick]
(MONAI rows need the peer environment, `bash benchmarks/peers.sh`; elasticdeform rows need
elasticdeform; rows whose library is missing are left out with a note.)

Every row makes one training patch pair (image and labels) of the given size from a real volume:
- unet3d: `sample_patch` with the paper's augmentation (flips, rotation ±15°, zoom 0.85–1.15,
  cubic B-spline elastic deformation with control points every 32 voxels and displacements of
  σ 4 voxels, gamma / contrast / brightness), reading only the region the transform reaches;
  "affine" rows switch the elastic deformation off.
- MONAI: a region around the patch (the patch plus a quarter of it on each side, mirrored at the
  volume's border) through `RandFlipd`, `Rand3DElasticd` (the same rotation and zoom ranges, a
  dense random field smoothed by a Gaussian of σ 8 voxels, magnitude chosen so displacements have
  σ ≈ 4 voxels) or `RandAffined` for the affine rows, then `RandAdjustContrastd`,
  `RandScaleIntensityd` and `RandShiftIntensityd`, every transform with probability 1; MONAI's
  defaults otherwise (metadata tracking on), as a MONAI user runs it.
- scipy `map_coordinates` and elasticdeform: the spatial part of unet3d's transform (no gray
  values), for a reference.
The training step is the forward and backward pass of a width-16, 4-level U-Net on the same patch
(valid padding where the patch is a valid input size, else same padding), to put augmentation in
proportion: the issue's bar is augmentation under 10 % of the step it feeds.

Augmentation runs with one thread, as in DataLoader workers (which torch limits to one thread
each); the step with all threads. Uses the ovule volume from the shared data when present, else
the bundled nuclei example.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from benchmarks.timing import median_time
from harness import volumes
from unet3d.augmentation import AugmentationConfig, sample_patch
from unet3d.augmentation import spatial
from unet3d.model import UNet, UNetConfig



def load_volume() -> tuple[str, torch.Tensor, torch.Tensor]:
    """A real (1, Z, Y, X) normalized image and int64 labels: the ovule, else the bundled example."""
    volume = volumes.load("ovule" if (volumes.shared_data() / "ovule").exists() else "nuclei_tiny")
    image = volume.image.astype(np.float32)
    image = (image - image.mean()) / image.std()
    return volume.name, torch.from_numpy(image), torch.from_numpy(volume.truth)


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


def region_around_patch(image, labels, center, shape):
    """The patch's window grown by a quarter of the patch on each side (mirrored at the volume's
    border), for libraries that transform a whole array: image, labels and the margin."""
    margin = np.ceil(np.asarray(shape) * 0.25).astype(int)
    start = spatial.patch_start(center, shape) - margin
    region_image, region_labels = spatial.window(image, labels, start, np.asarray(shape) + 2 * margin)
    return region_image, region_labels, margin


def elasticdeform_patch(image, labels, center, shape, rng, config):
    """elasticdeform on a mirrored window with a margin, the affine part given as its output affine."""
    import elasticdeform

    linear, _ = random_transform(rng, config, shape)
    region_image, region_labels, margin = region_around_patch(image, labels, center, shape)
    region_shape = np.asarray(region_labels.shape)
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


def monai_pipeline(config: AugmentationConfig, shape, elastic: bool, seed: int):
    """MONAI's dictionary transforms doing the work of unet3d's augmentation, or None without MONAI."""
    try:
        from monai import transforms
    except ImportError:
        return None
    keys = ("image", "label")
    rotation = np.deg2rad(config.rotation_deg)
    scale = config.scale[1] - 1.0
    spatial_options = dict(spatial_size=shape, prob=1.0, rotate_range=(rotation,) * 3, scale_range=(scale,) * 3,
                           mode=("bilinear", "nearest"), padding_mode=("reflection", "zeros"))
    if elastic:
        sigma = 8.0
        spatial_transform = transforms.Rand3DElasticd(keys, sigma_range=(sigma, sigma),
                                                      magnitude_range=(MONAI_MAGNITUDE_PER_VOXEL * config.elastic_sigma,) * 2,
                                                      **spatial_options)
    else:
        spatial_transform = transforms.RandAffined(keys, **spatial_options)
    pipeline = transforms.Compose([
        transforms.RandFlipd(keys, prob=0.5, spatial_axis=0),
        transforms.RandFlipd(keys, prob=0.5, spatial_axis=1),
        transforms.RandFlipd(keys, prob=0.5, spatial_axis=2),
        spatial_transform,
        transforms.RandAdjustContrastd("image", prob=1.0, gamma=config.gamma),
        transforms.RandScaleIntensityd("image", factors=config.intensity_scale[1] - 1.0, prob=1.0),
        transforms.RandShiftIntensityd("image", offsets=config.intensity_shift, prob=1.0),
    ])
    pipeline.set_random_state(seed)
    return pipeline


# Rand3DElastic scales a Gaussian-smoothed field of uniform(-1, 1) noise by its magnitude; with a
# kernel of σ 8 voxels (truncated at 3σ) the smoothed noise has a standard deviation of about
# 1/269 (measured), so this magnitude per voxel of displacement σ matches unet3d's elastic_sigma.
MONAI_MAGNITUDE_PER_VOXEL = 269.0


def monai_patch(pipeline, image, labels, center, shape):
    """The region around the patch through MONAI."""
    region_image, region_labels, _ = region_around_patch(image, labels, center, shape)
    out = pipeline({"image": region_image, "label": region_labels[None].float()})
    return out["image"], out["label"]


def training_step_time(shape, repeats: int) -> tuple[float, str]:
    """Seconds for forward + backward of a width-16, 4-level U-Net on one patch, and its padding."""
    padding = "valid"
    config = UNetConfig(width=16, levels=4, num_classes=3, padding=padding)
    if config.geometry.valid_input_shape(shape) != tuple(shape):
        padding = "same"
        config = UNetConfig(width=16, levels=4, num_classes=3, padding=padding)
    model = UNet(config).train()
    x = torch.randn(1, 1, *shape)
    target = torch.randint(0, 3, (1, *config.geometry.output_shape(shape)))

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()

    return median_time(step, max(1, repeats // 3)), padding


def implementations(config: AugmentationConfig, shape, quick: bool):
    """(name, work, function(image, labels, center, rng) or None with the reason it is missing)."""
    affine = AugmentationConfig(elastic_sigma=0.0)
    rows = [
        ("unet3d, crop only", "none", lambda i, l, c, r: sample_patch(i, l, c, shape, r, None)),
        ("unet3d", "paper", lambda i, l, c, r: sample_patch(i, l, c, shape, r, config)),
        ("unet3d", "affine", lambda i, l, c, r: sample_patch(i, l, c, shape, r, affine)),
    ]
    for work, elastic in (("paper", True), ("affine", False)):
        pipeline = monai_pipeline(config, shape, elastic, seed=0)
        rows.append((f"MONAI {'Rand3DElasticd' if elastic else 'RandAffined'}", work,
                     None if pipeline is None else lambda i, l, c, r, p=pipeline: monai_patch(p, i, l, c, shape)))
    big = quick and np.prod(shape) > 1_000_000
    rows.append(("scipy map_coordinates", "spatial", None if big else
                 lambda i, l, c, r: scipy_patch(i, l, c, shape, r, config)))
    try:
        import elasticdeform  # noqa: F401
        deform = None if big else lambda i, l, c, r: elasticdeform_patch(i, l, c, shape, r, config)
    except ImportError:
        deform = None
    rows.append(("elasticdeform", "spatial", deform))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; no scipy/elasticdeform on the big patch")
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
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}; augmentation on 1 thread, training step on {threads}; "
          f"median of {repeats}, ms per patch pair\n")
    print("| volume | patch | implementation | augmentation | ms | ÷ unet3d | share of the step |")
    print("|---|---|---|---|---:|---:|---:|")
    missing = set()
    for label, img, lab, shape in cases:
        center = tuple((n - 1) / 2 for n in lab.shape)
        step, padding = training_step_time(shape, repeats)
        unet3d_times = {}
        torch.set_num_threads(1)
        for implementation, work, function in implementations(config, shape, args.quick):
            if function is None:
                missing.add(implementation)
                continue
            rng = np.random.default_rng(0)
            seconds = median_time(lambda: function(img, lab, center, rng), repeats)
            if implementation.startswith("unet3d"):
                unet3d_times[work] = seconds
            reference = unet3d_times.get("paper" if work == "spatial" else work)
            ratio = f"{seconds / reference:.2f}" if reference else "-"
            print(f"| {label} | {'×'.join(map(str, shape))} | {implementation} | {work} | {1000 * seconds:.0f} "
                  f"| {ratio} | {100 * seconds / step:.1f} % |")
        torch.set_num_threads(threads)
        print(f"| {label} | {'×'.join(map(str, shape))} | training step ({padding} padding) | – | "
              f"{1000 * step:.0f} | – | 100 % |")
    if missing:
        print(f"\nLeft out (library missing, or skipped by --quick on the large patch): {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
