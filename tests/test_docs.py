"""The documentation still fits the code: README.md and docs/*.md.

What is checked, and the conventions the pages follow:

* Links: every relative link points to an existing file or folder, and every ``#anchor`` (in the
  page or in another page) matches a heading, slugged as GitHub does (lowercase; punctuation
  removed except ``-`` and ``_``; each space turned into ``-``; repeats get ``-1``, ``-2``, ...).
  Paths of the repository written as inline code (``bench/results/...``, ``tests/...``; ``*``
  allowed) must exist too.
* Python blocks (```python) are run as written, each in a fresh namespace in a temporary folder,
  unless the line before the block is ``<!-- not run: REASON -->`` (a block that needs the user's
  own files or minutes of training). Every block, run or not, must compile, and every name it
  takes from ``cellmnn`` or ``cellmnn_kernels`` (``cellmnn.NAME``, ``from cellmnn import NAME``)
  must exist.
* Shell blocks (```bash): every command that runs the ``cellmnn`` command (``cellmnn ...``,
  ``python -m cellmnn ...``, ``torchrun ... -m cellmnn ...``) must parse with the package's own
  argument parser; ``python -m MODULE`` must name an importable module, and ``python FILE`` /
  ``bash FILE`` an existing file. The README's test command is the one CI runs.
* The map of the tree: the README's section "Map of the tree" holds a ```text block with one entry
  per line, a path (folders end in ``/``) and then a description (a line that starts with a space
  continues the description). Every listed path exists; every Python module of ``cellmnn/`` and
  ``cellmnn_kernels/`` is listed (an ``__init__.py`` also by its folder), and so is every
  top-level folder. The modules are found by walking the tree, so any layout works.
* The README stays under 250 lines; each docs page starts with a title and a summary paragraph and
  is linked from the README.
"""
from __future__ import annotations

import ast
import contextlib
import fnmatch
import functools
import importlib
import importlib.util
import io
import os
import random
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("cellmnn", "cellmnn_kernels")
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    path: Path
    line: int  # line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked not run

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


@dataclass
class Page:
    path: Path
    lines: list  # the text, one entry per line
    prose: str  # the text with every fenced block blanked (line numbers kept)
    blocks: list


def parse(path: Path) -> Page:
    lines = path.read_text(encoding="utf-8").splitlines()
    prose = list(lines)
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NOT_RUN.match(lines[k].strip()) if k >= 0 else None
        blocks.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:j]), marker.group(1) if marker else None))
        for n in range(i, min(j + 1, len(lines))):
            prose[n] = ""
        i = j + 1
    return Page(path, lines, "\n".join(prose), blocks)


PARSED = {p: parse(p) for p in PAGES}


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@functools.cache
def tree_files(untracked: bool = True) -> tuple:
    """The files of the working tree: those git tracks, and with ``untracked`` those it would (not
    ignored). Without git: every file outside hidden and ignored folders."""
    try:
        cmd = ["git", "ls-files", "--cached", "-z"] + (["--others", "--exclude-standard"] if untracked else [])
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).exists()]
        if files:
            return tuple(files)
    except (OSError, subprocess.SubprocessError):
        pass
    ignore = [p.strip().strip("/") for p in (ROOT / ".gitignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")] if (ROOT / ".gitignore").exists() else []
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not any(fnmatch.fnmatch(d, p) for p in ignore)]
        files += [rel(Path(dirpath) / f) for f in filenames if not any(fnmatch.fnmatch(f, p) for p in ignore)]
    return tuple(files)


# --- links and anchors ----------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen: dict = {}
    out = set()
    page = PARSED.get(path) or parse(path)
    for line in page.prose.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links():
    for path, page in PARSED.items():
        text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), page.prose)  # keep positions
        for m in LINK.finditer(text):
            target = m.group(2)
            if SCHEME.match(target):
                continue
            yield pytest.param(path, target, id=f"{rel(path)}:{line_of(text, m.start())}:{target}")


@pytest.mark.parametrize("page, target", list(links()))
def test_link(page, target):
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    assert dest.exists(), f"{rel(page)} links to {file}, which does not exist"
    if anchor:
        assert dest.suffix == ".md", f"an anchor into {file}, which is not a Markdown page"
        known = anchors(dest)
        assert anchor in known, f"no heading of {rel(dest)} has the anchor #{anchor}; its anchors: {sorted(known)}"


def tracked_top_folders() -> set:
    """Top-level folders with tracked files (not a local ``runs/`` left by the examples)."""
    return {p.split("/", 1)[0] for p in tree_files(untracked=False) if "/" in p}


def repo_paths():
    """Paths of the repository written as inline code in the prose (``bench/results/x.json``)."""
    tops = tracked_top_folders() | {"docs"}
    for path, page in PARSED.items():
        for m in CODE_SPAN.finditer(page.prose):
            text = m.group(2).strip()
            if "/" not in text or not re.fullmatch(r"[\w.*/-]+", text) or text.split("/", 1)[0] not in tops:
                continue
            yield pytest.param(text, id=f"{rel(path)}:{line_of(page.prose, m.start())}:{text}")


@pytest.mark.parametrize("text", list(repo_paths()))
def test_repository_path_in_prose_exists(text):
    assert list(ROOT.glob(text.rstrip("/"))), f"`{text}` names no file or folder of the repository"


# --- python blocks ----------------------------------------------------------------------------------

def blocks(lang: str):
    for page in PARSED.values():
        for b in page.blocks:
            if b.lang == lang:
                yield b


PY_BLOCKS = list(blocks("python"))


def names_used(tree: ast.AST) -> list:
    """(module, name, line) for every name taken from cellmnn or cellmnn_kernels."""
    alias = {}
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            used += [(node.module, a.name, node.lineno) for a in node.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            used.append((alias[node.value.id], node.attr, node.lineno))
    return used


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.id for b in PY_BLOCKS])
def test_python_block_fits_the_code(block):
    tree = compile(block.code, block.id, "exec", ast.PyCF_ONLY_AST)
    for module, name, line in names_used(tree):
        mod = importlib.import_module(module)
        if not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            pytest.fail(f"{rel(block.path)}:{block.line + line}: {module}.{name} does not exist")


RUN_BLOCKS = [b for b in PY_BLOCKS if b.not_run is None]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # blocks may write files (a saved model)
    code = compile(block.code, f"{block.id} (code block)", "exec")
    threads = torch.get_num_threads()
    np_state, py_state = np.random.get_state(), random.getstate()
    torch.set_num_threads(1)  # small examples: one thread is fastest on a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            exec(code, {"__name__": "__docs__"})  # noqa: S102 (running the docs is the point)
    finally:
        torch.set_num_threads(threads)
        np.random.set_state(np_state)
        random.setstate(py_state)


# --- shell blocks -----------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|"}


def commands(block: Block):
    """(line, argv) for each command of a shell block; continuation lines are joined."""
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        argv: list = []
        for tok in shlex.split(text, comments=True) + [";"]:
            if tok in SEPARATORS:
                while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):  # VAR=value before a command
                    argv = argv[1:]
                if argv:
                    yield block.line + 1 + start, argv
                argv = []
            else:
                argv.append(tok)


def checked_commands():
    for block in blocks("bash"):
        for line, argv in commands(block):
            kind = None
            if argv[0] == "cellmnn":
                kind = ("cli", argv[1:])
            elif argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
                kind = ("cli", argv[3:]) if argv[2] == "cellmnn" else ("module", argv[2:])
            elif argv[0] in ("python", "python3", "bash") and len(argv) > 1 and not argv[1].startswith("-"):
                kind = ("file", argv[1:2])
            elif argv[0] == "torchrun" and "-m" in argv:
                k = argv.index("-m")
                kind = ("cli", argv[k + 2:]) if argv[k + 1] == "cellmnn" else ("module", argv[k + 1:])
            if kind:
                yield pytest.param(*kind, id=f"{rel(block.path)}:{line}:{shlex.join(argv)[:60]}")


@pytest.mark.parametrize("kind, args", list(checked_commands()))
def test_shell_command(kind, args):
    if kind == "cli":
        from cellmnn.cli import build_parser

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"`cellmnn {shlex.join(args)}` does not parse: {err.getvalue().strip()}")
    elif kind == "module":
        module, rest = args[0], args[1:]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "pytest":  # the paths it is given exist
            for a in rest:
                assert a.startswith("-") or (ROOT / a.split("::")[0]).exists(), f"pytest path {a} does not exist"
    else:
        assert (ROOT / args[0]).is_file(), f"{args[0]} does not exist"


def test_readme_test_command_is_the_one_ci_runs():
    cmds = [b.code.strip() for b in PARSED[README].blocks
            if b.lang == "bash" and b.code.strip().startswith("python -m pytest")]
    assert len(cmds) == 1, "the README has one test command, alone in its block"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert cmds[0] in [line.strip() for line in ci], f"CI does not run the README's test command {cmds[0]!r}"


# --- the map of the tree ------------------------------------------------------------------------------

def tree_map():
    """(line, path) for each entry of the README's map of the tree."""
    page = PARSED[README]
    heading = next((n for n, line in enumerate(page.lines, 1)
                    if HEADING.match(line) and "map of the tree" in line.lower()), None)
    assert heading, "the README has a section 'Map of the tree'"
    block = next((b for b in page.blocks if b.line > heading and b.lang == "text"), None)
    assert block, "the map of the tree is a ```text block"
    return [(block.line + 1 + n, line.split()[0]) for n, line in enumerate(block.code.splitlines())
            if line.strip() and not line[0].isspace()]


MAP = tree_map()
LISTED = {path for _, path in MAP}


@pytest.mark.parametrize("path", [p for _, p in MAP], ids=[f"README.md:{n}:{p}" for n, p in MAP])
def test_map_entry_exists(path):
    dest = ROOT / path
    assert dest.is_dir() if path.endswith("/") else dest.is_file(), f"the map lists {path}, which is not there"


MODULES = sorted(f for f in tree_files() if f.split("/", 1)[0] in PACKAGES and f.endswith(".py"))


@pytest.mark.parametrize("module", MODULES)
def test_map_lists_every_module(module):
    folder = module.rsplit("/", 1)[0] + "/"
    assert module in LISTED or (module.endswith("/__init__.py") and folder in LISTED), \
        f"{module} is missing from the README's map of the tree"


@pytest.mark.parametrize("folder", sorted(tracked_top_folders()))
def test_map_lists_every_top_level_folder(folder):
    assert f"{folder}/" in LISTED, f"the top-level folder {folder}/ is missing from the README's map of the tree"


# --- the README and the pages -------------------------------------------------------------------------

def test_readme_is_short():
    n = len(PARSED[README].lines)
    assert n < README_MAX_LINES, f"README.md has {n} lines; keep it under {README_MAX_LINES} (move detail to docs/)"


@pytest.mark.parametrize("page", PAGES[1:], ids=[rel(p) for p in PAGES[1:]])
def test_docs_page_has_summary_and_is_linked(page):
    lines = PARSED[page].lines
    assert lines and lines[0].startswith("# "), f"{rel(page)} starts with a title"
    first = next((line for line in lines[1:] if line.strip()), "")
    assert not re.match(r"\s*([#|*>-]|```|<!--|\d+\.)", first), f"{rel(page)}: a summary paragraph follows the title"
    readme_links = {(README.parent / m.group(2).partition("#")[0]).resolve()
                    for m in LINK.finditer(PARSED[README].prose)}
    assert page.resolve() in readme_links, f"the README does not link to {rel(page)}"
