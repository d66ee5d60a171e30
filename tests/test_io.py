import os
import shutil

import h5py
import nibabel
import numpy as np
import pytest
import tifffile
import zarr

from conftest import EXAMPLE, shared_volume
from unet3d.errors import UserError
from unet3d.io import VolumeMeta, open_volume, parse_spec, read_image, read_labels, volume_writer, write_volume

EXTENSIONS = ["tif", "nii", "nii.gz", "h5", "zarr", "npy", "npz"]
WITH_SPACING = {"tif", "nii", "nii.gz", "h5", "zarr"}
SPACING = (2.0, 0.5, 0.25)
REGION = (slice(3, 17), slice(10, 50, 2), slice(None, 40))


def _like(spacing=SPACING):
    return VolumeMeta(path="source", format="npy", spacing=spacing)


def _files_in(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_image_and_labels_round_trip(tmp_path, nuclei, ext):
    image, labels = nuclei
    write_volume(tmp_path / f"image.{ext}", image, like=_like())
    write_volume(tmp_path / f"labels.{ext}", labels)
    read, meta = read_image(str(tmp_path / f"image.{ext}"))
    assert read.dtype == image.dtype and read.shape == (1, *image.shape)
    np.testing.assert_array_equal(read[0], image)
    assert meta.spacing == (SPACING if ext in WITH_SPACING else None)
    read, _ = read_labels(str(tmp_path / f"labels.{ext}"))
    assert read.dtype == labels.dtype
    np.testing.assert_array_equal(read, labels)
    assert _files_in(tmp_path) == sorted([f"image.{ext}", f"labels.{ext}"])


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_multichannel_round_trip(tmp_path, nuclei, ext):
    image, labels = nuclei
    channels = np.stack([image, labels.astype(image.dtype) * 1000, image[::-1]])
    write_volume(tmp_path / f"rgb.{ext}", channels)
    read, _ = read_image(str(tmp_path / f"rgb.{ext}"))
    np.testing.assert_array_equal(read, channels)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_region_reads_equal_slicing_of_the_full_read(tmp_path, nuclei, ext):
    image, _ = nuclei
    write_volume(tmp_path / f"image.{ext}", image)
    with open_volume(str(tmp_path / f"image.{ext}")) as volume:
        assert volume.shape == (1, *image.shape) and volume.dtype == image.dtype
        np.testing.assert_array_equal(volume.read(REGION), image[None][(slice(None), *REGION)])


def test_compressed_tiff_region_reads(nuclei):
    image, _ = nuclei
    with open_volume(str(EXAMPLE / "image.tif")) as volume:
        np.testing.assert_array_equal(volume.read(REGION)[0], image[REGION])
        np.testing.assert_array_equal(volume.read()[0], image)


def test_uncompressed_tiff_and_npy_are_memory_mapped(tmp_path, nuclei):
    image, _ = nuclei
    for name in ("image.tif", "image.npy"):
        write_volume(tmp_path / name, image)
        with open_volume(str(tmp_path / name)) as volume:
            assert isinstance(volume._source.array, np.memmap)
            region = volume.read(REGION)
            assert not isinstance(region, np.memmap) and region.flags.writeable


def test_ovule_hdf5_datasets_and_region_reads():
    path = shared_volume("ovule", "ovule.h5")
    with h5py.File(path, "r") as file:
        raw, labels = file["raw"][:], file["labels"][:]
    region = (slice(10, 30), slice(50, 150), slice(0, 200, 3))
    with open_volume(f"{path}:/raw") as volume:
        assert volume.shape == (1, 64, 200, 200) and volume.dtype == np.uint16
        np.testing.assert_array_equal(volume.read(region)[0], raw[region])
    with open_volume(f"{path}:labels", kind="labels") as volume:
        np.testing.assert_array_equal(volume.read(region), labels[region])


def test_hippocampus_nifti_axis_order_affine_and_header(tmp_path):
    path = shared_volume("hippocampus", "labels", "hippocampus_003.nii.gz")
    stored = nibabel.load(path)
    labels, meta = read_labels(str(path))
    assert stored.get_data_dtype() == np.float32 and labels.dtype == np.int64  # float holding integers
    np.testing.assert_array_equal(labels, np.asarray(stored.dataobj).transpose(2, 1, 0))
    assert labels.shape == stored.shape[::-1] and meta.spacing == tuple(float(z) for z in stored.header.get_zooms()[::-1])
    meta.affine = meta.affine @ np.diag([1.5, -1.0, 2.0, 1.0])  # a non-trivial orientation must survive too
    meta.header["descrip"] = b"kept"
    out = tmp_path / "prediction.nii.gz"
    write_volume(out, labels.astype(np.uint8), like=meta)
    written = nibabel.load(out)
    np.testing.assert_allclose(written.affine, meta.affine)
    assert written.header["descrip"] == b"kept" and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(stored.dataobj))
    again, _ = read_labels(str(out))
    np.testing.assert_array_equal(again, labels)


def test_nifti_round_trip_keeps_the_header(tmp_path):
    path = shared_volume("hippocampus", "images", "hippocampus_001.nii.gz")
    image, meta = read_image(str(path))
    out = tmp_path / "copy.nii"
    write_volume(out, image[0], like=meta)
    original, copy = nibabel.load(path).header, nibabel.load(out).header
    for field in original.keys():
        if field != "vox_offset":
            np.testing.assert_array_equal(copy[field], original[field], err_msg=field)


def test_channel_detection_and_explicit_channel_axis(tmp_path, nuclei):
    image, labels = nuclei
    last = np.stack([image, labels.astype(image.dtype)], axis=-1)  # (Z, Y, X, 2)
    np.save(tmp_path / "last.npy", last)
    read, _ = read_image(str(tmp_path / "last.npy"))
    np.testing.assert_array_equal(read, np.moveaxis(last, -1, 0))
    middle = np.moveaxis(last, -1, 1)  # (Z, 2, Y, X): no first/last axis looks like channels
    np.save(tmp_path / "middle.npy", middle)
    with pytest.raises(UserError, match=r"middle.npy: expected a 3-D volume .* got shape \(31, 2, 61, 57\).*channel_axis"):
        read_image(str(tmp_path / "middle.npy"))
    read, _ = read_image(str(tmp_path / "middle.npy"), channel_axis=1)
    np.testing.assert_array_equal(read, np.moveaxis(last, -1, 0))


def test_imagej_axes_metadata_wins(tmp_path, nuclei):
    image, labels = nuclei
    zcyx = np.stack([image, labels.astype(image.dtype)], axis=1)
    tifffile.imwrite(tmp_path / "hyper.tif", zcyx, imagej=True, metadata={"axes": "ZCYX"})
    read, meta = read_image(str(tmp_path / "hyper.tif"))
    assert meta.axes == "ZCYX"
    np.testing.assert_array_equal(read, zcyx.transpose(1, 0, 2, 3))


def test_ome_zarr_first_level_axes_and_scale(tmp_path, nuclei):
    """A hand-made OME-Zarr 0.4 image: (z, c, y, x) axes and two resolution levels."""
    image, labels = nuclei
    zcyx = np.stack([image, labels.astype(image.dtype)], axis=1)
    group = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=2)
    group.create_array("s0", data=zcyx, chunks=(8, 1, 32, 32))
    group.create_array("s1", data=zcyx[:, :, ::2, ::2])
    axes = [{"name": "z", "type": "space"}, {"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    datasets = [{"path": f"s{i}", "coordinateTransformations": [{"type": "scale", "scale": [3.0, 1.0, 0.5 * 2**i, 0.5 * 2**i]}]} for i in (0, 1)]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    with open_volume(str(tmp_path / "ome.zarr")) as volume:
        assert volume.shape == (2, 31, 61, 57) and volume.meta.spacing == (3.0, 0.5, 0.5)
        np.testing.assert_array_equal(volume.read(REGION), zcyx.transpose(1, 0, 2, 3)[(slice(None), *REGION)])
    read, _ = read_image(str(tmp_path / "ome.zarr:/s1"))
    np.testing.assert_array_equal(read, zcyx[:, :, ::2, ::2].transpose(1, 0, 2, 3))


@pytest.mark.parametrize("ext", ["h5", "zarr"])
def test_volume_writer_streams_blocks(tmp_path, ext):
    with h5py.File(shared_volume("ovule", "ovule.h5"), "r") as file:
        raw = file["raw"][:32, :96, :80]
    out = tmp_path / f"out.{ext}"
    with volume_writer(str(out), raw.shape, raw.dtype, like=_like(), chunks=(16, 32, 32)) as writer:
        for z in (0, 16):
            for y in (0, 48):
                block = (slice(z, z + 16), slice(y, y + 48), slice(None))
                writer.write(block, raw[block])
        assert not out.exists()  # appears only on a clean exit
    read, meta = read_image(str(out))
    np.testing.assert_array_equal(read[0], raw)
    assert meta.spacing == SPACING


@pytest.mark.parametrize("ext", ["h5", "zarr"])
def test_writing_a_dataset_keeps_the_other_datasets(tmp_path, nuclei, ext):
    image, labels = nuclei
    container = str(tmp_path / f"data.{ext}")
    write_volume(f"{container}:/raw", image)
    write_volume(f"{container}:/labels", labels)
    write_volume(f"{container}:/raw", image[::-1])  # overwrite one dataset
    np.testing.assert_array_equal(read_labels(f"{container}:/labels")[0], labels)
    np.testing.assert_array_equal(read_image(f"{container}:/raw")[0][0], image[::-1])
    with pytest.raises(UserError, match="name one as"):
        read_image(container)
    assert _files_in(tmp_path) == [f"data.{ext}"]


def test_npz_key_and_single_array(tmp_path, nuclei):
    image, labels = nuclei
    write_volume(f"{tmp_path}/arrays.npz:image", image)
    write_volume(f"{tmp_path}/arrays.npz:labels", labels)
    np.testing.assert_array_equal(read_labels(f"{tmp_path}/arrays.npz:labels")[0], labels)
    with pytest.raises(UserError, match=r"arrays.npz:raw: no array 'raw' \(arrays: image, labels\)"):
        read_image(f"{tmp_path}/arrays.npz:raw")
    write_volume(tmp_path / "single.npz", image)
    np.testing.assert_array_equal(read_image(str(tmp_path / "single.npz"))[0][0], image)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_failed_writer_leaves_nothing_and_keeps_existing_output(tmp_path, nuclei, ext):
    image, _ = nuclei
    out = tmp_path / f"out.{ext}"
    with pytest.raises(RuntimeError), volume_writer(str(out), image.shape, image.dtype) as writer:
        writer.write((slice(0, 10), slice(None), slice(None)), image[:10])
        raise RuntimeError("interrupted")
    assert _files_in(tmp_path) == []
    write_volume(out, image)
    with pytest.raises(RuntimeError), volume_writer(str(out), image.shape, image.dtype) as writer:
        writer.write((slice(None),) * 3, np.zeros_like(image))
        raise RuntimeError("interrupted")
    assert _files_in(tmp_path) == [out.name]
    np.testing.assert_array_equal(read_image(str(out))[0][0], image)


def test_block_that_does_not_fit_its_region(tmp_path, nuclei):
    image, _ = nuclei
    with pytest.raises(ValueError, match="does not fit region"), volume_writer(str(tmp_path / "o.h5"), image.shape, image.dtype) as w:
        w.write((slice(0, 5), slice(None), slice(None)), image[:4])
    assert _files_in(tmp_path) == []


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match=r"^.*absent.tif: file not found$"):
        read_image(str(tmp_path / "absent.tif"))
    with pytest.raises(UserError, match=r"scan.xyz: unknown file extension '.xyz' \(supported: .tif .tiff .nii"):
        read_image(str(tmp_path / "scan.xyz"))
    with pytest.raises(UserError, match="unknown file extension"):
        write_volume(tmp_path / "out.png", np.zeros((2, 2, 2)))


def test_missing_hdf5_and_zarr_datasets(tmp_path, nuclei):
    path = shared_volume("ovule", "ovule.h5")
    with pytest.raises(UserError, match=r"ovule.h5:/nope: no dataset '/nope' \(datasets: /instances, /labels, /raw\)"):
        read_image(f"{path}:/nope")
    with pytest.raises(UserError, match=r"ovule.h5: holds 3 datasets, name one as .*ovule.h5:/NAME"):
        read_image(str(path))
    write_volume(f"{tmp_path}/data.zarr:/raw", nuclei[0])
    with pytest.raises(UserError, match=r"data.zarr:/labels: no dataset '/labels' \(datasets: /raw/0\)"):
        read_labels(f"{tmp_path}/data.zarr:/labels")


@pytest.mark.parametrize("name", ["image.tif", "image.nii.gz", "image.nii", "image.h5", "image.npy", "image.npz", "bundled.tif"])
def test_truncated_files(tmp_path, nuclei, name):
    if name == "bundled.tif":  # compressed pages, tifffile's own shape metadata
        shutil.copyfile(EXAMPLE / "image.tif", tmp_path / name)
    else:
        write_volume(tmp_path / name, nuclei[0])
    size = os.path.getsize(tmp_path / name)
    with open(tmp_path / name, "r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(UserError, match=rf"{name}: (cannot read|truncated)"):
        read_image(str(tmp_path / name))


def test_text_file_with_a_volume_extension(tmp_path):
    (tmp_path / "notes.h5").write_text("not a volume")
    with pytest.raises(UserError, match=r"notes.h5: cannot read HDF5 file \("):
        read_image(str(tmp_path / "notes.h5"))


def test_wrong_number_of_dimensions(tmp_path, nuclei):
    np.save(tmp_path / "slice.npy", nuclei[0][0])
    with pytest.raises(UserError, match=r"slice.npy: expected a 3-D volume \(Z, Y, X\).*got shape \(61, 57\)"):
        read_image(str(tmp_path / "slice.npy"))
    np.save(tmp_path / "stack.npy", np.stack([nuclei[1]] * 2))
    with pytest.raises(UserError, match=r"stack.npy: expected a 3-D volume \(Z, Y, X\), got shape \(2, 31, 61, 57\)"):
        read_labels(str(tmp_path / "stack.npy"))


def test_singleton_axes_are_dropped(tmp_path, nuclei):
    _, labels = nuclei
    np.save(tmp_path / "labels.npy", labels[None, ..., None])
    np.testing.assert_array_equal(read_labels(str(tmp_path / "labels.npy"))[0], labels)


def test_nan_image_is_rejected(tmp_path, nuclei):
    image = nuclei[0].astype(np.float32)
    image[5, 6, 7] = np.nan
    write_volume(tmp_path / "image.tif", image)
    with pytest.raises(UserError, match=r"image.tif: image contains NaN or infinite values"):
        read_image(str(tmp_path / "image.tif"))
    with open_volume(str(tmp_path / "image.tif")) as volume:  # tiles away from the NaN read fine
        assert volume.read((slice(0, 5), slice(None), slice(None))).dtype == np.float32


def test_label_values_must_be_integers(tmp_path, nuclei):
    labels = nuclei[1].astype(np.float32)
    write_volume(tmp_path / "ok.nii.gz", labels - 1)  # negative values are the caller's decision
    read, _ = read_labels(str(tmp_path / "ok.nii.gz"))
    assert read.dtype == np.int64 and read.min() == -1
    labels[3, 4, 5] = 0.5
    write_volume(tmp_path / "half.npy", labels)
    with pytest.raises(UserError, match=r"half.npy: label values must be integers \(found 0.5\)"):
        read_labels(str(tmp_path / "half.npy"))
    labels[3, 4, 5] = np.nan
    write_volume(tmp_path / "nan.npy", labels)
    with pytest.raises(UserError, match=r"nan.npy: label values must be integers \(found nan\)"):
        read_labels(str(tmp_path / "nan.npy"))


def test_spec_parsing():
    assert parse_spec("/a:b/ovule.h5:/raw/x").key == "raw/x"
    assert parse_spec("/a:b/ovule.h5:/raw/x").path == "/a:b/ovule.h5"
    assert parse_spec("image.ome.zarr").format == "zarr" and parse_spec("image.ome.zarr").key is None
    assert parse_spec("scan.NII.GZ").format == "nifti"
    assert parse_spec("backup.zarr.old/pred.npz:probabilities").key == "probabilities"


def test_em_labels_tile_from_a_read_only_compressed_tiff():
    path = shared_volume("em_vnc", "labels.tif")
    full = tifffile.imread(path)
    with open_volume(str(path), kind="labels") as volume:
        assert volume.shape == (20, 1024, 1024)
        tile = volume.read((slice(0, 2), slice(512, 576), slice(0, 64)))
    np.testing.assert_array_equal(tile, full[:2, 512:576, :64])
