"""--model is checked where it is resolved, before any engine loads it (`weights=True`: dejavu up
and the engines): a folder that is no model failed only after each service's imports, 15 s and
three tracebacks later (a probe)."""

from __future__ import annotations

import json
import shutil

import pytest

from common.model import ModelNotFound, resolve_model_path


def test_a_folder_that_is_no_model_is_refused_saying_why(tiny_model_path, tmp_path):
    assert resolve_model_path(str(tiny_model_path), weights=True) == tiny_model_path
    cases = {"missing": (None, "not a folder with a config.json"), "empty": ({}, "names no model_type"),
             "broken": ("{", "config.json is unreadable"), "weightless": (True, "holds no weights")}
    for name, (config, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if config is True:  # the real config, no weights
            shutil.copy(tiny_model_path / "config.json", folder / "config.json")
        elif config is not None:
            (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(ModelNotFound, match=message):
            resolve_model_path(str(folder), weights=True)
        if config is not None:  # what needs no weights (the gateway, config-only benchmarks) takes the folder
            assert resolve_model_path(str(folder)) == folder
