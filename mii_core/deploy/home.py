"""``$MII_HOME``: where mii keeps its registry and logs, and the one rule for trusting it.

Whoever can write into ``$MII_HOME`` can plant a record that points ``mii.client(name)``
(with its bearer token and prompts) at another port, or a symbolic link at a log path
that ``serve()`` would append to. So the directory and its ``deployments`` and ``logs``
folders must belong to the current user and be writable by nobody else (a home that is
not is refused, not repaired: mii cannot know who else uses it); mii creates them 0700.
Files in it are opened without following symbolic links (``O_NOFOLLOW``) and used only
if they are regular files of the current user that no one else may read or write.
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path
from typing import IO, Optional

from mii_core.errors import ConfigError

SUBDIRS = ("deployments", "logs")
_PRIVATE_FILE = 0o600


def home_root() -> Path:
    """``$MII_HOME``, else ``$XDG_CACHE_HOME/mii``, else ``~/.cache/mii`` (not checked)."""
    root = os.environ.get("MII_HOME")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(cache, "mii")
    return Path(root)


def safe_home() -> Path:
    """The checked ``$MII_HOME`` (its folders created 0700 where missing); ConfigError,
    naming the directory, its mode and owner and what to do, if another user owns it or
    anyone but its owner may write to it."""
    root = home_root()
    for path in (root, *(root / sub for sub in SUBDIRS)):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(path)  # a home that is a link to a directory of ours is fine
        except OSError as error:
            raise ConfigError(f"MII_HOME: cannot create or read {path}: "
                              f"{describe_os_error(error, path)}") from None
        problem = _unsafe(info, directory=True)
        if problem:
            raise ConfigError(
                f"MII_HOME: refusing to use {path}: it {problem} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}, owner {_owner(info.st_uid)}); another "
                f"user could plant deployment records or logs there. Make it yours and "
                f"private (chown {_owner(os.geteuid())} {path}; chmod 700 {path}) or set "
                f"MII_HOME to a directory of your own.")
    return root


def _unsafe(info: os.stat_result, directory: bool) -> Optional[str]:
    """Why a file or directory of ``$MII_HOME`` cannot be trusted (None: it can)."""
    if directory and not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.geteuid():
        return f"belongs to {_owner(info.st_uid)}, not to you ({_owner(os.geteuid())})"
    # Directories may be readable by others (their names are no secret); files hold tokens.
    loose = stat.S_IMODE(info.st_mode) & (0o022 if directory else 0o077)
    if loose:
        return f"is {'writable' if loose & 0o022 else 'readable'} by others than its owner"
    if not directory and info.st_nlink != 1:
        return f"has {info.st_nlink} hard links"
    return None


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def open_private(path: Path | str, flags: int) -> int:
    """``os.open`` of a file under ``$MII_HOME`` that never follows a symbolic link
    (``O_NOFOLLOW``; created 0600 with ``O_CREAT``), checked to be a private regular file
    of this user, and made 0600 through the descriptor. Returns the descriptor; OSError
    if it cannot be opened (ELOOP for a link), ConfigError naming the file if it is
    someone else's or shared."""
    # O_NONBLOCK: a FIFO planted there must not block the open (it is refused below).
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, _PRIVATE_FILE)
    try:
        os.set_blocking(fd, True)
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and flags & (
                os.O_WRONLY | os.O_RDWR):
            os.fchmod(fd, _PRIVATE_FILE)  # a file we write is ours; tighten an old one
            info = os.fstat(fd)
        problem = _unsafe(info, directory=False)
        if problem:
            raise ConfigError(f"MII_HOME: refusing to use {path}: it {problem} (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_text(path: Path | str) -> IO[str]:
    """A private file of this user under ``$MII_HOME`` opened for reading text (see
    ``open_private``; undecodable bytes replaced)."""
    return os.fdopen(open_private(path, os.O_RDONLY), "r", errors="replace")


def read_private(path: Path | str) -> str:
    """The text of a private file of this user under ``$MII_HOME`` (see ``open_private``)."""
    with open_private_text(path) as handle:
        return handle.read()


def refusal(path: Path | str, error: OSError) -> str:
    """Why ``open_private`` refused ``path``, for a reader that skips the file."""
    if error.errno == errno.ELOOP:
        return f"{path} is a symbolic link (mii does not follow links in MII_HOME)"
    return describe_os_error(error, path)


def describe_os_error(error: OSError, path: Path | str) -> str:
    """``error`` in words that name the file, the errno and, for a full disk, the space
    left: ``no space left on device: /home/u/.cache/mii/deployments/x.json (ENOSPC,
    errno 28; 0 B of 64.0 KiB free on its filesystem)``."""
    code = error.errno
    text = (error.strerror or os.strerror(code or 0) or str(error)).lower()
    name = errno.errorcode.get(code, "?") if code is not None else "no errno"
    where = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        where = _free_space(Path(path))
    return f"{text}: {path} ({name}, errno {code}{where})"


def _free_space(path: Path) -> str:
    for directory in (path, *path.parents):
        try:
            fs = os.statvfs(directory)
        except OSError:
            continue
        return f"; {_size(fs.f_bavail * fs.f_frsize)} of {_size(fs.f_blocks * fs.f_frsize)} " \
               f"free on its filesystem"
    return ""


def _size(count: int) -> str:
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
