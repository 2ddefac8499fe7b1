"""Atomic file writes: a crash never leaves half a file where a good one was."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    The temporary name keeps the suffix of `path`, because Keras picks the file
    format from it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_model(model, path):
    """`model.save(path)`, but written atomically (Keras truncates `path` first)."""
    with atomic_path(path) as tmp:
        model.save(tmp)
