"""Atomic file writes: a crash never leaves half a file where a good one was."""

import contextlib
import ctypes
import errno
import glob
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


def _prefix(path, kind):
    """The name prefix of the temporary files of writes to `path`: `.tmp-<name>.<pid>.`."""
    return os.path.join(os.path.dirname(path), f".{kind}-{os.path.basename(path)}.{os.getpid()}.")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(path, kind):
    """Temporary files or directories of earlier writes to `path` whose process has died."""
    pattern = os.path.join(
        glob.escape(os.path.dirname(path)), f".{kind}-{glob.escape(os.path.basename(path))}.*"
    )
    out = []
    for found in glob.glob(pattern):
        pid = os.path.basename(found)[len(kind) + len(os.path.basename(path)) + 3 :]
        pid = pid.split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            out.append(found)
    return out


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _fsync(path):
    """Flushes a file, or a directory's entries, to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name))
            for name in dirs:
                _fsync(os.path.join(root, name))
    _fsync(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    The file is flushed to disk before the rename, and the rename after it,
    so that a power cut leaves the old file or the new one. The temporary
    name keeps the suffix of `path`, because Keras picks the file format from
    it; it names the writing process, so that the next write to `path`
    removes what a killed process left behind.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    for leftover in _leftovers(path, "tmp"):
        _remove(leftover)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=os.path.basename(_prefix(path, "tmp")), suffix=suffix
    )
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the usual permissions.
        os.chmod(tmp, 0o666 & ~_UMASK)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_model(model, path):
    """`model.save(path)`, but written atomically (Keras truncates `path` first)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a, b):
    """Swaps the directory entries `a` and `b` in one step (Linux `renameat2`).

    Returns False where the system cannot (another OS, an old kernel, a file
    system without it).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), a)


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
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _recover(path)
    refuse_existing(path, overwrite)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(_prefix(path, "tmp")))
    try:
        yield tmp
        # mkdtemp makes the directory private (0700): a server running as another
        # user could not read the model. Give it the usual permissions.
        os.chmod(tmp, 0o777 & ~_UMASK)
        _fsync_tree(tmp)
        if not os.path.exists(path):
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            # One step: `path` always holds a whole version, old or new.
            _remove(tmp)  # now the old version
        else:
            # Two renames. A process killed between them leaves the old version
            # at `.old-<name>.<pid>.*`, and the next write to `path` restores it.
            old = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(_prefix(path, "old")))
            os.rmdir(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        _fsync(parent)
    except BaseException:
        _remove(tmp)
        raise


def _recover(path):
    """Cleans up after a write to `path` that a killed process left half done."""
    olds = _leftovers(path, "old")
    if olds and not os.path.exists(path):
        os.replace(max(olds, key=os.path.getmtime), path)  # the version it replaced
    for leftover in _leftovers(path, "old") + _leftovers(path, "tmp"):
        _remove(leftover)


def write_text(path, text):
    """Writes `text` to `path` atomically (creating its directory)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
