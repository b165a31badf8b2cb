"""The documentation stays true: links resolve, quoted commands and flags exist, quoted trainer names are found.

Reads README.md and docs/**/*.md with a CommonMark parser (markdown-it-py, GFM tables on) and checks

* every relative link: the file exists in the repository, and an ``#anchor`` into a markdown file names one of its
  headings (GitHub's slugs: lower case, punctuation dropped, spaces -> hyphens, ``-1``, ``-2`` for repeats);
* every ``nnunet_sam_*`` / ``nnUNetv2_*`` command quoted in a code span or code block is an installed console script,
  and every flag quoted after it (same span, or the same code line with its ``\\`` continuations) is one its
  ``--help`` lists (each command's ``--help`` runs once, in this process);
* every trainer name quoted in code (``\\w+Trainer\\w*``) is found by nnU-Net's lookup of ``nnUNetv2_train -tr NAME``
  (``recursive_find_python_class`` over the ``nnUNet_extTrainer`` folders, then nnU-Net's whole lookup).

A failure lists file, line and what is wrong: fix the doc.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import distribution
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

SCRIPTS = {
    e.name: e
    for dist in ("nnunet-sam", "nnunetv2")
    for e in distribution(dist).entry_points
    if e.group == "console_scripts"
}
# a command name, not a file (nnunet_sam_conversion.json), path part (./nnunet_sam_x) or placeholder (..._<dataset>)
COMMAND = re.compile(r"(?<![\w./$<-])(nnunet_sam_\w+|nnUNetv2_\w+)(?![\w.<-])")
FLAG = re.compile(r"-{1,2}[A-Za-z][\w-]*")
TRAINER = re.compile(r"(?<![\w.])\w+Trainer\w*(?![\w.(])")
# quoted names that match TRAINER but are no trainer to run
NOT_TRAINERS = {
    "nnUNet_extTrainer": "nnU-Net's environment variable",
    "SAMTrainer": "the abstract base of our trainers",
}
SEGMENT_END = re.compile(r"\s\|\s|&&|;|\s#|\s\.\.\.\s*$")  # a pipe, a chain, a comment ends what a command owns
_md = MarkdownIt("commonmark").enable("table")


@dataclass(frozen=True)
class Code:
    file: Path
    line: int  # 1-based
    text: str


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@cache
def _tokens(path: Path):
    return _md.parse(path.read_text(encoding="utf-8"))


def _inline_children(path: Path):
    for tok in _tokens(path):
        if tok.type == "inline":
            yield tok, tok.children or []


def _code(path: Path) -> list[Code]:
    """Code spans, and the logical lines of code blocks (``\\`` continuations joined)."""
    found = []
    for tok in _tokens(path):
        if tok.type in ("fence", "code_block"):
            start = tok.map[0] + (1 if tok.type == "fence" else 0)
            pending, first = "", None
            for i, raw in enumerate(tok.content.splitlines()):
                first = start + i + 1 if first is None else first
                if raw.rstrip().endswith("\\"):
                    pending += raw.rstrip()[:-1] + " "
                    continue
                found.append(Code(path, first, pending + raw))
                pending, first = "", None
            if pending:
                found.append(Code(path, first, pending))
    for tok, children in _inline_children(path):
        line = tok.map[0] + 1
        for child in children:
            line += child.type in ("softbreak", "hardbreak")
            if child.type == "code_inline":
                found.append(Code(path, line, child.content.replace("\\|", "|")))
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    """GitHub's heading anchors of a markdown file."""
    seen: dict[str, int] = {}
    anchors = set()
    tokens = _tokens(path)
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        text = "".join(c.content for c in tokens[i + 1].children or [] if c.type in ("text", "code_inline"))
        slug = _slug(text)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(anchors)


def test_the_docs_are_found():
    names = {_rel(p) for p in DOCS}
    assert {"README.md", "docs/architecture.md", "docs/methods/masksam.md"} <= names, names


def test_every_relative_link_resolves():
    wrong = []
    for path in DOCS:
        for tok, children in _inline_children(path):
            for child in children:
                if child.type not in ("link_open", "image"):
                    continue
                href = child.attrGet("href") if child.type == "link_open" else child.attrGet("src")
                if re.match(r"^[a-z][a-z0-9+.-]*:", href or "", re.I):
                    continue  # http:, https:, mailto:
                target, _, anchor = href.partition("#")
                where = f"{_rel(path)}:{tok.map[0] + 1}: {href}"
                dest = (path.parent / target).resolve() if target else path
                if not dest.exists():
                    wrong.append(f"{where}: no such file")
                elif ROOT not in dest.parents and dest != ROOT:
                    wrong.append(f"{where}: points outside the repository")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    wrong.append(f"{where}: no heading with this anchor in {_rel(dest)}")
    assert not wrong, "links that do not resolve:\n" + "\n".join(wrong)


def _help_text(argv: tuple[str, ...]) -> str | None:
    """stdout of ``COMMAND [SUBCOMMAND] --help`` run in this process, None if it did not exit cleanly."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [*argv, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            SCRIPTS[argv[0]].load()()
    except SystemExit as stop:
        if stop.code not in (0, None):
            return None
    finally:
        sys.argv = saved
    return out.getvalue()


@cache
def _flags(command: str, sub: str | None) -> frozenset[str] | None:
    """Flags ``--help`` lists (the usage lines and the option lines), with a subcommand's own if one is named."""
    text = _help_text((command,))
    if text is None:
        return None
    if sub is not None:
        choices = {c for group in re.findall(r"\{([^}]*)\}", text) for c in group.split(",")}
        if sub in choices:
            text += _help_text((command, sub)) or ""
    flags = set()
    usage = True
    for line in text.splitlines():
        if usage and not line.strip():
            usage = False
        if usage or re.match(r"^\s{1,8}-", line):
            part = line if usage else re.split(r"\s{2,}", line.strip())[0]
            flags.update(m.group() for m in re.finditer(r"(?<![\w-])" + FLAG.pattern, part))
    return frozenset(flags)


def _quoted_commands():
    """(where, command, subcommand or None, flags quoted with it) for every command quoted in the docs."""
    for path in DOCS:
        for code in _code(path):
            matches = list(COMMAND.finditer(code.text))
            for k, m in enumerate(matches):
                end = matches[k + 1].start() if k + 1 < len(matches) else len(code.text)
                rest = code.text[m.end() : end]
                stop = SEGMENT_END.search(rest)
                words = [w.strip("[]()\"'`,") for w in (rest[: stop.start()] if stop else rest).split()]
                flags = [w.split("=")[0] for w in words if FLAG.fullmatch(w.split("=")[0])]
                sub = words[0] if words and re.fullmatch(r"[a-z][\w-]*", words[0]) else None
                yield f"{_rel(path)}:{code.line}", m.group(), sub, flags


def test_every_quoted_command_is_installed_and_takes_the_quoted_flags():
    quoted = list(_quoted_commands())
    assert len({c for _, c, _, _ in quoted}) >= 20, "the docs quote fewer commands than expected: is the parser broken?"
    wrong = []
    for where, command, sub, flags in quoted:
        if command not in SCRIPTS:
            wrong.append(f"{where}: {command} is no installed console script")
            continue
        known = _flags(command, sub)
        if known is None:
            wrong.append(f"{where}: {command} --help did not exit cleanly")
            continue
        wrong += [f"{where}: {command} has no flag {flag}" for flag in flags if flag not in known]
    assert not wrong, "commands or flags the docs quote that do not exist:\n" + "\n".join(wrong)


def _find_trainer(name: str) -> type | None:
    """nnU-Net's lookup of ``-tr NAME``: the folders of ``nnUNet_extTrainer`` (where the start-up hook registered
    ours), then, for a name not found there, nnU-Net's whole lookup (its own trainers first, then those folders)."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):
        for folder in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
            if folder.strip() and os.path.isdir(folder):
                found = recursive_find_python_class(
                    folder, name, None, base_folder=folder, verbose=False, cleanup_imports_from_base_folder=True
                )
                if found is not None:
                    return found
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None


def test_the_start_up_hook_registered_our_trainers():
    from nnunet_sam._register import SHIM_DIR

    folders = [os.path.abspath(f) for f in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if f.strip()]
    assert os.path.abspath(SHIM_DIR) in folders, "run the tests in an environment where nnunet-sam is installed"


def test_every_quoted_trainer_is_found_by_nnunet():
    names: dict[str, list[str]] = {}
    for path in DOCS:
        for code in _code(path):
            for m in TRAINER.finditer(code.text):
                if m.group() not in NOT_TRAINERS:
                    names.setdefault(m.group(), []).append(f"{_rel(path)}:{code.line}")
    assert {"MaskSAMTrainer", "RadSAMTrainer_AMOS", "SAM3DAdapterTrainer_prompted"} <= set(names), sorted(names)
    found = {name: _find_trainer(name) for name in names}
    wrong = [f"{', '.join(names[n][:3])}: {n} is not found by nnU-Net's trainer lookup" for n in names if not found[n]]
    assert not wrong, "trainer names the docs quote that nnUNetv2_train -tr would not find:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("Input resolution (`input_scale`)", "input-resolution-input_scale"),
        (
            "RadSAMTrainer (RadSAM: one prompt -> a 3D mask, then 3D editing)",
            "radsamtrainer-radsam-one-prompt---a-3d-mask-then-3d-editing",
        ),
        (
            "Damaged files, overwritten files and refusals (issue 17)",
            "damaged-files-overwritten-files-and-refusals-issue-17",
        ),
    ],
)
def test_slugs_are_githubs(heading, slug):
    assert _slug(heading.replace("`", "")) == slug


def test_the_readme_leads_with_the_prediction_that_cannot_overwrite_its_input():
    """Issue 29 item 12: the README's first prediction command is nnunet_sam_predict (which refuses an -o that would
    overwrite an input, and loads checkpoints with weights_only=True); the stock command's risks are stated beside."""
    readme = ROOT / "README.md"
    blocks = [c for c in _code(readme) if c.line < 20 and re.search(r"\bpredict\b|_predict\b", c.text)]
    assert blocks and blocks[0].text.split()[0] == "nnunet_sam_predict", blocks
    text = readme.read_text(encoding="utf-8")
    intro = text[: text.index("## Install")]
    assert "`nnUNetv2_predict`" in intro and "writes over an input file" in intro and "weights_only=False" in intro
