"""The package's layers, as import-linter contracts in setup.cfg: commands > daemon > pipeline > the stages
(analytics, engine, publish, sources, tracking: none imports another) > config > types, and inside the engine
registry > TensorRT backend > builder > adapters > leaves. Imports inside functions count too.

import-linter runs in a child process: it configures logging in the process that runs it."""
from __future__ import annotations

import configparser
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("importlinter")
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], " \
       "no_cache=True, no_logo=True))"


def lint(config: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, config], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_layers_are_kept() -> None:
    result = lint(str(REPO / "setup.cfg"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_broken_layer_is_caught(tmp_path) -> None:
    """The check can fail: the same contracts with two layers swapped (the pipeline below the stages)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    layers = cfg["importlinter:contract:layers"]["layers"].strip().splitlines()
    i = next(n for n, line in enumerate(layers) if line.strip() == "edgecv.pipeline")
    layers[i], layers[i + 2] = layers[i + 2], layers[i]
    cfg["importlinter:contract:layers"]["layers"] = "\n" + "\n".join(layers)
    path = tmp_path / "setup.cfg"
    with open(path, "w") as f:
        cfg.write(f)
    result = lint(str(path))
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert "edgecv.pipeline" in result.stdout
