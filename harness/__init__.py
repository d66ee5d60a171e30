"""What benchmarks and experiments share, so that a number means the same wherever it is recorded:
the registry of shared volumes (`harness.volumes`), the forest peer (`harness.forest`), scored and
timed runs on one volume (`harness.runs`), and the label value of unannotated voxels."""

IGNORE = 255  # unannotated voxels in the sparse labels (no shared volume has 256 classes)
