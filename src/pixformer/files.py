"""Files written whole or not at all, and JSON read with one-line errors: what every layer that writes
a file or reads a settings file uses (this module imports nothing of pixformer but its error).

    with written(path) as tmp:       # write the new content to tmp; it replaces path when the block
        tmp.write_text(text)         # ends without error, flushed to disk first
    write_atomically(path, text)     # the same, for text or bytes in hand
    output_folder(out)               # a command's --out checked writable before any work
    as_created(path)                 # a file or folder given what open() / mkdir() would give it, not 0600 / 0700
    read_json_object(path, "a run's settings")

A write that fails (a full disk, a read-only folder, a name too long, a file where a folder should be)
leaves the old file as it was, no partial one, and is one line naming the path. The temporary file is
named `.NAME.tmp-PID-RANDOM` beside the target, so two writers never share one, and a run folder's
claim removes those a killed process left (engine/rundir.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import PixformerError


def _why(e: OSError) -> str:
    return e.strerror or str(e)


@contextlib.contextmanager
def written(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; it is flushed to disk and replaces `path` when
    the block ends without error. An OSError (here or in the block) is one PixformerError naming `path`
    (saying the previous file is kept, when there is one), and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as f:                   # the bytes durable before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = "; the previous file is kept" if path.exists() else ""
        raise PixformerError(f"cannot write {path} ({_why(e)}){kept}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """This process's umask: read where Linux shows it, else set and put back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: str | Path) -> Path:
    """Give `path` (a file, or a folder and all it holds) the permissions open() and mkdir() give under
    the umask (0666 and 0777 masked; special bits kept): tempfile's folders and safetensors' files are
    the owner's alone (0700, 0600), which would keep a run, an export or a download from the users and
    containers meant to read it. Links and what this process may not change are left as they are."""
    path, mask = Path(path), _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        with contextlib.suppress(OSError):
            st = p.lstat()
            if not p.is_symlink() and st.st_uid == os.geteuid():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask | st.st_mode & 0o7000)
    return path


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (text or bytes): a reader, or a kill, sees the old file or the new one."""
    with written(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def output_folder(path: str | Path) -> Path:
    """The folder `path`, made if need be and checked writable, before any work is done: a file in its
    place, a read-only or full disk, a name too long are one line naming it."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise PixformerError(f"{path} is a file, not a folder: choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as f:
            f.write(b"pixformer")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise PixformerError(f"cannot write into {path} ({_why(e)})") from None
    return path


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (`what` names what it should be, for the error): its dict,
    or one line naming the file when it is unreadable or holds something else."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PixformerError(f"{path} is unreadable ({e})") from None
    if not isinstance(value, dict):
        raise PixformerError(f"{path} holds a JSON {type(value).__name__}, not {what}")
    return value


def json_object_or_empty(path: str | Path) -> dict[str, Any]:
    """The object a JSON file holds, or {} where the file is missing, unreadable or holds something else
    (for asking whether a file is one of ours, where anything else is simply not)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
