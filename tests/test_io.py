import os

import keras
import numpy as np
import pytest

import keras_resmem
from keras_resmem import _io


def small_model(rng):
    memory = keras_resmem.ResidualMemory(k=2)
    memory.memorize(rng.normal(size=(20, 3)), rng.normal(size=(20, 2)), rng.integers(0, 2, 20))
    a, b = keras.Input((3,)), keras.Input((2,))
    return keras.Model([a, b], memory([a, b])), memory


def test_failed_save_leaves_the_previous_file_intact(rng, tmp_path, monkeypatch):
    model, memory = small_model(rng)
    path = tmp_path / "model.keras"
    _io.save_model(model, path)
    good = path.read_bytes()

    def broken(dir_path):
        raise OSError("disk full")

    monkeypatch.setattr(memory, "save_assets", broken)
    with pytest.raises(OSError, match="disk full"):
        _io.save_model(model, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.keras"]  # no temporary file left behind
    keras.models.load_model(path)


def test_atomic_path_writes_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with _io.atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("done")
    assert target.read_text() == "done"
    assert np.array_equal(sorted(os.listdir(target.parent)), ["out.txt"])


def test_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "results.md"
    _io.write_text(path, "first\n")
    _io.write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.md"]


def test_atomic_directory_leaves_the_old_directory_on_failure(tmp_path):
    target = tmp_path / "model"
    with _io.atomic_directory(target) as tmp:
        (tmp_path / tmp / "a.txt").write_text("old")
    try:
        with _io.atomic_directory(target, overwrite=True) as tmp:
            (tmp_path / tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with _io.atomic_directory(target, overwrite=True) as tmp:
        (tmp_path / tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_writes_get_the_usual_permissions(tmp_path, monkeypatch):
    # The umask is read once at import (reading it means setting it); a typical one:
    monkeypatch.setattr(_io, "_UMASK", 0o022)
    _io.write_text(tmp_path / "a.txt", "x")
    with _io.atomic_directory(tmp_path / "d"):
        pass
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def _dead_pid():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_processs_leftovers_are_removed_by_the_next_write(tmp_path):
    import keras

    import keras_resmem

    target = tmp_path / "m.keras"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".tmp-m.keras.{dead}.abc.keras"
    busy = tmp_path / f".tmp-m.keras.{alive}.def.keras"
    stale_dir = tmp_path / f".tmp-m.keras.{dead}.xyz"
    for path in (stale, busy):
        path.write_bytes(b"partial")
    stale_dir.mkdir()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keras_resmem.save_model(model, target)
    assert not stale.exists() and not stale_dir.exists()
    assert busy.exists()  # a live process may still be writing it
    with pytest.raises(FileExistsError):
        keras_resmem.save_model(model, target, overwrite=False)
    with pytest.raises(ValueError, match="must end in `.keras`"):
        keras_resmem.save_model(model, tmp_path / "m.h5")


def test_an_interrupted_directory_replace_is_restored_by_the_next_write(tmp_path):
    target = tmp_path / "export"
    # What a process killed between its two renames leaves: no `export`, the old
    # version aside, the new one half there.
    old = tmp_path / f".old-export.{_dead_pid()}.q1"
    old.mkdir()
    (old / "version.txt").write_text("old")
    (tmp_path / f".tmp-export.{_dead_pid()}.q2").mkdir()
    with pytest.raises(FileExistsError):
        with _io.atomic_directory(target, overwrite=False):
            pass
    assert (target / "version.txt").read_text() == "old"  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_overwriting_a_directory_keeps_a_whole_version_at_every_step(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "version.txt").write_text("old")
    seen = []
    real_exchange = _io._exchange

    def watching(a, b):
        seen.append((target / "version.txt").read_text())
        done = real_exchange(a, b)
        seen.append((target / "version.txt").read_text())
        return done

    monkeypatch.setattr(_io, "_exchange", watching)
    with _io.atomic_directory(target, overwrite=True) as tmp:
        with open(os.path.join(tmp, "version.txt"), "w") as f:
            f.write("new")
    assert seen == ["old", "new"]  # one step, no moment without a version
    assert (target / "version.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # Where the exchange is not available, a failure in the second rename restores the old.
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def failing_second(src, dst):
        if os.path.basename(src).startswith(".tmp-") and str(dst) == str(target):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_directory(target, overwrite=True) as tmp:
            with open(os.path.join(tmp, "version.txt"), "w") as f:
                f.write("newer")
    assert (target / "version.txt").read_text() == "new"
