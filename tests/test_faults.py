"""Faults the other tests do not reach: an output store damaged after a run (found, named in one
line, only its blocks predicted again) and a full disk (one line, nothing left behind). The kills
of training and of a Dask worker are tested in test_training.py and test_distributed_predict.py;
benchmarks/bench_faults.py repeats all four as docs/reliability.md's table."""

import numpy as np
import pytest

from benchmarks.bench_faults import Prediction, damaged_stores, disk_full, local_cluster


def test_damaged_chunks_are_named_in_one_line_and_only_their_blocks_predicted_again(tmp_path):
    pytest.importorskip("distributed", reason="prediction on Dask needs unet3d[distributed]")
    with local_cluster() as client:
        row = damaged_stores(Prediction.make(tmp_path), client, 1, np.random.default_rng())
    assert row.passed == row.count == 1, row.notes


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    """On a 1 MiB tmpfs where mounting is allowed, else under RLIMIT_FSIZE."""
    row = disk_full(tmp_path)
    assert row.passed == row.count == 4, row.notes
