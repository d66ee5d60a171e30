"""What benchmarks and experiments share: the registry of shared volumes (`harness.volumes`) and
the label value of unannotated voxels in the sparse labels they make."""

IGNORE = 255  # unannotated voxels in the sparse labels (no shared volume has 256 classes)
