"""The README's configuration reference is generated from the config models: it must not drift."""
from conftest import REPO

from edgecv.config import reference_markdown


def test_readme_config_reference_matches_the_models():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate: python -m edgecv.config, paste into README.md"


def test_readme_first_screen_has_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:15])
    assert "./scripts/demo.sh" in head and "./scripts/test.sh" in head
    assert (REPO / "scripts" / "demo.sh").exists() and (REPO / "scripts" / "test.sh").exists()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
