"""The documentation holds together: every relative link and image in README.md and docs/*.md names a file that
exists (and a heading that exists, when it names one), the README stays short, and its test command is the one
CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_IMG_TAG = re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed: what looks like a link there is not one."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target and image source in Markdown text: inline, reference definitions and <img> tags."""
    prose = _prose(text)
    found = [m.group(1) for m in _INLINE.finditer(prose)]
    found += [m.group(1) for m in _REFERENCE.finditer(prose)]
    found += [m.group(1) for m in _IMG_TAG.finditer(prose)]
    return [target[1:-1] if target.startswith("<") else target for target in found]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a Markdown file's headings give (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for match in _HEADING.finditer(_FENCE.sub("", text)):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(doc: Path) -> list[str]:
    """The relative links of `doc` whose file (or heading) does not exist, each with why."""
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
            continue  # http(s), mailto and other schemes: not files of this repository
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target}: no such heading in {resolved.name}")
    return broken


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(doc: Path) -> None:
    assert links(doc.read_text(encoding="utf-8")) or doc != README, "the README links to nothing?"
    assert broken_links(doc) == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The checker itself: each kind of broken target is reported, good ones and code are not."""
    (tmp_path / "there.md").write_text("# Its Heading: `code`\n\n## Again\n\n## Again\n")
    (tmp_path / "pic.png").write_bytes(b"")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](there.md) ![ok](pic.png) [ok](there.md#its-heading-code) [ok](there.md#again-1) [ok](#top)\n"
        "[web](https://example.com/nope.md) [mail](mailto:a@b.c)\n"
        "`[not a link](nowhere.md)`\n```\n![not an image](nowhere.png)\n```\n# Top\n"
        "[gone](missing.md) ![gone](missing.png) [bad anchor](there.md#nope)\n"
        '[ref]: gone/ref.md\n<img src="gone.png">\n')
    assert broken_links(doc) == [
        "missing.md: no such file", "missing.png: no such file", "there.md#nope: no such heading in there.md",
        "gone/ref.md: no such file", "gone.png: no such file"]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def _ci_commands() -> tuple[str, str]:
    """.ci/run's install line and its last line (the test command it runs)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    install = [line for line in lines if line.startswith("pip install -e ")]
    assert len(install) == 1, install
    return install[0], lines[-1]


def test_readme_test_command_is_what_ci_runs() -> None:
    """The second of the README's "Two commands" is exactly CI's install followed by CI's last command."""
    install, test = _ci_commands()
    assert test == "python -m pytest -q"
    text = README.read_text(encoding="utf-8")
    section = text.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)]
    assert len(commands) == 2, commands
    assert commands[1] == f"{install} && {test}"
