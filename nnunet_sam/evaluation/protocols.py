"""The papers' evaluation protocols as data: each protocol's label ids (with the dataset.json names accepted for
them) and the published rows of its tables (figures in %, each with its source), which ``nnunet_sam_evaluate
--published`` prints under the rows it measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRow:
    """One published table row: ``values`` maps the protocol's label ids to the reported figure (%)."""

    method: str
    metric: str  # "Dice" or "NSD"
    values: Mapping[int, float]
    mean: float | None  # the mean as published (None if the paper gives none)
    source: str


@dataclass(frozen=True)
class Protocol:
    """A paper protocol: its label ids (with accepted dataset.json names, first = display name) and rows."""

    title: str
    labels: Mapping[int, tuple[str, ...]]
    rows: tuple[PublishedRow, ...]


def _row(method: str, metric: str, ids: Sequence[int], values: Sequence[float], mean: float | None, source: str):
    assert len(ids) == len(values), f"{method}: {len(values)} values for {len(ids)} columns"
    return PublishedRow(method, metric, dict(zip(ids, values)), mean, source)


# Synapse (TransUNet 8-organ ids, DESIGN.md section 7); column order of the papers' tables:
# aorta, gallbladder, kidney (L), kidney (R), liver, pancreas, spleen, stomach
_SYNAPSE_COLUMNS = (7, 4, 3, 2, 5, 8, 1, 6)
_MASKSAM_T2 = "MaskSAM paper, Table 2 (Synapse, DSC %)"
_SPS_T1 = "Self-Prompt-SAM paper, Table 1 (Synapse, DSC %)"
# ACDC (nnU-Net Dataset027 ids): RV, MYO, LV
_ACDC_COLUMNS = (1, 2, 3)
_MASKSAM_T3 = "MaskSAM paper, Table 3 (ACDC, DSC %)"
_SPS_T2 = "Self-Prompt-SAM paper, Table 2 (ACDC, DSC %)"
# AMOS22 ids 1..15 in label order; MaskSAM reports fractions (0.965), given here in %
_AMOS_COLUMNS = tuple(range(1, 16))
_MASKSAM_T1 = "MaskSAM paper, Table 1 (AMOS22 test leaderboard, Dice as fraction; shown in %)"
_MASKSAM_APPX = "MaskSAM paper, appendix table (MSD-Pancreas tumour, 3DSAM-adapter 70/10/20 split)"

PROTOCOLS: dict[str, Protocol] = {
    "synapse": Protocol(
        title="Synapse 8 organs (TransUNet 18/12 split)",
        labels={
            1: ("spleen",),
            2: ("right kidney", "kidney right", "kidney r", "r kidney"),
            3: ("left kidney", "kidney left", "kidney l", "l kidney"),
            4: ("gallbladder", "gall bladder"),
            5: ("liver",),
            6: ("stomach",),
            7: ("aorta",),
            8: ("pancreas",),
        },
        rows=(
            _row(
                "nnU-Net",
                "Dice",
                _SYNAPSE_COLUMNS,
                (92.39, 71.71, 86.07, 91.46, 95.84, 82.92, 90.31, 79.01),
                86.21,
                _MASKSAM_T2,
            ),
            _row(
                "MaskSAM",
                "Dice",
                _SYNAPSE_COLUMNS,
                (91.75, 72.20, 87.32, 88.15, 97.21, 79.62, 92.47, 89.11),
                87.23,
                _MASKSAM_T2,
            ),
            _row(
                "Self-Prompt-SAM",
                "Dice",
                _SYNAPSE_COLUMNS,
                (91.99, 69.95, 85.65, 85.40, 97.39, 79.18, 94.38, 89.94),
                86.74,
                _SPS_T1,
            ),
        ),
    ),
    "acdc": Protocol(
        title="ACDC (70/10/20 split)",
        labels={
            1: ("RV", "right ventricle"),
            2: ("MYO", "MLV", "myocardium"),
            3: ("LV", "LVC", "left ventricle"),
        },
        rows=(
            _row("nnU-Net", "Dice", _ACDC_COLUMNS, (90.24, 89.24, 95.36), 91.61, _MASKSAM_T3),
            _row("MaskSAM", "Dice", _ACDC_COLUMNS, (92.30, 91.37, 96.49), 93.39, _MASKSAM_T3),
            _row("Self-Prompt-SAM", "Dice", _ACDC_COLUMNS, (92.20, 91.22, 96.36), 93.26, _SPS_T2),
        ),
    ),
    "amos": Protocol(
        title="AMOS22 15 organs (test leaderboard)",
        labels={
            1: ("spleen",),
            2: ("right kidney", "kidney right"),
            3: ("left kidney", "kidney left"),
            4: ("gallbladder", "gall bladder"),
            5: ("esophagus",),
            6: ("liver",),
            7: ("stomach",),
            8: ("aorta", "arota"),  # AMOS' own dataset.json spells it "arota"
            9: ("IVC", "inferior vena cava", "postcava"),
            10: ("pancreas",),
            11: ("right adrenal gland", "RAG", "adrenal gland right"),
            12: ("left adrenal gland", "LAG", "adrenal gland left"),
            13: ("duodenum",),
            14: ("bladder",),
            15: ("prostate/uterus", "prostate uterus"),
        },
        rows=(
            _row(
                "nnU-Net",
                "Dice",
                _AMOS_COLUMNS,
                (96.5, 95.9, 95.1, 88.9, 82.0, 98.0, 89.0, 94.8, 90.1, 82.1, 78.5, 73.9, 80.6, 86.9, 83.9),
                87.8,
                _MASKSAM_T1,
            ),
            _row(
                "MaskSAM",
                "Dice",
                _AMOS_COLUMNS,
                (96.3, 97.3, 96.9, 87.2, 87.6, 98.2, 94.0, 96.2, 92.2, 88.8, 79.4, 81.3, 85.1, 92.0, 85.4),
                90.5,
                _MASKSAM_T1,
            ),
        ),
    ),
    "msd_pancreas": Protocol(
        title="MSD-Pancreas (70/10/20 random split); published figures are for the tumour only",
        labels={1: ("pancreas",), 2: ("cancer", "tumour", "tumor", "pancreas tumour", "pancreas tumor")},
        rows=(
            _row("nnU-Net", "Dice", (2,), (41.6,), None, _MASKSAM_APPX),
            _row("nnU-Net", "NSD", (2,), (62.5,), None, _MASKSAM_APPX),
            _row("3DSAM-adapter", "Dice", (2,), (30.2,), None, _MASKSAM_APPX),
            _row("3DSAM-adapter", "NSD", (2,), (45.4,), None, _MASKSAM_APPX),
            _row("MaskSAM", "Dice", (2,), (42.6,), None, _MASKSAM_APPX),
            _row("MaskSAM", "NSD", (2,), (68.6,), None, _MASKSAM_APPX),
        ),
    ),
}
