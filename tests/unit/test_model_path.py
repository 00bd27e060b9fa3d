"""--model is checked where it is resolved, before any engine loads it (`weights=True`: dejavu up
and the engines): a folder that is no model failed only after each service's imports, 15 s and
three tracebacks later (a probe)."""

from __future__ import annotations

import json
import shutil

import pytest

from common.model import VOLATILE_CONFIG, ModelNotFound, resolve_model_path


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


def test_a_process_without_torch_has_the_bundled_model_converted_by_a_child(tmp_path, bundled_path):
    """The gateway runs without torch (gateway/__main__.py), and the bundled GGUF's one-time
    conversion needs it: on a fresh cache a child process converts it (a review: the gateway alone,
    `python -m gateway` on a new machine, died with transformers' "Could not import module")."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from common.model import resolve_model_path\n"
            "print('FOLDER', resolve_model_path('smollm2'))\n"
            "assert sys.modules['torch'] is None\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DEJAVU_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert f"FOLDER {folder}" in run.stdout and "a process of its own" in run.stdout
    names = sorted(p.name for p in bundled_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:  # the same files as the cache's conversion, made in-process (by install.sh, or a test)
        if name.endswith("config.json"):  # their transformers_version may be an older install's
            new, old = (json.loads((f / name).read_text()) for f in (folder, bundled_path))
            assert {k: v for k, v in new.items() if k not in VOLATILE_CONFIG} == {
                k: v for k, v in old.items() if k not in VOLATILE_CONFIG}, name
        else:
            assert (folder / name).read_bytes() == (bundled_path / name).read_bytes(), name
