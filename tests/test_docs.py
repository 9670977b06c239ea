"""The documentation: no development history, a short README, links that resolve, a generated key reference that
matches the config dataclasses, and test names that exist."""
from __future__ import annotations

import re
from pathlib import Path

from aidkd.engine import config_docs

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# Words that speak of how the project was made rather than of what it is. Each pattern is specific enough not to hit
# ordinary words ("the previous run's outputs" of a user's run folder, an onnxruntime InferenceSession).
HISTORY = [
    (r"\bsessions?\b", "'session'"),
    (r"\bissues?\s*#?\s*\d+", "an issue number"),
    (r"\bitems?\s+\d+", "an item number"),
    (r"\b(?:before|after|until) (?:the |this )?(?:pairing |random-stream )?fix\b", "'before / after the fix'"),
    (r"\bpairing fix\b", "'the pairing fix'"),
    (r"\btoday'?s (?:code|defaults?|loss forms|forms)\b", "'today's code'"),
    (r"\bold (?:code|loss forms|sweep|demo|run)\b", "'the old code'"),
    (r"\bnot yet re-?run\b", "'not yet re-run'"),
    (r"\b(?:was|were) lent\b", "who had which machine"),
    (r"PYTHONPATH\S*\s.*\b[0-9a-f]{7,40}\b|\b[0-9a-f]{7,40}'s `?src", "a commit's code on PYTHONPATH"),
]


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks" / "results").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def history_hits(text: str, name: str) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in HISTORY:
            m = re.search(pattern, line, re.IGNORECASE)
            if m:
                hits.append(f"{name}:{number}: {what}: ...{m.group(0)}...")
    return hits


def test_history_patterns_hit_history_and_spare_ordinary_words():
    assert history_hits("Measured on session 7's code (issue 18 item 3), before the pairing fix.", "x") == [
        "x:1: 'session': ...session...", "x:1: an issue number: ...issue 18...", "x:1: an item number: ...item 3...",
        "x:1: 'before / after the fix': ...before the pairing fix...", "x:1: 'the pairing fix': ...pairing fix..."]
    assert history_hits("run with 1834a92's `src` on `PYTHONPATH`", "x")
    ordinary = ("--overwrite deletes the previous run's outputs; onnxruntime.InferenceSession runs the graph; "
                "a fixed split; the items of a list; issue a warning; 3 items, 2 issues")
    assert history_hits(ordinary, "x") == []


def test_docs_speak_of_the_project_not_of_its_history():
    hits = [hit for f in doc_files() for hit in history_hits(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not hits, "development history in the docs:\n" + "\n".join(hits)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/"


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def test_github_anchor_rule():
    assert github_anchor("1. Your data") == "1-your-data"
    assert github_anchor("Will AID act on my data?") == "will-aid-act-on-my-data"
    assert github_anchor("`data.synth`") == "datasynth"


def test_relative_links_resolve():
    broken = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", f.read_text(encoding="utf-8"), flags=re.DOTALL)
        for number, line in enumerate(text.splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (f.parent / file_part).resolve() if file_part else f
                where = f"{f.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_config_key_is_documented_once_and_exists():
    assert not config_docs.undocumented_keys(), (
        f"config keys without a description in src/aidkd/engine/config_docs.py: {config_docs.undocumented_keys()}")
    assert not config_docs.unknown_descriptions(), (
        f"descriptions of keys the config dataclasses do not have: {config_docs.unknown_descriptions()}")


def test_config_reference_is_generated_from_the_code():
    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == config_docs.render(), "docs/config.md is out of date: run `make docs`"


def test_config_reference_lists_types_and_defaults():
    rows = {line.split("|")[1].strip(): line for line in config_docs.render_keys() if line.startswith("| `")}
    assert "| float | `0.1` |" in rows["`distill.aid.alpha`"]
    assert "| sgd \\| adamw | `sgd` |" in rows["`train.optimizer`"]
    assert "| list[float] | `[0.67, 0.89]` |" in rows["`train.milestones`"]
    assert "| str \\| null | `null` |" in rows["`data.root`"]
    assert "`distill.methods[].params`" in rows


def test_tests_named_in_the_docs_exist():
    defined = {m for f in (ROOT / "tests").glob("test_*.py")
               for m in re.findall(r"^\s*def (test_\w+)", f.read_text(encoding="utf-8"), re.MULTILINE)}
    missing = [f"{f.relative_to(ROOT)}: {name}" for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
               for name in re.findall(r"`(test_\w+)`", f.read_text(encoding="utf-8")) if name not in defined]
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)


# In code and comments "session" and "issue" have ordinary meanings (an onnxruntime session, issue a warning): only
# the unambiguous history phrases are refused there.
CODE_HISTORY = r"\bsessions? \d+|\bissues? #?\d+|\b(?:previous|this|last|earlier) session\b|\bpairing fix\b|today's code"


def test_code_speaks_of_the_project_not_of_its_history():
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "configs").glob("*.yaml"), *(ROOT / "benchmarks" / "profiles").glob("*.yaml")]
    hits = [f"{f.relative_to(ROOT)}:{number}: {line.strip()}" for f in files if f.name != "test_docs.py"
            for number, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(CODE_HISTORY, line, re.IGNORECASE)]
    assert not hits, "development history in code or comments:\n" + "\n".join(hits)
