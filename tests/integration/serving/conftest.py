"""Fixtures of the server tests: the tiny model folders (built once per run) and one phantom case."""

from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from serving_testing import make_model_folders


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """(raw dataset folder, RadSAM model folder, prompted 3DSAM-adapter model folder)."""
    return make_model_folders(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def case(folders):
    """(image file, image (1, Z, Y, X), spacing, a point (z, y, x) inside organ 1 on its middle slice)."""
    raw = folders[0]
    image_file = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    image, properties = SimpleITKIO().read_images([str(image_file)])
    label = SimpleITKIO().read_seg(str(raw / "labelsTs" / image_file.name.replace("_0000", "")))[0][0]
    zs = np.flatnonzero((label == 1).any((1, 2)))
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(label[z] == 1)
    return image_file, image, list(properties["spacing"]), (z, int(np.median(ys)), int(np.median(xs)))


@pytest.fixture(scope="session")
def radsam_model(folders):
    pytest.importorskip("fastapi")
    from nnunet_sam.serving.editors import load_model

    return load_model(str(folders[1]))
