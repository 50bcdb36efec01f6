"""The run folder: one process owns it, and what it holds survives kills, full disks and restarts.

    RUN/.lock            exists while a process trains into RUN: an exclusive flock held for the life of
                         that process (the kernel releases it however the process ends), with its PID and
                         host written inside for the message a second process gets
    RUN/metrics.jsonl    one JSON row per line, appended whole and flushed; a torn last line (a kill or a
                         full disk in the middle of a write) is dropped when the file is read
    RUN/.NAME.tmp-*      unfinished writes (a checkpoint folder, a file being replaced); a kill can leave
                         them behind, and they are removed when the next process claims the folder

Only the main process (rank 0) claims a folder and writes into it; the other ranks get a RunFolder that
holds nothing. Usage in the training loop:

    folder = claim(run_dir)            # refuses a folder in use; removes what killed runs left
    try:
        trim_metrics(folder.metrics, keep_row)     # on resume: the rows up to the checkpoint; else: none
        ...
        append_metrics(folder.metrics, row)        # one row per epoch
    finally:
        folder.close()
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import PixformerError
from ..files import write_atomically
from ..progress import notice

LOCK = ".lock"
LEFTOVERS = ".*.tmp-*"          # the temporary names `write_atomically` and save_checkpoint write under


class RunFolder:
    """A run folder claimed by this process (see `claim`). `close()`, or leaving a `with` block, releases it;
    without either it stays held until the process ends (dropping the object does not release it).
    `owned` is False on the ranks other than 0: they hold no lock and write nothing."""

    def __init__(self, path: Path, fd: int | None = None, created: bool = False):
        self.path, self._fd, self._created = path, fd, created
        self.metrics = path / "metrics.jsonl"

    @property
    def owned(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the folder. The lock file is removed while the lock is still held (a process that opened
        it meanwhile sees that it was removed and opens the new one), then the lock is let go. A folder that
        `claim` created and nothing else filled (a run that failed before writing) is removed too."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            (self.path / LOCK).unlink(missing_ok=True)
            if self._created:
                try:
                    self.path.rmdir()           # only when empty
                except OSError:
                    pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def claim(run_dir: str | Path, say: Callable[[str], None] = notice, rank: int | None = None) -> RunFolder:
    """Take `run_dir` (created if needed) for this process until `close()` or the process ends.

    A folder held by a live process is refused: "RUN is in use by process 1234 on HOST; wait for it or
    choose another --out". The lock of a process that died is taken over (the kernel released it), said in
    one line. Unfinished writes a killed run left (`.checkpoint.tmp-*`, ...) are removed. `rank`: this
    process's rank (default: $RANK, else 0); only rank 0 claims, the others get a RunFolder holding nothing."""
    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        return RunFolder(run_dir)
    created = not run_dir.exists()
    lock = run_dir / LOCK
    for _ in range(100):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:      # the owner removed the folder it had created as we came: again
            continue
        except OSError as e:
            raise PixformerError(f"cannot use {run_dir} as the run folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _owner(fd, wait=True) if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else None
            os.close(fd)
            if owner is None:
                raise PixformerError(f"cannot lock {lock} ({e.strerror or e}): the filesystem refuses locks; "
                                     "choose another --out") from None
            raise PixformerError(f"{run_dir} is in use by {owner}; wait for it or choose another --out") from None
        if _same_file(fd, lock):
            break
        os.close(fd)                   # the owner released the folder between our open and our lock: again
    else:
        raise PixformerError(f"cannot lock {lock}: other processes keep taking and releasing {run_dir}")
    previous = _owner(fd, wait=False)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise PixformerError(f"cannot write {lock} ({e.strerror or e})") from None
    if previous:
        say(f"{run_dir} was left locked by {previous}, which is no longer running; taking it over")
    removed = remove_leftovers(run_dir)
    if removed:
        say(f"removed {len(removed)} unfinished write(s) a killed run left in {run_dir}: {', '.join(removed)}")
    return RunFolder(run_dir, fd, created)


def _owner(fd: int, wait: bool) -> str | None:
    """'process PID on HOST' from an open lock file; an owner that holds the lock but has not yet written
    its PID is waited for briefly (`wait`), else it is 'another process'. None for an empty file."""
    for _ in range(20 if wait else 1):
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(text) >= 2:
            return f"process {text[0]} on {text[1]}"
        if wait:
            time.sleep(0.05)
    return "another process" if wait else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_leftovers(run_dir: str | Path) -> list[str]:
    """Remove the unfinished writes (`.checkpoint.tmp-*`, `.metrics.jsonl.tmp-*`, ...) a killed process left
    in `run_dir`; returns their names. Call it only while holding the folder (`claim` does)."""
    removed = []
    for p in sorted(Path(run_dir).glob(LEFTOVERS)):
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise PixformerError(f"cannot remove {p}, an unfinished write a killed run left ({e.strerror or e})") from None
        removed.append(p.name)
    return removed


# ---- files replaced whole, and metrics.jsonl -------------------------------------------------------
def read_metrics(path: str | Path, say: Callable[[str], None] = notice) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl ([] when there is none). A torn last line (a kill or a full disk in the
    middle of a write) is dropped, said in one line; a line that is not JSON elsewhere is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise PixformerError(f"cannot read {path} ({e.strerror or e})") from None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i == last:
            say(f"dropped a torn last line of {path}")
        else:
            raise PixformerError(f"{path} line {i + 1} is not a JSON row ({line[:40]!r}); repair or delete that line")
    return rows


def trim_metrics(path: str | Path, keep_row: Callable[[dict[str, Any]], bool] | None,
                 say: Callable[[str], None] = notice) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl at the start of a run with the rows `keep_row` keeps, atomically; returns them.
    On resume, `keep_row` keeps the rows up to the checkpoint (those after it are computed again); a run
    that starts without a checkpoint passes None and starts the file empty (no duplicate rows). A torn
    last line is dropped (`read_metrics`). No file is created when there is none and nothing is kept."""
    path = Path(path)
    if not path.exists():
        return []
    rows = read_metrics(path, say)
    kept = [r for r in rows if keep_row(r)] if keep_row is not None else []
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def append_metrics(path: str | Path, row: dict[str, Any], fsync: bool = False) -> None:
    """Append one row to metrics.jsonl as one line, in one write, flushed (and synced to disk with `fsync`).
    A failed write (a full disk) stops the run with a one-line error; a part of the line it may leave is
    dropped when the run resumes."""
    line = json.dumps(row) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise PixformerError(f"cannot append to {path} ({e.strerror or e})") from None
