"""Small file-system helpers shared by the lock and the counter.

Every path is opened relative to a directory descriptor, never through a symlink, never
blocking on a FIFO, and accepted only if it is a regular file of the user taskrunner runs as.
"""

from __future__ import annotations

import errno
import os
import stat

from taskrunner.errors import Unusable

OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK

_REASONS = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ELOOP: "is a symbolic link",
    errno.ENAMETOOLONG: "file name too long",
    errno.EISDIR: "is a directory",
    errno.ENXIO: "is a FIFO or device",
    errno.EIO: "input/output error",
    errno.EMFILE: "too many open files",
}


def reason(exc: OSError) -> str:
    """A short reason for an OSError, without the path (the caller names the path)."""
    if exc.errno is None:
        return str(exc)
    return _REASONS.get(exc.errno) or os.strerror(exc.errno).lower()


def close(fd: int) -> None:
    """Close ``fd``, whatever close says: Linux frees the descriptor even when it reports EIO
    or EINTR, and our files are synced before, or only read."""
    try:
        os.close(fd)
    except OSError:
        pass


_CAVEATS = {
    "nfs": "flock is carried by NFS byte-range locks: it holds across hosts with NFSv4 (or "
    "NFSv3 with lockd); a client cut off from the server can lose its lock without knowing",
    "cifs": "flock on CIFS/SMB holds only among processes of this host, not across hosts",
    "fuse": "flock on a FUSE file system holds only on this host, unless the file system "
    "passes locks on to its server",
}


def filesystem(fd: int) -> str | None:
    """The type of the file system ``fd`` is on, from /proc/self/mountinfo (Linux)."""
    try:
        dev = os.fstat(fd).st_dev
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and "-" in fields:
            after = fields[fields.index("-") + 1 :]
            return after[0] if after else None
    return None


def caveat(fstype: str | None) -> str | None:
    """What a lock on a file system of type ``fstype`` cannot promise, if anything."""
    if fstype is None:
        return None
    family = (
        "nfs"
        if fstype.startswith("nfs")
        else "cifs"
        if fstype in ("cifs", "smb3")
        else ("fuse" if fstype.startswith("fuse") else None)
    )
    return None if family is None else f"the lock is on {fstype}: {_CAVEATS[family]}"


def discard(name: str, dirfd: int) -> None:
    """Remove ``name`` in ``dirfd`` if it can be: for undoing, where failing changes nothing."""
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def kind(mode: int) -> str:
    """What a file of this mode is, for a refusal message."""
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is not a regular file"


def open_parent(path: str, error: type[Unusable]) -> tuple[int, str]:
    """A descriptor for the directory of ``path``, and the file name within it; raises
    ``error`` if there is no such directory or ``path`` names no file.

    The directory is reached one component at a time, and every directory on the way must
    belong to root or to the user taskrunner runs as, and be sticky if others may write to it
    (as /tmp is): whoever else controls a directory can rename our files away and put their
    own in place. A symlink on the way is followed only if it belongs to root or to that
    user: ``/var/run -> /run`` is fine, one planted in /tmp could send the files anywhere."""
    head, name = os.path.split(path)
    head = head or "."
    if name in ("", ".", ".."):
        raise error(path, "is a directory, not a file path")
    try:
        return _walk(head, path, error), name
    except OSError as exc:
        raise error(path, f"directory {head}: {reason(exc)}") from None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_LINKS = 40  # as the kernel allows in one lookup


def _walk(head: str, path: str, error: type[Unusable]) -> int:
    where = "/" if head.startswith("/") else "."
    fd = os.open(where, _DIR_FLAGS)
    todo = [p for p in head.split("/") if p not in ("", ".")]
    links = 0
    try:
        _check_dir(fd, where, path, error)
        while todo:
            part = todo.pop(0)
            try:
                step = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                if st.st_uid not in (0, os.geteuid()):
                    raise error(
                        path, f"goes through a symlink, {part}, that belongs to uid {st.st_uid}"
                    ) from None
                if st.st_nlink > 1:  # someone's hard link to a symlink of root's, elsewhere
                    raise error(
                        path, f"goes through a symlink, {part}, with {st.st_nlink} links"
                    ) from None
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    close(fd)
                    fd = -1
                    fd = os.open("/", _DIR_FLAGS)
                    where = "/"
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            close(fd)
            fd = step
            where = os.path.join(where, part)
            _check_dir(fd, where, path, error)
        return fd
    except BaseException:
        if fd >= 0:
            close(fd)
        raise


def _check_dir(fd: int, where: str, path: str, error: type[Unusable]) -> None:
    st = os.fstat(fd)
    shown = "the current directory" if where == "." else f"directory {where}"
    if st.st_uid not in (0, os.geteuid()):
        raise error(path, f"{shown} belongs to uid {st.st_uid}, who could swap the files in it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise error(path, f"{shown} may be written by others and is not sticky")


def check_ours(st: os.stat_result) -> str | None:
    """Why a file at a lock or counter path cannot be used, or None if it can."""
    if not stat.S_ISREG(st.st_mode):
        return kind(st.st_mode)
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


def still_named(dirfd: int, name: str, st: os.stat_result) -> bool:
    """Whether ``name`` in ``dirfd`` still names the file ``st`` describes."""
    try:
        return same_file(os.stat(name, dir_fd=dirfd, follow_symlinks=False), st)
    except FileNotFoundError:
        return False


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` at the start of the file ``fd``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)
