"""The package's floors: every import runs downwards (or within its floor, without a cycle).

The sources are parsed (``ast``), not imported, so this takes well under a second. Every import counts, also one
inside a function: a lazy import that runs against the floors is a cycle all the same. A new subpackage or top-level
module needs a floor in ``LAYERS`` before it passes.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Where each part of the package lives: nnunet_sam/ plus the repository folders setup.py installs into it.
SOURCES = {
    "nnunet_sam": REPO / "nnunet_sam",
    "nnunet_sam.trainers": REPO / "trainers",
    "nnunet_sam.network_architectures": REPO / "network_architectures",
    "nnunet_sam.dataset_conversion": REPO / "dataset_conversion",
}
# Lowest floor first. A part may import its own floor's parts and the floors below, never a floor above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: the package marker, the start-up hook, exit codes and error lines, file and checkpoint checks,
    # box and mask geometry
    ("nnunet_sam", "_register", "exit_codes", "file_checks", "safe_checkpoints", "mask_geometry"),
    ("backbones",),  # SAM's image encoders, their attention and checkpoints
    ("blocks",),  # the network pieces around a backbone
    ("model_record", "prompting"),  # what is saved with a model; prompts from masks and points
    ("losses",),
    ("network_architectures",),  # one network per method, composed of blocks, prompts and losses
    ("training",),  # planning, memory estimate, checkpoints, distributed runs: what every trainer uses
    ("trainers",),  # the methods' choices on top of nnU-Net's trainer hooks
    ("inference",),
    ("evaluation",),
    ("benchmarking", "demo", "serving"),
    ("cli", "dataset_conversion", "trainer_shim"),  # command faces (the converters are commands) and nnU-Net's lookup
)
FLOOR = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _part(module: str) -> str | None:
    """The part of the package a module belongs to (``nnunet_sam.blocks.stem`` -> ``blocks``); None outside."""
    names = module.split(".")
    if names[0] != "nnunet_sam":
        return None
    return names[1] if len(names) > 1 else "nnunet_sam"


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != "nnunet_sam":
        return [base]
    # ``from nnunet_sam import exit_codes`` imports a submodule; ``from nnunet_sam import __version__`` does not
    root = SOURCES["nnunet_sam"]
    return [
        f"{base}.{alias.name}" if (root / alias.name).is_dir() or (root / f"{alias.name}.py").is_file() else base
        for alias in node.names
    ]


@functools.cache
def package_imports() -> list[tuple[str, str, str]]:
    """``(importing part, imported part, "file:line")`` for every import between two parts of the package."""
    found = []
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            module = _module_name(package, root, path)
            source = _part(module)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                for target in _imported(node, module, path.name == "__init__.py"):
                    imported = _part(target)
                    if imported is not None and imported != source:
                        found.append((source, imported, f"{path.relative_to(REPO)}:{node.lineno}"))
    return found


def test_every_part_has_a_floor():
    parts = {part for pair in package_imports() for part in pair[:2]}
    parts |= {_part(_module_name("nnunet_sam", SOURCES["nnunet_sam"], p)) for p in SOURCES["nnunet_sam"].glob("*.py")}
    parts |= {d.name for d in SOURCES["nnunet_sam"].iterdir() if d.is_dir() and any(d.glob("*.py"))}
    assert parts - set(FLOOR) == set(), "give these parts of the package a floor in LAYERS"


def test_no_import_runs_upwards():
    upwards = [
        f"{where}: {source} (floor {FLOOR[source]}) imports {imported} (floor {FLOOR[imported]})"
        for source, imported, where in package_imports()
        if FLOOR[imported] > FLOOR[source]
    ]
    assert upwards == [], "imports against the floors (move what both need below them):\n" + "\n".join(upwards)


def test_no_cycle_within_a_floor():
    edges = {(source, imported) for source, imported, _ in package_imports() if FLOOR[source] == FLOOR[imported]}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert cycles == [], f"parts of one floor that import each other: {cycles}"


def test_the_known_back_imports_are_caught():
    """The check itself: the imports that once ran against the floors would be found."""
    assert FLOOR["cli"] > FLOOR["training"]  # training/distributed.py once imported cli/conventions
    assert FLOOR["losses"] > FLOOR["prompting"]  # prompting/from_masks.py once imported losses/mask_classification
    assert FLOOR["blocks"] > FLOOR["backbones"]  # backbones/sam_vit.py once imported blocks/attention
    assert FLOOR["benchmarking"] > FLOOR["trainers"]  # trainers/base.py once imported benchmarking/memory
    assert _imported(ast.parse("from nnunet_sam import exit_codes").body[0], "nnunet_sam.training.x", False) == [
        "nnunet_sam.exit_codes"
    ]
    relative = ast.parse("from ..cli import conventions").body[0]
    assert _part(_imported(relative, "nnunet_sam.training.distributed", False)[0]) == "cli"
