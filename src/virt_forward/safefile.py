"""Files we write or remove as root outside our own dirs (metrics_file, `uninstall`): never
through a directory someone else controls, never through a symlink (issue 19, item 7).

A node_exporter user who may write its textfile directory could swap it for a symlink and
have the watcher create a root-owned file anywhere.  So, like sshd's StrictModes and
config.py's rule for the config dir: the path is walked from / one component at a time with
directory fds (openat with O_NOFOLLOW, so no component is looked up twice), each directory
must be root's and not writable by group or others (a root-owned sticky directory above
the last one, /tmp, is fine), and the file is created (O_EXCL, O_NOFOLLOW) and renamed
relative to the last directory's fd, never by name from /.
"""

from __future__ import annotations

import errno
import os
import stat

from .config import _check_dir, _quoted
from .errors import ConfigError, VirtForwardError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(path: str) -> tuple[list[str], str]:
    """The directories of an absolute path and its last component; '..' is refused: it
    could only be checked by following the path back up, which is what we do not do."""
    if not path.startswith("/") or "\0" in path:
        raise ConfigError("refused: not an absolute path", path=path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError("refused: a '..' in the path (name the directory itself)", path=path)
    if not parts:
        raise ConfigError("refused: names no file", path=path)
    return parts[:-1], parts[-1]


def _refuse_entry(dir_fd: int, name: str, shown: str, target: str, exc: OSError) -> VirtForwardError:
    """Why `name` in `dir_fd` could not be entered as a directory."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            to = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            to = "?"
        return ConfigError(f"refused: a symlink (to {to!r}) on the way to {target}: a file written as root "
                           f"never follows one (replace it by the directory it names: {_quoted(shown)})", path=shown)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        return ConfigError(f"not a directory (on the way to {target})", path=shown)
    return VirtForwardError(f"{shown}: cannot open (on the way to {target}): {exc.strerror}")


def open_parent(path: str) -> tuple[int, str] | None:
    """(fd of the directory holding `path`, the file's name in it), every directory on the way
    checked before an entry is looked up in it; None when a directory on the way does not
    exist.  The caller closes the fd."""
    dirs, name = _parts(path)
    fd = os.open("/", _DIR_FLAGS)
    shown = "/"
    try:
        for part in dirs:
            _check_dir(shown, os.fstat(fd), f"a directory above {path}", parent=True, below="the file")
            step = os.path.join(shown, part)
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as exc:
                raise _refuse_entry(fd, part, step, path, exc) from None
            os.close(fd)
            fd, shown = nfd, step
        # the file's own directory: no sticky exception (others could plant entries of theirs)
        _check_dir(shown, os.fstat(fd), f"the directory of {path}", parent=False, below="the file")
        return fd, name
    except BaseException:
        os.close(fd)
        raise


def write_strict(path: str, data: bytes, mode: int = 0o644) -> None:
    """`data` into `path` atomically with exactly `mode`: a fresh temp file in the same
    directory (its name ends in .tmp: node_exporter reads *.prom only), fsync-ed, renamed
    over `path`.  The rename replaces the directory entry, never what a symlink there names.
    Raises ConfigError naming the component that is refused, VirtForwardError on I/O errors."""
    opened = open_parent(path)
    if opened is None:
        raise ConfigError(f"cannot write: a directory on the way does not exist (create it, owned by root, "
                          f"mode 0755)", path=path)
    dir_fd, name = opened
    tmp = f"{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:  # left by a process killed mid-write that had our pid
            os.unlink(tmp, dir_fd=dir_fd)
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            try:
                os.fchmod(fd, mode)  # exactly, whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        os.fsync(dir_fd)  # the rename itself survives a power loss
    except OSError as exc:
        raise VirtForwardError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)


def unlink_strict(path: str) -> bool:
    """Remove the regular file `path`, every directory on the way checked as write_strict does;
    False when there is nothing to remove.  Anything but a regular file (a symlink planted
    there, a directory) is refused and left as it is."""
    opened = open_parent(path)
    if opened is None:
        return False
    dir_fd, name = opened
    try:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise ConfigError(f"refused: {kind}, not the file we wrote: left as it is", path=path)
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise VirtForwardError(f"{path}: cannot remove: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)


def exists_strict(path: str) -> bool:
    """Whether unlink_strict(path) would remove a file (`uninstall --dry-run`); raises as it would."""
    opened = open_parent(path)
    if opened is None:
        return False
    dir_fd, name = opened
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise VirtForwardError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise ConfigError(f"refused: {kind}, not the file we wrote: left as it is", path=path)
    return True
