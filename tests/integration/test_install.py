"""Installation and zero-configuration trainer discovery.

These tests run against the INSTALLED package (``pip install ".[test]"`` or ``pip install -e .``). Every check
that depends on interpreter start-up runs in a fresh subprocess, from a neutral working directory, with
``nnUNet_extTrainer`` and ``PYTHONPATH`` removed from its environment.
"""

import multiprocessing
import os
import re
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from install_testing import PTH_NAME, RESULT, TRAINER_MODULE, _check_found, _clean_env, _find_code, _run
from sam_testing import REPO


def test_trainers_found_without_user_configuration(tmp_path):
    result = _run(_find_code(), cwd=tmp_path, env=_clean_env())
    _check_found(result)
    assert result["env"] == result["shim_dir"]
    shim = Path(result["shim_dir"])
    assert sorted(p.name for p in shim.iterdir() if p.suffix == ".py") == ["nnunet_sam_trainers.py"]
    assert not (shim / "__init__.py").exists()


# (b) ------------------------------------------------------------------------------------------------------
def test_user_ext_trainer_folder_is_kept_first(tmp_path):
    user_dir = tmp_path / "user_trainers"
    user_dir.mkdir()
    (user_dir / "my_trainers.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n\n"
        "class MyTrainer(nnUNetTrainer):\n    pass\n"
    )
    child = "import os; print(os.environ['nnUNet_extTrainer'])"
    extra = f"result['child_env'] = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, "
    extra += "text=True, check=True).stdout.strip()"
    code = _find_code(["MyTrainer", "MaskSAMTrainer"], extra)
    result = _run(code, cwd=tmp_path, env=_clean_env(nnUNet_extTrainer=str(user_dir)))
    assert result["found"]["MyTrainer"] == ["my_trainers", "MyTrainer"]
    _check_found(result, names=["MaskSAMTrainer"])
    assert result["env"] == str(user_dir) + os.pathsep + result["shim_dir"]
    assert result["env"].startswith(str(user_dir) + os.pathsep)
    # a child interpreter inherits the variable and does not append the shim a second time
    assert result["child_env"] == result["env"]


# (c) ------------------------------------------------------------------------------------------------------
def test_found_trainer_pickles_into_spawn_and_fork_workers(tmp_path):
    code = f"""
    import json, multiprocessing
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    if __name__ == "__main__":
        cls = recursive_find_trainer_class_by_name("MaskSAMTrainer")
        out = {{}}
        for method in ("spawn", "fork"):
            if method in multiprocessing.get_all_start_methods():
                with multiprocessing.get_context(method).Pool(1) as pool:
                    # the class travels to the worker pickled by reference and is re-imported there
                    out[method] = pool.apply(getattr, (cls, "__module__")) + "." + pool.apply(
                        getattr, (cls, "__qualname__")
                    )
        print({RESULT!r} + json.dumps(out))
    """
    result = _run(code, cwd=tmp_path, env=_clean_env())
    expected = f"{TRAINER_MODULE}.MaskSAMTrainer"
    assert result.get("spawn") == expected
    if "fork" in multiprocessing.get_all_start_methods():
        assert result.get("fork") == expected


# (d) ------------------------------------------------------------------------------------------------------
def _dependency_overlay(target: Path, exclude_build_tools: bool) -> Path:
    """A PYTHONPATH folder with links to this environment's installed packages, minus nnunet_sam itself."""
    target.mkdir()
    sources = [p for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")]
    build_tools = ("setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth", "wheel")
    for source in sources:
        for entry in Path(source).iterdir():
            name = entry.name.lower()
            if "nnunet_sam" in name or "nnunet-sam" in name or name.endswith(".pth") or name == "__pycache__":
                continue
            if exclude_build_tools and name.startswith(build_tools):
                continue
            link = target / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return target


def _can_build_editable_here() -> bool:
    """setuptools >= 70.1 ships bdist_wheel and a vendored ``wheel``; older ones need the wheel package."""
    code = (
        "import setuptools, importlib.util as u\n"
        "v = tuple(int(x) for x in setuptools.__version__.split('.')[:2])\n"
        "assert v >= (70, 1) or (v >= (64, 0) and u.find_spec('wheel') is not None)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=_clean_env()).returncode == 0


def test_editable_install_in_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    own_build_tools = not _can_build_editable_here()
    overlay = _dependency_overlay(tmp_path / "deps", exclude_build_tools=own_build_tools)
    env = _clean_env(PYTHONPATH=str(overlay), PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [python, "-m", "pip", "--no-input"]
    if own_build_tools:
        subprocess.run([*pip, "install", "-q", "setuptools>=70.1", "wheel"], env=env, cwd=tmp_path, check=True)
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO)],
        env=env,
        cwd=tmp_path,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    extra = "import nnunet_sam.trainers.masksam as m, site\n"
    extra += "result.update(file=m.__file__, site=site.getsitepackages())"
    code = _find_code(extra=extra)
    result = _run(code, cwd=tmp_path, env=env, python=python)
    _check_found(result)
    assert result["env"] == result["shim_dir"]
    assert Path(result["shim_dir"]) == REPO / "nnunet_sam" / "trainer_shim"
    assert Path(result["file"]).resolve() == (REPO / "trainers" / "masksam.py").resolve()
    assert any((Path(s) / PTH_NAME).is_file() for s in result["site"])


# (e) ------------------------------------------------------------------------------------------------------
def test_no_generic_top_level_packages(tmp_path):
    code = f"""
    import importlib.util, json
    names = ["trainers", "network_architectures", "dataset_conversion", "nnunet_sam_trainers"]
    top = {{n: importlib.util.find_spec(n) is not None for n in names}}
    sub = {{n: importlib.util.find_spec("nnunet_sam." + n) is not None for n in names[:3]}}
    print({RESULT!r} + json.dumps({{"top": top, "sub": sub}}))
    """
    result = _run(code, cwd=tmp_path, env=_clean_env())
    assert not any(result["top"].values()), result
    assert result["sub"]["trainers"] and result["sub"]["network_architectures"], result
    purelib = Path(sysconfig.get_paths()["purelib"])
    for name in ("trainers", "network_architectures", "dataset_conversion"):
        assert not (purelib / name).exists() and not (purelib / f"{name}.py").exists()


# (f) ------------------------------------------------------------------------------------------------------
def test_startup_hook_is_light(tmp_path):
    code = f"""
    import json, os, sys
    heavy = ["torch", "numpy", "nnunetv2", "segment_anything", "nnunet_sam.trainers"]
    ours = sorted(m for m in sys.modules if m.split(".")[0] == "nnunet_sam")
    print({RESULT!r} + json.dumps({{"heavy": [m for m in heavy if m in sys.modules], "ours": ours,
                                    "env": os.environ.get("nnUNet_extTrainer")}}))
    """
    result = _run(code, cwd=tmp_path, env=_clean_env())
    assert result["heavy"] == []
    assert result["ours"] == ["nnunet_sam", "nnunet_sam._register"]
    assert result["env"]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules)"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "False" and proc.stderr == ""


def test_startup_hook_import_time(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    rows = re.findall(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S.*)", proc.stderr)
    ours = {name.strip(): int(cumulative) for _, cumulative, name in rows if name.strip().startswith("nnunet_sam")}
    assert set(ours) == {"nnunet_sam", "nnunet_sam._register"}, proc.stderr
    # two tiny modules; far below anything measurable at interpreter start (generous bound for slow CI)
    assert sum(ours.values()) < 50_000, ours


def test_pth_is_installed_and_recorded():
    from importlib.metadata import distribution

    dist = distribution("nnunet-sam")
    recorded = {str(f) for f in dist.files or []}
    assert PTH_NAME in recorded
    assert any((Path(p) / PTH_NAME).is_file() for p in site.getsitepackages())
    pth = Path(dist.locate_file(PTH_NAME)).read_text()  # site-packages root, next to the dist-info
    assert pth.startswith("import ") and "nnunet_sam._register" in pth and "except Exception" in pth


def test_register_keeps_user_entries_and_never_raises(monkeypatch):
    import nnunet_sam._register as reg

    env = {"nnUNet_extTrainer": "/a" + os.pathsep + "/b"}
    assert reg.register(env) is True
    assert env["nnUNet_extTrainer"] == "/a" + os.pathsep + "/b" + os.pathsep + reg.SHIM_DIR
    assert reg.register(env) is False  # no duplicate
    assert env["nnUNet_extTrainer"].count(reg.SHIM_DIR) == 1
    env = {}
    assert reg.register(env) is True and env["nnUNet_extTrainer"] == reg.SHIM_DIR
    env = {"nnUNet_extTrainer": "/a", "NNUNET_SAM_NO_REGISTER": "1"}
    assert reg.register(env) is False and env["nnUNet_extTrainer"] == "/a"
    assert reg.register(object()) is False  # broken mapping: swallowed, never raises


def test_shim_exports_every_trainer_of_the_package():
    import importlib
    import importlib.util
    import inspect
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_sam._register as reg
    import nnunet_sam.trainers as package

    spec = importlib.util.spec_from_file_location("shim_under_test", Path(reg.SHIM_DIR) / "nnunet_sam_trainers.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    defined = {
        name
        for info in pkgutil.iter_modules(package.__path__)
        for name, obj in vars(importlib.import_module(f"{package.__name__}.{info.name}")).items()
        if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__.startswith(package.__name__)
    }
    defined -= {"SAMTrainer"}  # the abstract base is not a trainer to run
    assert defined <= set(shim.__all__), f"not exported by the shim: {sorted(defined - set(shim.__all__))}"


def test_installed_package_ships_the_slurm_script(tmp_path):
    """The SLURM recipe travels in the wheel (package data), and its path is one command away."""
    out = subprocess.run(
        [sys.executable, "-m", "nnunet_sam.training.slurm"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    script = Path(out)
    assert script.is_file(), f"{script} is not in the installed package (setup.py package_data)"
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes" in text and "torchrun" in text
