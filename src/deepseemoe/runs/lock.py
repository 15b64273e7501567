"""One writer per run directory, and replacing a run only when the new one is complete.

The lock is an advisory `flock` on a hidden file beside the run (`.NAME.lock`): the kernel drops
it when the process ends, however it ends (kill -9 included), so a lock never goes stale. A new
run is built in `.NAME.staging` beside the run and swapped in whole: an atomic exchange of the
two folders where the kernel offers one (Linux renameat2 RENAME_EXCHANGE), else two renames,
with the old run kept as `.NAME.old` until the new one is in place (and restored from there
by the next writer if a process died between the two).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError


def sidecar(run_dir: Path, what: str) -> Path:
    return run_dir.parent / f".{run_dir.name}.{what}"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the write lock of `run_dir` (a sidecar file, removed on release: a finished or refused
    writer leaves nothing beside the run); a second writer is refused in one line."""
    import fcntl

    run_dir = Path(run_dir)
    path = sidecar(run_dir, "lock")
    while True:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise DeepSeeMoEError(f"cannot write beside {run_dir} ({exc.strerror}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DeepSeeMoEError(f"{run_dir} is being written by {holder}; wait for it to finish or choose "
                                  "another --out") from None
        try:  # the file we locked must still be the one at the path (its last holder removes it on release)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding the lock: a writer that opened it meanwhile sees another inode
        os.close(fd)  # releases the lock


def recover(run_dir: Path, keep_staging: bool = False) -> None:
    """Under the lock: finish what a writer killed mid-swap left, and drop its staging folder
    (unless the caller resumes from it)."""
    old, staging = sidecar(run_dir, "old"), sidecar(run_dir, "staging")
    if old.exists():
        if run_dir.exists():
            shutil.rmtree(old)  # the new run was already in place
        else:
            os.rename(old, run_dir)  # killed between the two renames: the old run comes back
    if staging.exists() and not keep_staging:
        shutil.rmtree(staging)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ≥ 3.15); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


def swap_in(staging: Path, run_dir: Path) -> None:
    """Make the complete `staging` folder the run at `run_dir`, replacing any old run whole."""
    if not run_dir.exists():
        os.rename(staging, run_dir)
        return
    if _exchange(staging, run_dir):
        shutil.rmtree(staging)  # now holds the old run
        return
    old = sidecar(run_dir, "old")
    os.rename(run_dir, old)
    os.rename(staging, run_dir)
    shutil.rmtree(old)


def atomic_dir(path: str | Path, write) -> Path:
    """Build a folder with `write(tmp)` beside `path`, then swap it in whole (replacing an old one):
    readers see the old folder or the new one, never a mix. Permissions as under the usual umask."""
    import tempfile

    from deepseemoe.runs.atomic import file_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".staging"))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            os.chmod(f, (file_mode() | 0o111) if f.is_dir() else file_mode())
        os.chmod(tmp, file_mode() | 0o111)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
