"""The package's layers, as import-linter contracts in setup.cfg: commands > daemon > pipeline > the stages
(analytics, engine, publish, sources, tracking: none imports another) > config > types, and inside the engine
registry > TensorRT backend > builder > adapters > leaves. Imports inside functions count too."""
from __future__ import annotations

import configparser

import pytest
from conftest import REPO

importlinter_cli = pytest.importorskip("importlinter.cli")


def lint(config: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(REPO)  # the root package is imported from the checkout
    monkeypatch.syspath_prepend(str(REPO))
    return importlinter_cli.lint_imports(config_filename=config, no_cache=True, no_logo=True)


def test_the_layers_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lint(str(REPO / "setup.cfg"), monkeypatch) == 0


def test_a_broken_layer_is_caught(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert lint(str(path), monkeypatch) == 1
