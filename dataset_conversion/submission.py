"""Turn nnU-Net predictions back into the original case names, label values and geometry (leaderboard files).

All writers read the conversion record (``nnunet_sam_conversion.json``) that our converters put into the
nnU-Net raw dataset folder, and for every case:

- check that the prediction has the size of the case's image in the raw dataset (``imagesTs`` or ``imagesTr``)
  and its spacing, origin and direction within the tolerance;
- map nnU-Net label values back to the original values (e.g. Synapse liver 5 -> BTCV 6);
- write ``<submission name>`` with the image's exact spacing, origin and direction (copied, not resampled).

Output is written to a temporary folder next to ``--output`` and moved into place when complete; ``--zip``
also writes ``<output>.zip`` holding the folder.

Sub-commands:

- ``from-nnunet``: every prediction found must be a case of the record; names from the record
  (``--subset train|val|test`` additionally requires every case of that subset exactly once);
- ``amos``: the AMOS22 leaderboard: ``amos_XXXX.nii.gz`` with AMOS label ids 0-15, every case of the
  official test set (``--subset val`` for the validation phase) exactly once;
- ``acdc``: the ACDC challenge: ``patientXXX_ED.nii.gz`` / ``patientXXX_ES.nii.gz``, labels 0 background,
  1 RV, 2 MYO, 3 LV, both frames of every patient of the converted test set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_sam.cli import conventions
from nnunet_sam.dataset_conversion.common import (
    DEFAULT_TOLERANCE,
    NIFTI,
    ConversionError,
    check_geometry,
    read_record,
    relabel,
)
from nnunet_sam.file_checks import DamagedFileError, honour_umask, read_label_values
from nnunet_sam.training.fault_tolerance import staged_file

COMMAND = "nnunet_sam_convert_submission"


def _reference_image(dataset_folder: Path, case: str) -> Path:
    for sub in ("imagesTs", "imagesTr"):
        path = dataset_folder / sub / f"{case}_0000{NIFTI}"
        if path.is_file():
            return path
    raise ConversionError(f"no image of case {case} in {dataset_folder}/imagesTs or imagesTr")


def write_submission(
    predictions: str | os.PathLike,
    dataset_folder: str | os.PathLike,
    output: str | os.PathLike,
    subset: str | None = None,
    make_zip: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    partial: bool = False,
) -> Path:
    """Map nnU-Net predictions (``<case>.nii.gz``) to the record's names, label values and image geometry.

    ``subset`` (``train``/``val``/``test``): the predictions must be exactly that subset of the record. Without it,
    every subset that holds a predicted case must be predicted completely. ``partial`` lifts both completeness
    requirements (cases outside ``subset`` are still refused). Returns the output folder.
    """
    predictions, dataset_folder, output = Path(predictions), Path(dataset_folder), Path(output)
    record = read_record(dataset_folder)
    if not predictions.is_dir():
        raise ConversionError(f"missing folder: predictions not found at {predictions}")
    found = sorted(f.name[: -len(NIFTI)] for f in predictions.glob(f"*{NIFTI}"))
    unknown = sorted(set(found) - set(record["cases"]))
    if unknown:
        raise ConversionError(f"predictions of cases not in the conversion record: {unknown}")
    if subset is not None:
        expected = record["splits"].get(subset)
        if not expected:
            raise ConversionError(f"the conversion record has no cases in subset {subset!r}")
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if extra or (missing and not partial):
            raise ConversionError(f"submission incomplete: missing cases {missing}, cases outside {subset}: {extra}")
    elif not partial:
        touched = [name for name, cases in record["splits"].items() if set(cases) & set(found)]
        missing = sorted({c for name in touched for c in record["splits"][name]} - set(found))
        if missing:
            raise ConversionError(
                f"submission incomplete: {len(missing)} case(s) of the subset(s) {', '.join(touched)} have no "
                f"prediction in {predictions}: {missing}. Predict them, or give --partial to write only these"
            )
    if not found:
        raise ConversionError(f"no predictions (*{NIFTI}) in {predictions}")
    names = [record["cases"][c]["submission_name"] for c in found]
    for case, name in zip(found, names):
        if not plain_file_name(name):
            raise ConversionError(
                f"the conversion record names case {case}'s submission file {name!r}, which is not a plain file "
                f"name (it would be written outside {output}); fix submission_name in {dataset_folder}"
            )
    if len(set(names)) != len(names):
        raise ConversionError("two predictions map to the same submission file name")
    if output.exists():
        raise ConversionError(f"output {output} exists already; choose a new folder")
    archive = output.with_name(output.name + ".zip")
    if make_zip and (archive.exists() or archive.is_symlink()):
        raise ConversionError(f"{archive} exists already; choose a new output name (--zip would overwrite it)")
    label_map = {int(k): v for k, v in record["labels_nnunet_to_original"].items()}

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise ConversionError(f"cannot write the submission into {output.parent}: {error.strerror or error}") from None
    try:
        for case, name in zip(found, names):
            reference = sitk.ReadImage(str(_reference_image(dataset_folder, case)))
            path = predictions / f"{case}{NIFTI}"
            try:
                read_label_values(path)  # complete file, integer values (ITK would read NaN as 0)
            except DamagedFileError as error:
                raise ConversionError(f"prediction of case {case}: {error}") from None
            prediction = sitk.ReadImage(str(path))
            check_geometry(reference, prediction, case, tolerance)
            values = np.unique(sitk.GetArrayViewFromImage(prediction))
            unexpected = sorted(set(int(v) for v in values.tolist()) - set(label_map))
            if unexpected:
                raise ConversionError(f"prediction of case {case} has label values {unexpected} not in the dataset")
            out = relabel(prediction, label_map)
            out.CopyInformation(reference)
            sitk.WriteImage(out, str(staging / name), True)
            if not np.array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(staging / name))), sitk.GetArrayFromImage(out)
            ):
                raise ConversionError(f"{name} could not be written completely to {staging}; is the disk full?")
        honour_umask(staging)
        os.rename(staging, output)
    except (OSError, RuntimeError) as error:  # RuntimeError: ITK's writer on a full disk
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, ConversionError):
            raise
        raise ConversionError(
            f"writing the submission into {output.parent} failed ({type(error).__name__}: {str(error).strip()[:300]}"
            "); is the disk full or read-only? Nothing was written"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if make_zip:
        try:
            with staged_file(archive) as temporary:  # complete or absent; never replaces a file made meanwhile
                shutil.make_archive(temporary[: -len(".zip")], "zip", root_dir=output.parent, base_dir=output.name)
                if archive.exists():
                    raise ConversionError(f"{archive} appeared while it was written; it was left alone")
        except OSError as error:
            raise ConversionError(
                f"the folder {output} was written, but not {archive} ({error.strerror or error}); is the disk full?"
            ) from None
    return output


def plain_file_name(name: object) -> bool:
    """Whether ``name`` (read from a file) names a file directly inside a folder: no separator, not ``.``/``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and os.path.basename(name) == name
    )


def _check_protocol(dataset_folder: Path, prefix: str, command: str) -> None:
    protocol = read_record(dataset_folder)["protocol"]
    if not protocol.startswith(prefix):
        raise ConversionError(f"{command} needs a dataset converted by its converter; this one is {protocol!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write nnU-Net predictions back with the original case names, label values and geometry, "
        "using the conversion record of our converters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "from-nnunet": "generic: names and label values from the conversion record",
        "amos": "AMOS22 leaderboard: amos_XXXX.nii.gz, labels 0-15, every test case exactly once",
        "acdc": "ACDC challenge: patientXXX_ED/ES.nii.gz, labels 0-3, both frames of every test patient",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-p", "--predictions", required=True, help="folder with nnU-Net predictions <case>.nii.gz")
        p.add_argument("-r", "--raw-dataset", required=True, help="the converted dataset folder in nnUNet_raw")
        p.add_argument("-o", "--output", required=True, help="new output folder")
        p.add_argument("--zip", action="store_true", help="also write <output>.zip")
        p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="geometry tolerance")
        p.add_argument(
            "--partial",
            action="store_true",
            help="write the predictions found even if cases of their subset are missing",
        )
        if name != "acdc":
            choices = ("train", "val", "test")
            default = "test" if name == "amos" else None
            p.add_argument("--subset", choices=choices, default=default, help="require exactly this subset")
    args = parser.parse_args(argv)
    try:
        if args.command == "amos":
            _check_protocol(Path(args.raw_dataset), "amos22", "amos")
        if args.command == "acdc":
            _check_protocol(Path(args.raw_dataset), "acdc", "acdc")
        subset = "test" if args.command == "acdc" else args.subset
        out = write_submission(
            args.predictions, args.raw_dataset, args.output, subset, args.zip, args.tolerance, args.partial
        )
    except ConversionError as e:
        return conventions.error(COMMAND, e)
    print(f"wrote {len(list(out.iterdir()))} files to {out}" + (f" and {out}.zip" if args.zip else ""))
    return conventions.DONE


if __name__ == "__main__":
    sys.exit(main())
