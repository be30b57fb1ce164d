"""Reading SUV images, writing labels on their grid, and the volume cache."""

from __future__ import annotations

import os

import nibabel as nib
import nrrd
import numpy as np
import pytest

from segany_pet.errors import InvalidImageError, PromptError
from segany_pet.label.infer import parse_roi
from segany_pet.pet import VolumeCache, load_nifti, mask_nrrd, mask_nrrd_box, nrrd_from_label_box, save_mask

OBLIQUE = np.array([[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, -20.0], [0.0, 0.0, 4.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def write(path, array, affine=OBLIQUE):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_load_keeps_array_order_affine_and_spacing(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) / 10
    volume = load_nifti(write(tmp_path / "a.nii.gz", array))
    np.testing.assert_array_equal(volume.suv, array)
    np.testing.assert_allclose(volume.affine, OBLIQUE)
    assert volume.spacing == pytest.approx((3.0, 2.0, 4.0))
    assert volume.voxel_volume_ml == pytest.approx(0.024)
    np.testing.assert_allclose(volume.index_to_world([1, 1, 1]), [8.0, -17.0, 9.0])


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.ones((4, 4, 4, 2), np.float32), "3D"),
        (np.ones((4, 4), np.float32), "3D"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 4), 25000.0, np.float32), "Bq/mL"),
        (np.zeros((4, 4, 4), np.float32), "no positive uptake"),
    ],
)
def test_load_refuses_what_is_not_a_3d_suv_image(tmp_path, array, words):
    with pytest.raises(InvalidImageError, match=words) as error:
        load_nifti(write(tmp_path / "bad.nii.gz", array))
    assert "bad.nii.gz" in str(error.value)


def test_load_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InvalidImageError, match="cannot be read"):
        load_nifti(path)


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("order", ["C", "F"])  # the predictor pastes into Fortran order; other callers use C
@pytest.mark.parametrize("compress", [False, True])
def test_saved_mask_is_voxel_aligned_with_the_image(tmp_path, extension, order, compress):
    mask = np.zeros((4, 5, 6), np.uint8, order=order)
    mask[1, 2, 3] = 1
    mask[3, 0, 5] = 2
    path = tmp_path / f"mask{extension}"
    save_mask(mask, OBLIQUE, path, compress=compress)
    if extension == ".nrrd":
        data, header = nrrd.read(str(path), index_order="F")
        np.testing.assert_allclose(np.array(header["space directions"]).T, OBLIQUE[:3, :3])
        np.testing.assert_allclose(header["space origin"], OBLIQUE[:3, 3])
        assert header["encoding"] == ("gzip" if compress else "raw")
    else:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        np.testing.assert_allclose(image.affine, OBLIQUE)
    np.testing.assert_array_equal(data, mask)


@pytest.mark.parametrize("compress", [False, True])
def test_nrrd_with_a_nonzero_box_sends_the_empty_stretches_as_shared_zeros(compress):
    mask = np.zeros((300, 200, 40), np.uint8, order="F")  # 1.2 MB of zeros before the box: two shared blocks
    mask[10:20, 150:160, 20:23] = 1
    mask[299, 5, 21] = 1  # the box's first and last rows, not only its slices
    mask[0, 199, 20] = 1
    box = (slice(0, 300), slice(5, 200), slice(20, 23))
    whole = b"".join(mask_nrrd(mask, OBLIQUE, compress))
    parts = mask_nrrd(mask, OBLIQUE, compress, nonzero_box=box)
    assert b"".join(parts) == whole
    if not compress:
        assert len(parts) > 4  # header, zero blocks, the box's span, zero blocks
        assert sum(memoryview(part).nbytes for part in parts[1:]) == mask.size


def test_a_label_sent_as_its_box_rebuilds_the_whole_file():
    mask = np.zeros((30, 20, 10), np.uint8, order="F")
    mask[3:7, 5:9, 2:4] = 1
    mask[29, 19, 9] = 2  # the box reaches the grid's last voxel
    box = (slice(3, 30), slice(5, 20), slice(2, 10))
    parts, where = mask_nrrd_box(mask, OBLIQUE, box)
    assert where == "3 5 2 27 15 8"
    body = b"".join(parts)
    assert len(body) == len(parts[0]) + 27 * 15 * 8  # the whole file's header, the box's voxels
    assert nrrd_from_label_box(body, where) == b"".join(mask_nrrd(mask, OBLIQUE))

    empty = np.zeros_like(mask)
    parts, where = mask_nrrd_box(empty, OBLIQUE, None)
    assert where == "0 0 0 0 0 0"
    assert nrrd_from_label_box(b"".join(parts), where) == b"".join(mask_nrrd(empty, OBLIQUE))
    with pytest.raises(ValueError, match="its box"):
        nrrd_from_label_box(body, "3 5 2 27 15 7")


def test_cache_reads_once_and_rereads_a_replaced_file(tmp_path):
    path = write(tmp_path / "scan.nii.gz", np.ones((4, 4, 4), np.float32))
    cache = VolumeCache(capacity=1)
    first = cache.load(path)
    assert cache.load(path) is first
    write(path, np.full((4, 4, 4), 2.0, np.float32))
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    assert cache.load(path).suv.max() == 2.0


def test_roi_becomes_inclusive_slices_clipped_to_the_volume():
    assert parse_roi([2, 5, 0, 9, -3, 100], (10, 10, 10)) == (slice(2, 6), slice(0, 10), slice(0, 10))
    with pytest.raises(PromptError, match="start 5 is after end 2"):
        parse_roi([5, 2, 0, 1, 0, 1], (10, 10, 10))
    with pytest.raises(PromptError, match="outside the volume"):
        parse_roi([20, 30, 0, 1, 0, 1], (10, 10, 10))
    with pytest.raises(PromptError, match="6 voxel indices"):
        parse_roi([1, 2, 3], (10, 10, 10))
