"""Atomic file writes: a crash never leaves half a file where a good one was."""

import contextlib
import os
import shutil
import tempfile


def _read_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, and setting it
# on every write would briefly change it for the other threads of the process.
_UMASK = _read_umask()


def refuse_existing(path, overwrite):
    """Raises FileExistsError if `path` exists and `overwrite` is false."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists. Pass overwrite=True to replace it.")


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
        # mkstemp makes the file private (0600); give it the usual permissions.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_model(model, path):
    """`model.save(path)`, but written atomically (Keras truncates `path` first)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


@contextlib.contextmanager
def atomic_directory(path, overwrite=False):
    """Yields a temporary directory beside `path`; moves it onto `path` on success.

    A reader never sees a half-written directory at `path`: on any exception
    the temporary directory is removed and `path` is untouched. When `path`
    exists and `overwrite` is true, the old directory is moved aside, the new
    one renamed in, and only then is the old one deleted.

    Raises:
        FileExistsError: `path` exists and `overwrite` is false.
    """
    path = os.path.abspath(os.fspath(path))
    refuse_existing(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        yield tmp
        # mkdtemp makes the directory private (0700): a server running as another
        # user could not read the model. Give it the usual permissions.
        os.chmod(tmp, 0o777 & ~_UMASK)
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            if os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text):
    """Writes `text` to `path` atomically (creating its directory)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
