"""README against the results it quotes (issue 34): the results block is the committed main table, and every number the
README's prose quotes from a result is found in a committed result file. Reads committed files only: fast, no data."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    "The text between the runner's markers for profile `name`."
    m = re.search(rf"<!-- results:{name}:start -->\n(.*?)<!-- results:{name}:end -->", README, re.S)
    assert m, f"README has no results block for {name}"
    return m.group(1)


def test_the_results_block_is_the_committed_main_table():
    table = (ROOT / "results" / "cpu" / "tables" / "main_table.md").read_text()
    assert block("cpu").endswith(table), "README's cpu block differs from results/cpu/tables/main_table.md: run `make figures`"


def numbers(text: str) -> set[str]:
    "Decimal numbers as written (0.599, 237.1, 3,842 without its comma), not dates, commits or section numbers."
    return {n.replace(",", "") for n in re.findall(r"(?<![\w.])\d[\d,]*\.\d+(?![\w.])", text)}


def test_every_number_the_results_prose_quotes_is_in_a_committed_result():
    prose = README.split("## Results", 1)[1].split("<!-- results:cpu:start -->", 1)[0]
    quoted = numbers(prose)
    assert len(quoted) > 10, "the results prose quotes no numbers: this test would check nothing"
    # the tables a reader can open (not the logs: among thousands of logged numbers any number is found)
    committed = "\n".join(f.read_text() for f in [*(ROOT / "results" / "cpu" / "tables").glob("*.md"),
                                                    *(ROOT / "results" / "cpu" / "tables").glob("*.notes.txt"),
                                                    ROOT / "results" / "cpu" / "README.md"])
    # a number may be written rounded from a longer one in a file (0.599 from 0.5993): compare at the quoted precision
    found = {n for n in quoted if re.search(rf"(?<![\d.]){re.escape(n)}", committed.replace(",", ""))}
    assert quoted <= found, f"README quotes numbers found in no committed result in results/cpu's tables or README: {sorted(quoted - found)}"


def test_results_readme_lists_every_run_trained_from_uncommitted_code():
    """results/README.md's "Runs trained from uncommitted code" names exactly the committed runs whose status.json
    carries a `+dirty` revision: a new dirty run, or one retrained clean, makes this fail until the list follows."""
    dirty = set()
    for status in (ROOT / "results").glob("*/**/status.json"):
        if json.loads(status.read_text()).get("revision", "").endswith("+dirty"):
            plan = status.relative_to(ROOT / "results").parts[0]
            dirty.add((plan, status.parent.name))
    assert dirty, "no committed run carries +dirty: drop the section from results/README.md and this test"
    section = (ROOT / "results" / "README.md").read_text().split("## Runs trained from uncommitted code", 1)[1]
    listed = set()
    for plan, names in re.findall(r"^- `results/([\w.-]+)/`: (.*(?:\n  .*)*)", section, re.M):
        listed |= {(plan, n) for n in re.findall(r"`([^`]+)`", names)}
    assert listed == dirty, f"listed but clean: {sorted(listed - dirty)}; dirty but not listed: {sorted(dirty - listed)}"
