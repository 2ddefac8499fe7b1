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
