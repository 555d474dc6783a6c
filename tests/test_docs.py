"""The documentation builds with MkDocs in strict mode, which fails on any link to a page, file or
anchor that is not there; the README's own links lead to files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "serving" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_the_readme_links_resolve():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(f": {page}" in nav for page in pages)
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert targets and all((ROOT / target).exists() for target in targets), targets
    assert len(readme.splitlines()) < 100  # a front page; the rest lives in docs/


# --- the command lines in the docs ------------------------------------------------------------

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED_BLOCK = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console"}
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")  # a span may run on to the paragraph's next line
SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_lines(block: str) -> list[str]:
    """A shell block's commands: backslash-continued lines joined, quotes spanning lines kept whole."""
    import shlex

    lines, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quotation closes on a later line
            pending += "\n"
            continue
        lines.append(pending)
        pending = ""
    assert not pending.strip(), f"unfinished command in the docs: {pending!r}"
    return lines


def cli_arguments(line: str) -> list[list[str]]:
    """The arguments given to image-logreg by each command of a shell line (``# comments`` dropped):
    ``image-logreg ARGS``, ``.venv/bin/image-logreg ARGS`` and ``... -m image_logreg ARGS`` (torchrun)."""
    import shlex

    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens, commands, found = list(lexer), [], []
    for token in tokens + [";"]:
        if token in SEPARATORS:
            if commands:
                found.append(commands)
            commands = []
        else:
            commands.append(token)
    argument_lists = []
    for words in found:
        if words[0] == "image-logreg" or words[0].endswith("bin/image-logreg"):
            argument_lists.append(words[1:])
        elif "image_logreg" in words and words[words.index("image_logreg") - 1] == "-m":
            argument_lists.append(words[words.index("image_logreg") + 1 :])
    return argument_lists


def documented_commands() -> tuple[list[tuple[str, list[str]]], list[tuple[str, str, list[str]]]]:
    """(where, arguments) of every image-logreg command line: in the pages' shell blocks and in their
    inline code; and (where, command, flags) of each synopsis, a fenced block without a shell language
    that starts `image-logreg COMMAND` and lists its flags in `[--flag VALUE]` notation."""
    commands, synopses = [], []
    for page in DOC_PAGES:
        text = page.read_text()
        for match in FENCED_BLOCK.finditer(text):
            where = f"{page.name}, line {text[: match.start()].count(chr(10)) + 1}"
            if match.group(1) in SHELL:
                commands += [(where, args) for line in shell_lines(match.group(2)) for args in cli_arguments(line)]
            elif not match.group(1) and match.group(2).startswith("image-logreg "):
                lines = [line.split("#")[0] for line in match.group(2).splitlines()]
                synopses.append((where, match.group(2).split()[1], re.findall(r"--[a-z][a-z-]*", " ".join(lines))))
        prose = FENCED_BLOCK.sub("", text)
        for span in (" ".join(span.split()) for span in INLINE_CODE.findall(prose)):
            if span.startswith(("image-logreg ", ".venv/bin/image-logreg ")):
                commands += [(f"{page.name}: `{span}`", args) for args in cli_arguments(span.replace("\\|", "|"))]
    return commands, synopses


def test_every_command_line_in_the_docs_parses():
    """Each image-logreg command in README.md and docs/ is parsed (not run) by the real parser, so a
    renamed or misspelt flag, a value out of its choices or a missing argument in the docs fails here.
    `image-logreg NAME` alone in prose names a command, which must exist."""
    import contextlib
    import io

    from image_logreg.cli import build_parser
    from image_logreg.errors import UsageError

    parser = build_parser()
    names = next(a for a in parser._actions if a.dest == "command").choices
    for command in [parser, *names.values()]:
        command.allow_abbrev = False  # a flag renamed to a longer name must not pass as its abbreviation
    commands, _ = documented_commands()
    failures, parsed = [], 0
    for where, args in commands:
        if len(args) == 1 and not args[0].startswith("-"):
            if args[0] not in names:
                failures.append(f"{where}: no command {args[0]!r}")
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except UsageError as exc:
            failures.append(f"{where}: {exc}")
        except SystemExit as exc:  # --help and --version answer and exit
            if exc.code != 0:
                failures.append(f"{where}: exit status {exc.code}")
        parsed += 1
    assert not failures, "\n".join(failures)
    assert parsed >= 40, [where for where, _ in commands]  # the docs hold more than that: the search found them
    assert {args[0] for _, args in commands} >= {"train", "evaluate", "predict", "serve", "learn", "suggest", "sweep", "export"}


def test_the_synopses_name_real_flags():
    """A synopsis (`image-logreg train [--lr LR] ...`) names only flags the command has."""
    from image_logreg.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    _, synopses = documented_commands()
    assert synopses
    for where, command, flags in synopses:
        known = set(commands[command]._option_string_actions)
        assert len(flags) >= 10 and set(flags) <= known, (where, sorted(set(flags) - known))


def test_the_command_finder_reads_shell_as_the_shell_does():
    """Continued lines, quotes spanning lines, comments, `&&`/`|`/`;` and `-m image_logreg`, as bash reads them."""
    block = """source .venv/bin/activate && .venv/bin/image-logreg train --out 'runs/a b' \\
    --epochs 3   # a comment --not-a-flag
curl -s localhost:8000 -d '{"a":
  1}' | python -m json.tool; image-logreg evaluate runs/mnist
torchrun --nproc-per-node 2 -m image_logreg train --seed 1
python -c "print('image-logreg train')"
"""
    found = [args for line in shell_lines(block) for args in cli_arguments(line)]
    assert found == [["train", "--out", "runs/a b", "--epochs", "3"], ["evaluate", "runs/mnist"], ["train", "--seed", "1"]]
