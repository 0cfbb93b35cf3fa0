"""Writing files safely: the one guard every command's outputs pass through.

Before any work, :func:`check_outputs` refuses, in one line naming the flag and the fix:

- an output that is one of the command's inputs (``--tensor`` naming the ``--checkpoint``),
  compared after resolving links, and two outputs naming the same file;
- a folder, or anything that is not a regular file (a device such as /dev/full, a FIFO):
  ``--force`` never replaces those;
- an existing file, unless ``--force``;
- a path under a file, or in a folder this user cannot write to; and, when the size is known,
  a disk without room for it.

It creates nothing: a refused command leaves no new empty folders. Then :func:`write_file`
writes each output through a temporary file in the same folder (created with the user's
umask, so a group can read it as it reads the user's other files), flushed to disk and
renamed over the target (``os.replace``): an interrupted write leaves the old file or none,
never half a file. A full disk is one line saying which file, how much it needs, how much
is free, and what is left; the folders a failed write created are removed again.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

# A write in progress renames its temporary file within seconds, so a temporary file of the
# same target untouched for this long was left by a write that was killed (kill -9, power cut).
STALE_TMP_SECONDS = 60
# Beyond the tensors' bytes, a torch.save file holds a pickle and zip headers: a few kB.
SAVE_OVERHEAD_BYTES = 64 * 1024


class DiskFullError(OSError):
    """A file could not be written for lack of space; the message says what is left."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal after resolving links, or the same inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                       # one of them does not exist (yet)
        return False


def _existing_ancestor(path: Path) -> Path:
    """The deepest folder on ``path``'s way that exists already (where new folders would be made)."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def free_bytes(folder: Path) -> int | None:
    """Bytes free for this user on the file system holding ``folder`` (None when unknown)."""
    try:
        return shutil.disk_usage(_existing_ancestor(Path(folder) / "x")).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """Bytes for a person: 950 B, 12.3 kB, 4.1 MB, 2.0 GB, 3.1 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def disk_full_message(path: Path, need: int | None, left: str, full: bool = True) -> str:
    """One line for a full disk (``full``) or one without room (before writing): the file, the
    bytes it needs and those free, and what is left."""
    free = free_bytes(path.parent)
    needs = f"it needs about {size_text(need)}" if need else "it needs more space"
    frees = f", {size_text(free)} {'is' if free == 1 else 'are'} free there" if free is not None else ""
    what = "disk full: cannot write" if full else "not enough disk space for"
    return f"{what} {path} ({needs}{frees}); {left}"


def check_outputs(outputs: dict, inputs: dict | None = None, force: bool = False, sizes: dict | None = None,
                  examples: dict | None = None, exists_hint: str | None = None) -> dict:
    """Check every output of a command before any work; return {flag: Path} of those given.

    ``outputs`` / ``inputs``: {flag: path or None} (e.g. {"--png": "grid.png"}, {"--checkpoint": ...}).
    ``force``: replace existing regular files. ``sizes``: {flag: bytes} when known, checked
    against the free space. ``examples``: {flag: file name} suggested when a folder is given.
    ``exists_hint``: the advice for an existing file (default: ``--force`` or another path).
    Raises ValueError (or OSError for a folder this user cannot write to); creates nothing."""
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None and str(p) != ""}
    sources = {flag: Path(p) for flag, p in (inputs or {}).items() if p is not None and str(p) != ""}
    for flag, path in given.items():
        example = (examples or {}).get(flag, "out.pt")
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file path such as {path / example}")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
        for source_flag, source in sources.items():
            if _same_file(path, source):
                raise ValueError(f"{flag} {path} is the {source_flag} file itself: writing it would destroy the "
                                 f"{source_flag} it reads; choose another {flag}")
        for other_flag, other in given.items():
            if other_flag != flag and _same_file(path, other):
                raise ValueError(f"{flag} and {other_flag} both name {path}; give each its own file")
        if path.exists() or path.is_symlink():
            try:
                mode = path.stat().st_mode
            except OSError:                       # a link to nowhere: the link is replaced
                mode = stat.S_IFREG
            if not stat.S_ISREG(mode):
                raise ValueError(f"{flag} {path} is {_kind(mode)}, not a file; choose a file path "
                                 "(--force never replaces it)")
            if not force:
                hint = exists_hint or f"pass --force to overwrite it, or choose another {flag}"
                raise ValueError(f"{path} already exists; {hint}")
        _check_writable(path, flag)
        need = (sizes or {}).get(flag)
        free = free_bytes(path.parent)
        if need and free is not None and free < need:
            raise DiskFullError(disk_full_message(path, need, "nothing was written; free some space or "
                                                  f"choose another {flag}", full=False))
    return given


def _check_writable(path: Path, flag: str) -> None:
    """Try creating (and at once deleting) a file where ``path``'s folders would be made."""
    where = path.parent if path.parent.is_dir() else _existing_ancestor(path)
    probe = where / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as err:            # a read-only folder or disk, no permission
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err} (in {where}); choose a folder "
                                 f"you can write to for {flag}") from err


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.*.tmp`` files that a write killed outright left beside ``path``."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:          # gone already, or not ours to delete: leave it
            pass


class _Recorder:
    """A binary file that remembers the OSError of a failed write. torch.save reports a full
    disk as '[enforce fail at inline_container.cc] unexpected pos'; the errno is kept here."""

    def __init__(self, f):
        self.f, self.error, self.written = f, None, 0

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as err:
            self.error = err
            raise
        self.written += len(data) if n is None else n
        return n

    def __getattr__(self, name):       # flush, tell, seek, ... of the real file
        return getattr(self.f, name)


def what_is_left(path, absent: str = "no file was written") -> str:
    """What a failed write to ``path`` leaves there: its old file (writes are atomic, so a failed one
    changes nothing), or ``absent`` where there was none."""
    return f"{path} still holds its previous contents" if Path(path).exists() else absent


def write_file(path, write, need: int | None = None, left: str | None = None) -> Path:
    """Write a file atomically: ``write(f)`` fills a binary temporary file beside ``path``,
    which is flushed to disk and renamed over ``path``. Missing folders are made, and removed
    again if the write fails. ``need``: the expected size in bytes, for the message on a full
    disk; ``left``: what that message says is left (default: the old file or none)."""
    path = Path(path)
    if path.is_symlink():                 # write where the link points: the link stays a link
        path = path.resolve()
    free = free_bytes(path.parent)
    if need and free is not None and free < need:
        raise DiskFullError(disk_full_message(path, need, left or what_is_left(path), full=False))
    made = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)   # 0o666 & ~umask, as open() makes files
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        for folder in reversed(made):        # deepest first; only folders this write made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        full = (recorder is not None and recorder.error is not None and recorder.error.errno == errno.ENOSPC) or \
            (isinstance(err, OSError) and err.errno == errno.ENOSPC)
        if full and not isinstance(err, DiskFullError):
            written = recorder.written if recorder is not None else 0
            raise DiskFullError(disk_full_message(path, max(need or 0, written), left or what_is_left(path))) from err
        raise
    return path


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists, tuples): about what torch.save writes."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save(obj, path, left: str | None = None) -> Path:
    """``torch.save(obj, path)`` through :func:`write_file`."""
    import torch
    return write_file(path, lambda f: torch.save(obj, f), need=tensor_bytes(obj) + SAVE_OVERHEAD_BYTES, left=left)
