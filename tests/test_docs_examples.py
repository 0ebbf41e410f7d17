"""Every code example of README.md and docs/*.md runs, at tiny sizes (docs/results is not
searched: it holds published outputs, not examples).

How a document's examples run (docs/README.md, "Examples are tested", says the same for
writers):

- Fenced blocks tagged ``python``, ``bash`` or ``sh`` are examples; any other tag (``text``
  for printed output, ``json``) is not run.
- The examples of one document run in order, in one fresh working directory, so a block
  can use what an earlier one made (``data/expert``, ``runs/...``). A ``python`` block runs
  on its own (a fresh namespace, its own imports), as a reader would paste it.
- A shell line ``python scripts/NAME.py ARGS`` (or ``scripts/bench/NAME.py``) runs the
  script's ``main(ARGS)`` in this process (as ``python scripts/NAME.py`` would, without
  the interpreter's start-up) and must return 0. No other shell command is run: a block
  holding one (``make``, ``pip``, ``tensorboard``...) must be marked ``not-run``.
- HTML comments on the lines right above a fence (invisible when rendered) change how it
  runs:

  ``<!-- run-with: --steps 6 --episodes 2 -->``
      in every command of the block, each flag gets this value (replaced where the
      command has the flag, appended where it has not); a flag without a value
      (``--no-progress``) is appended where missing.
  ``<!-- run-replace: OLD => NEW -->``
      replace the text OLD (which must occur) by NEW before running; may repeat.
  ``<!-- not-run: REASON -->``
      not run at all, for what cannot run in CI (a CUDA wheel, a cluster, the full test
      suite itself); the reason is required. Keep these rare.
  ``<!-- example-setup: tiny-run -->`` (anywhere in a document)
      before its first block, the working directory gets ``data/expert`` (scripted-expert
      data of `SETUP_TASKS`, 2 episodes of 30 steps each) and ``runs/pretrain-small`` (a
      `tiny` DT pretrained 6 updates on `PRETRAIN_TASKS`, MT40 tasks only), made once per
      test session.

Total time at these sizes: well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = {"python", "bash", "sh"}
SETUP_TASKS = ("reach-v3", "drawer-close-v3", "faucet-close-v3", "window-close-v3")
PRETRAIN_TASKS = ("reach-v3", "drawer-close-v3")
_DIRECTIVE = re.compile(r"^<!--\s*([a-z-]+)\s*:\s*(.*?)\s*-->$")
_KNOWN = {"run-with", "run-replace", "not-run", "example-setup"}

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # SB3's advice to wrap envs in a Monitor, for the example that uses SB3
              pytest.mark.filterwarnings("ignore:Evaluation environment is not wrapped")]


def documents() -> list[Path]:
    """README.md and every docs/*.md (not docs/results/)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    """One fenced example: its document, the line of its opening fence, its language and
    code, and the directives above it."""

    doc: Path
    line: int
    lang: str
    code: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def get(self, name: str) -> list[str]:
        return [value for key, value in self.directives if key == name]


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file and its document-level ``example-setup``s."""
    blocks: list[Block] = []
    setups: list[str] = []
    pending: list[tuple[str, str]] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        match = _DIRECTIVE.match(text)
        if match:
            name, value = match.groups()
            if name not in _KNOWN:
                raise ValueError(f"{path}:{i + 1}: unknown directive {name!r}")
            if name == "example-setup":
                setups.append(value)
            else:
                pending.append((name, value))
            i += 1
            continue
        if text.startswith("```"):
            lang, start, body = text[3:].strip().lower(), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(path, start, lang, "\n".join(body), pending))
        elif pending:
            raise ValueError(f"{path}:{i + 1}: a directive must be right above a fence")
        pending = []
        i += 1
    return blocks, setups


# ---------------------------------------------------------------- shell commands


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [tokens for line in joined.splitlines()
            if (tokens := shlex.split(line, comments=True))]


def with_flags(argv: list[str], spec: str) -> list[str]:
    """``argv`` with the flags of a ``run-with`` directive set (replaced or appended)."""
    tokens, argv = shlex.split(spec), list(argv)
    k = 0
    while k < len(tokens):
        flag = tokens[k]
        if not flag.startswith("--"):
            raise ValueError(f"run-with: expected a --flag, got {flag!r}")
        has_value = k + 1 < len(tokens) and not tokens[k + 1].startswith("--")
        value = tokens[k + 1] if has_value else None
        k += 2 if has_value else 1
        if flag in argv:
            if value is not None:
                argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] + ([value] if value is not None else [])
    return argv


def script_module(path: str):
    """The module of ``scripts/NAME.py`` or ``scripts/bench/NAME.py`` (conftest puts both
    folders on sys.path, as running the file would put its own)."""
    match = re.fullmatch(r"scripts/(?:bench/)?(\w+)\.py", path)
    if match is None:
        raise AssertionError(f"not a script of this repository: {path}")
    return importlib.import_module(match.group(1))


def run_shell(block: Block, code: str) -> None:
    commands = shell_commands(code)
    assert commands, f"{block.where}: an empty shell block"
    for argv in commands:
        if argv[0] != "python" or len(argv) < 2:
            raise AssertionError(
                f"{block.where}: `{shlex.join(argv)}` is not `python scripts/NAME.py ...`; "
                "mark the block <!-- not-run: reason --> if it cannot run in CI")
        for spec in block.get("run-with"):
            argv = with_flags(argv, spec)
        main = script_module(argv[1]).main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(argv[2:])
        assert status in (0, None), (f"{block.where}: `{shlex.join(argv)}` exited {status}\n"
                                     f"{out.getvalue()[-2000:]}")


def run_python(block: Block, code: str) -> None:
    from agents.methods import METHODS

    namespace = {"__name__": "__main__"}
    # padded so that a traceback names the document's own line numbers
    source = "\n" * block.line + code
    registered = dict(METHODS)  # an example may register a method: not for later tests
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, str(block.doc), "exec"), namespace)
    finally:
        METHODS.clear()
        METHODS.update(registered)


def prepared_code(block: Block) -> str:
    code = block.code
    for spec in block.get("run-replace"):
        old, sep, new = spec.partition(" => ")
        assert sep, f"{block.where}: run-replace needs `OLD => NEW`, got {spec!r}"
        assert old in code, f"{block.where}: run-replace: {old!r} is not in the block"
        code = code.replace(old, new)
    return code


# ---------------------------------------------------------------- the shared tiny set-up


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """``data/expert`` and ``runs/pretrain-small`` at tiny size (the ``tiny-run`` set-up)."""
    from agents.collection import collect_datasets
    from agents.experts import ScriptedCollector
    from eva_rl.training import PretrainConfig, pretrain, pretrain_train_config

    root = tmp_path_factory.mktemp("docs-setup")
    data = root / "data" / "expert"
    collect_datasets(SETUP_TASKS, ScriptedCollector(noise=(0.0, 0.3), max_episode_steps=30),
                     2, data, progress=False)
    pretrain(data, PRETRAIN_TASKS, root / "runs" / "pretrain-small",
             PretrainConfig(preset="tiny", train=pretrain_train_config(
                 6, batch_size=8, checkpoint_every=0, progress=False)))
    return root


# ---------------------------------------------------------------- the tests


def test_the_extractor_reads_directives_and_commands(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n<!-- run-with: --steps 6 --no-progress -->\n```bash\n"
                   "python scripts/pretrain.py --steps 1500 \\\n    --out r  # note\n```\n"
                   "```text\nprinted\n```\n<!-- example-setup: tiny-run -->\n")
    (block, printed), setups = parse_blocks(doc)
    assert setups == ["tiny-run"] and printed.lang == "text"
    assert block.line == 3 and block.get("run-with") == ["--steps 6 --no-progress"]
    (argv,) = shell_commands(block.code)
    assert argv == ["python", "scripts/pretrain.py", "--steps", "1500", "--out", "r"]
    assert with_flags(argv, "--steps 6 --no-progress") == [
        "python", "scripts/pretrain.py", "--steps", "6", "--out", "r", "--no-progress"]
    doc.write_text("<!-- run-with: --steps 6 -->\n\n```bash\n```\n")
    with pytest.raises(ValueError, match="right above a fence"):
        parse_blocks(doc)


def test_every_document_has_examples_and_only_known_directives():
    names = [p.name for p in documents()]
    assert "README.md" in names and "benchmarks.md" in names
    for path in documents():
        blocks, _ = parse_blocks(path)  # raises on an unknown or misplaced directive
        for block in blocks:
            for reason in block.get("not-run"):
                assert reason, f"{block.where}: not-run needs a reason"


def test_relative_links_point_at_files_that_exist():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    for path in documents():
        for target in link.findall(path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch, request):
    blocks, setups = parse_blocks(path)
    runnable = [b for b in blocks if b.lang in RUN_LANGS and not b.get("not-run")]
    if not runnable:
        pytest.skip("no runnable example")
    for setup in setups:
        assert setup == "tiny-run", f"{path}: unknown example-setup {setup!r}"
        shutil.copytree(request.getfixturevalue("tiny_run"), tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVA_RL_PROGRESS", "off")
    for block in runnable:
        code = prepared_code(block)
        if block.lang == "python":
            run_python(block, code)
        else:
            run_shell(block, code)
