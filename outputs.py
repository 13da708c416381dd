"""
Where commands write: checked before any work, so a long run never fails at its last step, and never
writes over a file it did not create. No torch import: the prepare scripts use it too.

    atomic_write(path, write), write_json     every output file: written to a temp file next to it, then
                                              renamed over it, so no reader or killed writer ever sees
                                              half a file
    check_output(path, overwrite, ours=...)   an output file or folder: refuse a path that exists and is
                                              not ours, or exists without --overwrite=true, or cannot be
                                              written (a file in the way, a read-only folder)
    OutDirLock(out_dir)                       one train.py per out_dir: an flock on out_dir/.train.lock
                                              that names the pid holding it
"""

import atexit
import errno
import fcntl
import json
import os

from errors import UserError

LOCK_NAME = ".train.lock"  # in a training out_dir, while a train.py writes there
PROBE_PREFIX = ".write-probe-"  # writable_folder's probe file, there for a moment


def atomic_write(path, write):
    """Call write(tmp) on a temp file next to `path`, then rename it to `path`: `path` holds the old
    file or the new one, never half of one. The file gets the usual permissions (0644 with the usual
    umask; safetensors creates files private). A failed write is one line and leaves no temp file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """`obj` as indented JSON at `path`, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def is_json_with(path, keys):
    """Whether `path` holds a JSON object with exactly these top-level keys (an earlier result of the
    command that writes them: the only kind of file its --overwrite=true replaces)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and set(obj) == set(keys)


def writable_folder(folder, setting=""):
    """Raise a UserError unless files can be created in `folder` (or, if it does not exist yet, in the
    nearest folder above it, where it would be created). Probes by creating and removing a temp file:
    permission bits alone do not tell (root, read-only mounts, ACLs). `setting` (e.g.
    "--out_dir=runs/a") starts the message."""
    where = f"{setting}: " if setting else ""
    folder = os.path.abspath(folder)
    probe_in = folder
    while not os.path.exists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise UserError(f"{where}cannot write to {folder}: {probe_in} is a file, not a folder; choose another path")
    probe = os.path.join(probe_in, f"{PROBE_PREFIX}{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{where}cannot write to {folder}: {e.strerror or e}; choose another path") from None


def check_output(path, overwrite=False, ours=None, folder=False, what="output", key="--out"):
    """Refuse, before any work starts, an output `path` (a file, or with folder=True a folder) that:
    is the wrong kind (a folder for a file, a file for a folder); already exists (a non-empty folder)
    and overwrite is off; exists and `ours(path)` says it is not something this command writes (then
    even --overwrite=true does not replace it); or cannot be written."""
    name = f"{key}={path}"
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise UserError(f"{name} is a file, not a folder; choose a folder for the {what}")
        if not folder and os.path.isdir(path):
            raise UserError(f"{name} is a folder; give a file name for the {what}")
        if not folder or os.listdir(path):
            if ours is not None and not ours(path):
                raise UserError(f"{name} already exists and holds something this command did not write; "
                                f"choose another {key}")
            if not overwrite:
                raise UserError(f"{name} already exists; replace it with --overwrite=true, or choose another {key}")
    writable_folder(path if folder else os.path.dirname(os.path.abspath(path)), name)


class OutDirLock:
    """One writer per training out_dir. flock (not a pid file): the kernel releases it when the holder
    dies however it dies (SIGKILL, OOM, power cut), so a lock left by a killed run is stale by
    construction and the next run takes it over; a reused pid cannot fake a live holder. The file holds
    the holder's pid, for the message. Removed when the holder exits, and with it out_dir if this run
    created it and wrote nothing there (a run that stopped at a bad setting leaves no empty folder)."""

    def __init__(self, out_dir, remove_folder=False):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.remove_folder = remove_folder
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write to {out_dir}: {e.strerror or e}; choose another --out_dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise UserError(f"cannot lock {self.path} ({e.strerror or e}): this file system offers no flock; "
                                    f"choose an --out_dir on a local disk") from None
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{out_dir} is in use by another train.py (pid {holder}); wait for it to end, "
                                f"stop it, or choose another --out_dir") from None
            try:  # the holder removes the file as it exits: a lock on a removed file locks nothing, retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        atexit.register(self.release)

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # still holding the lock: no other run can be using this file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.remove_folder:
            try:
                os.rmdir(os.path.dirname(self.path))  # only if empty
            except OSError:
                pass
