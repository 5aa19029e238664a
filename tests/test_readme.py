"""The README's (and docs/*.md's) commands run as written on a fresh clone.

Which lines are checked: every line inside a ```bash fence of README.md and docs/*.md. The rule for
what is skipped: blank lines, lines that start with `#` (comments), lines that start with `$ `
(a prompt: an illustration with its output, which also lives in plain ``` fences, never checked),
and the body of a heredoc (`<<'X'` up to the line `X`). A trailing `# ...` comment is cut off
(shlex's comment rule) before a line is read.

For each remaining line, without running anything:
- `mlxbatch ...`: the subcommand exists and every option parses, via the Typer app's click command
  (`make_context` with `resilient_parsing`, so values are not converted and nothing runs), and
  every argument that names a path under the repo (sample_data/, jobs/, scripts/, tests/, docs/)
  exists, except output folders (`*.mlxbatch`), which an earlier line of the block makes;
- `bash X` / `python X` / `.venv/bin/python X`: the script X exists (`-m MODULE` is left alone).

Then the tour (the README's block under "A five-minute tour") runs for real, in a temp copy of
sample_data/ and jobs/: its cheap commands (the first run, status, resume, the refused resume,
validate) with `--model random:tiny` appended to the runs, in the fast tier; every command as
written, on the embedded default model, in the slow one. A line's comment saying `exit N` or
`refused` is the exit code it must have (refused: 1); otherwise 0.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer.main
from conftest import ROOT, cli

from mlxbatch.cli import app

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_PATHS = ("sample_data/", "jobs/", "scripts/", "tests/", "docs/")


def bash_blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(the heading above it, its lines) for each ```bash block of a page."""
    blocks, heading, lines, inside = [], "", [], False
    for line in page.read_text().splitlines():
        if not inside and line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```bash":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append((heading, lines))
        elif inside:
            lines.append(line)
    return blocks


def commands(lines: list[str]) -> list[tuple[list[str], str]]:
    """(argv, its trailing comment) for each line the docstring's rule keeps."""
    out, heredoc_end = [], None
    for line in lines:
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("$ "):
            continue
        m = re.search(r"<<-?\s*'?\"?(\w+)", s)
        if m:
            heredoc_end = m.group(1)
        lex = shlex.shlex(s, posix=True, punctuation_chars=False)
        lex.whitespace_split, lex.commenters = True, "#"
        argv = list(lex)
        comment = s[s.index(" #") + 2:].strip() if " #" in s else ""
        out.append((argv, comment))
    return out


def all_commands():
    for page in PAGES:
        for heading, lines in bash_blocks(page):
            for argv, comment in commands(lines):
                yield pytest.param(argv, id=f"{page.name}: {' '.join(argv)[:70]}")


def strip_env(argv: list[str]) -> list[str]:
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    return argv


ROOT_CMD = typer.main.get_command(app)


def check_mlxbatch(args: list[str]) -> None:
    group = ROOT_CMD
    while hasattr(group, "commands") and args and not args[0].startswith("-"):  # a group (typer may vendor click)
        sub = group.commands.get(args[0])
        assert sub is not None, f"no subcommand {args[0]!r} in {group.name}"
        group, args = sub, args[1:]
    assert not hasattr(group, "commands"), f"{group.name} needs a subcommand"
    known = {o for p in group.params for o in (*p.opts, *p.secondary_opts)}
    for a in args:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, f"mlxbatch {group.name}: no option {a}"
    group.make_context(group.name, list(args), resilient_parsing=True)  # raises on a bad arity/option
    for a in args:
        if a.startswith(REPO_PATHS) and ".mlxbatch" not in a:  # an output folder an earlier line makes
            assert (ROOT / a).exists(), f"{a} is not in the repo"


@pytest.mark.parametrize("argv", list(all_commands()))
def test_command_exists(argv):
    argv = strip_env(argv)
    if not argv:
        return
    prog = argv[0]
    if prog == "mlxbatch":
        check_mlxbatch(argv[1:])
    elif prog in ("bash", "python", "python3") or prog.endswith("/python"):
        rest = [a for a in argv[1:] if not a.startswith("-")]
        if "-m" in argv[1:] or not rest:
            return
        assert (ROOT / rest[0]).is_file(), f"{rest[0]} does not exist"


def test_readme_is_short_and_links_every_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES[1:]:
        if f"<!-- slot:{page.stem} -->" in text:
            continue  # a feature's page whose README section is still an unfilled slot
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"


def tour() -> list[tuple[list[str], int, str]]:
    [lines] = [lines for heading, lines in bash_blocks(ROOT / "README.md") if heading == "A five-minute tour"]
    out = []
    for argv, comment in commands(lines):
        m = re.search(r"exit (\d+)", comment)
        code = int(m.group(1)) if m else 1 if "refused" in comment else 0
        out.append((argv, code, comment))
    return out


def run_tour(tmp_path, monkeypatch, steps, extra):
    for d in ("sample_data", "jobs"):
        shutil.copytree(ROOT / d, tmp_path / d)
    monkeypatch.chdir(tmp_path)
    for argv, code, comment in steps:
        assert argv[0] == "mlxbatch"
        args = argv[1:] + (extra if argv[1] == "run" else [])
        r = cli(*args)
        assert r.exit_code == code, f"{' '.join(args)}: exit {r.exit_code}, expected {code}\n{r.output[-2000:]}"
        if "refused" in comment:
            assert "max_tokens: 64 -> 80" in r.output, r.output[-2000:]
        if argv[1] == "status":
            assert "complete" in r.output or "done" in r.output, r.output


def test_tour_cheap_commands_on_random_tiny(tmp_path, monkeypatch):
    steps = tour()
    cheap = [s for s in steps if "bad_rows" not in " ".join(s[0]) or s[0][1] == "validate"]
    cheap = [s for s in cheap if "openai_batch" not in " ".join(s[0]) and "--job" not in s[0]]
    assert [s[0][1] for s in cheap] == ["run", "status", "run", "run", "validate"]
    run_tour(tmp_path, monkeypatch, cheap, ["--model", "random:tiny"])
    assert (tmp_path / "sample_data/prompts.mlxbatch/results.jsonl").exists()


@pytest.mark.slow
@pytest.mark.realmodel
def test_tour_as_written(tmp_path, monkeypatch):
    run_tour(tmp_path, monkeypatch, tour(), [])
    for out in ("sample_data/prompts.mlxbatch", "sample_data/bad_rows.mlxbatch", "out/eval"):
        assert (tmp_path / out / "results.jsonl").exists(), out
    assert (tmp_path / "sample_data/bad_rows.mlxbatch/errors.jsonl").exists()
