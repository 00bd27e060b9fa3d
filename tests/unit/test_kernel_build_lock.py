"""The kernels' build lock (engine/kernels `building`): a torch build lock left by a killed build is
removed, one held by a live build of ours is waited for, never removed."""

import subprocess
import sys
import time

from engine.kernels import building

HOLD = """
import sys, time
from pathlib import Path
from engine.kernels import building
with building(Path(sys.argv[1])):
    (Path(sys.argv[1]) / "lock").touch()   # torch's baton, as a live build holds it
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    (Path(sys.argv[1]) / "lock").unlink()  # the build ends and lets go of it
"""


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, caplog):
    (tmp_path / "lock").touch()  # what torch's FileBaton leaves when its build is killed
    with building(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "killed midway" in caplog.text


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        with building(tmp_path):
            waited = time.monotonic() - start
            assert holder.poll() is not None or not (tmp_path / "lock").exists()
        assert waited > 0.5  # it waited for the holder's build instead of taking its lock away
        assert holder.wait(10) == 0
    finally:
        holder.kill()


def test_the_lock_of_a_killed_holder_is_dropped(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.kill()  # killed mid-build: its flock goes with it, torch's lock file stays
        holder.wait(10)
        assert (tmp_path / "lock").exists()
        take = "import sys; from pathlib import Path; from engine.kernels import building\n" \
               "with building(Path(sys.argv[1])): assert not (Path(sys.argv[1]) / 'lock').exists()"
        subprocess.run([sys.executable, "-c", take, str(tmp_path)], check=True, timeout=60)  # not left waiting
    finally:
        holder.kill()
