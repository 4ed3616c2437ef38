"""README and docs/ stay true: the front page is short, every relative link and anchor resolves,
every flag a shell example passes to a fastdiff command exists, and every fastdiff import in a
Python example works."""
import contextlib
import importlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")


def split_page(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines outside fenced code, [(language, code) of each fenced block])."""
    prose, blocks, lang, code = [], [], None, []
    for line in text.split("\n"):
        m = FENCE.match(line)
        if m and lang is None:
            lang, code = m.group(2) or "", []
        elif m and lang is not None:
            blocks.append((lang, "\n".join(code)))
            lang = None
        elif lang is not None:
            code.append(line)
        else:
            prose.append(line)
    assert lang is None, "a fenced code block is not closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: pathlib.Path) -> list[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))  # a link written inside inline code is an example
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in readme.split("## ", 2)[1], "the README's first section must give `make test`"
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), flags=re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_has_power(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title: one\n\n[a](page.md#title-one) [b](missing.md) [c](#nope) `[d](x.md)`\n")
    assert relative_links(page) == ["page.md#title-one", "missing.md", "#nope"]
    assert anchors(page) == {"title-one"}


# ----------------------------------------------------------------------------- examples


def shell_commands(text: str) -> list[str]:
    """Command lines of the page's shell blocks, continuation lines joined, comments dropped."""
    _, blocks = split_page(text)
    lines = []
    for lang, code in blocks:
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in code.replace("\\\n", " ").split("\n"):
            line = re.sub(r"(^|\s)#.*$", "", line.removeprefix("$ ")).strip()
            if line:
                lines.append(line)
    return lines


MODULES = {  # `python -m MODULE` → the module whose main() parses its arguments
    "fastdiff.audit": "fastdiff.audit",
    "benchmarks.run": "benchmarks.run",
    "benchmarks.host_overhead": "benchmarks.host_overhead",
    "fastdiff.bench": "fastdiff.bench",
}
COMMAND = re.compile(r"(?:^|\s)(?:-m\s+)?fastdiff\s+([a-z][a-z-]*)(.*)$")
MODULE = re.compile(r"-m\s+(" + "|".join(re.escape(m) for m in MODULES) + r")\b(.*)$")


def help_text(cli, target: str | None) -> str:
    """What `fastdiff [TARGET] --help` (or `python -m TARGET --help`) prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        if target in MODULES:
            importlib.import_module(MODULES[target]).main(["--help"])
        else:
            cli.main(([target] if target else []) + ["--help"])
    return out.getvalue()


def test_shell_examples_use_existing_commands_and_flags():
    cli = pytest.importorskip("fastdiff.cli")
    subcommands = set(re.search(r"\{([a-z,-]+)\}", help_text(cli, None)).group(1).split(",")) | {"bench"}
    cache: dict[str, set[str]] = {}
    wrong = []
    for page in PAGES:
        for line in shell_commands(page.read_text(encoding="utf-8")):
            m = MODULE.search(line) or COMMAND.search(line)
            if not m:
                continue
            target, rest = m.group(1), m.group(2)
            if target == "audit":
                target = "fastdiff.audit"
            if target not in subcommands and target not in MODULES:
                wrong.append(f"{page.name}: `{line}`: no command {target!r}")
                continue
            if target not in cache:
                cache[target] = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(cli, target)))
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                if flag not in cache[target]:
                    wrong.append(f"{page.name}: `{line}`: {target} has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_python_examples_import():
    wrong = []
    for page in PAGES:
        for lang, code in split_page(page.read_text(encoding="utf-8"))[1]:
            if lang != "python":
                continue
            for stmt in re.findall(r"^(?:from fastdiff[\w.]* import [\w, ]+|import fastdiff[\w.]*)$", code, flags=re.M):
                try:
                    exec(stmt, {})
                except Exception as e:  # noqa: BLE001 - any failure is a stale example
                    wrong.append(f"{page.name}: `{stmt}`: {type(e).__name__}: {e}")
    assert not wrong, "\n".join(wrong)
