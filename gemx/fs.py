"""Atomic writes: every artifact appears whole or not at all, and never over something gemx did not write.

Files are written to a hidden temporary sibling and moved into place; directories are filled in a hidden
temporary sibling and renamed into place. What is at the target is checked again at the moment of the
move, not only when the command started: a file or folder that appeared meanwhile is left alone unless
the caller was told to replace it (--force) and, for a folder, the folder is one gemx wrote. Temporaries
are named `.NAME.gemx-PID-XXXX.tmp`; those of a killed run (its process is gone) are removed by the next
write of the same NAME. Operating-system refusals (read-only folder, full disk, a directory in the way)
become one GemxError naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gemx.errors import GemxError

TMP_MARK = ".gemx-"
# Every folder gemx writes lists its files here when it moves into place (as pip's RECORD does for a package):
# --force replaces only what this lists, never a file a user put there afterwards.
INVENTORY = ".gemx-files.json"
# What programs gemx runs write into its folders after the fact (Python's bytecode beside a Triton model).
WRITTEN_LATER = ("__pycache__",)
_stop = {"requested": False}


def cache_root() -> Path:
    """Where gemx keeps what it can make again (exports per checkpoint and block size, decoded frames): $GEMX_CACHE,
    or ~/.cache/gemx."""
    return Path(os.environ.get("GEMX_CACHE", Path.home() / ".cache" / "gemx"))


def request_stop() -> None:
    """Ask every later commit to refuse (Ctrl-C, SIGTERM). The signal handler also raises KeyboardInterrupt,
    but Python drops an exception raised while a finalizer runs; this flag makes the stop certain anyway."""
    _stop["requested"] = True


def stop_requested() -> bool:
    return _stop["requested"]


def stop_handled() -> None:
    """A command that handled the interrupt itself (profile keeps the rows measured so far) may write again."""
    _stop["requested"] = False


def before_replace(path: Path) -> None:
    """Called between the last check of a target and the move into it (tests make races deterministic here)."""


def _last_check(path: Path) -> None:
    before_replace(path)
    if _stop["requested"]:
        raise KeyboardInterrupt


def check_target(path: Path, force: bool, ours: Callable[[Path], bool], what: str, option: str = "--out",
                 written_later: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a target the final move would refuse too (it checks again at the move)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise GemxError(f"{path} exists and is not a directory; choose another {option}")
    if not ours(path):
        raise GemxError(f"{path} exists and is not {what}; choose another {option} (gemx will not replace it)")
    if not force:
        raise GemxError(f"{path} already holds {what}; pass --force to replace it or choose another {option}")
    refuse_foreign(path, option, written_later)


def foreign_files(path: Path, written_later: tuple[str, ...] = ()) -> list[str] | None:
    """Files under a folder gemx wrote that its inventory does not list (a sub-folder with an inventory of its own,
    such as a build inside an export, is judged by that one); None when the folder has no inventory."""
    listed = _inventory(Path(path))
    if listed is None:
        return None
    return _unlisted(Path(path), Path(path), listed, (*WRITTEN_LATER, *written_later))


def _inventory(path: Path) -> set[str] | None:
    files = json_field(path / INVENTORY, "files")
    return set(files) if isinstance(files, list) else None


def _unlisted(root: Path, folder: Path, listed: set[str], later: tuple[str, ...]) -> list[str]:
    found = []
    for entry in sorted(folder.iterdir()):
        rel = entry.relative_to(root).as_posix()
        if entry.name in later or rel == INVENTORY:
            continue
        if entry.is_dir() and not entry.is_symlink():
            nested = foreign_files(entry, later)
            found += [f"{rel}/{f}" for f in nested] if nested is not None else _unlisted(root, entry, listed, later)
        elif rel not in listed:
            found.append(rel)
    return found


def refuse_foreign(path: Path, option: str | None = "--out", written_later: tuple[str, ...] = ()) -> None:
    """--force replaces what gemx wrote: a folder holding anything else (a user's NOTES.md) is refused, naming it."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return
    foreign = foreign_files(path, written_later)
    if foreign is None:
        raise GemxError(f"{path} does not list the files gemx wrote in it (an older gemx made it), so --force cannot tell "
                        "them from yours; check it holds nothing of yours and remove it"
                        + (f", or choose another {option}" if option else ""))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise GemxError(f"{path} holds files gemx did not write ({', '.join(foreign[:3])}{more}); --force replaces only "
                        f"what gemx wrote: move them out of it" + (f", or choose another {option}" if option else ""))


def _write_inventory(folder: Path) -> None:
    files = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if not f.is_dir())
    (folder / INVENTORY).write_text(json.dumps({"files": files}, indent=1) + "\n")


def json_field(path: Path, key: str) -> object:
    """`key` of the JSON object in the file at `path`, or None when the file is missing, unreadable or not one.

    How a folder proves it is gemx's: its manifest or record says so, not merely its file names."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error(e: OSError, path: Path, doing: str = "write") -> GemxError:
    """One line for an operating-system refusal: `cannot write OUT: no space left on device`."""
    reason = os.strerror(e.errno).lower() if e.errno else str(e)
    if e.errno == errno.EISDIR:
        reason = "it is a directory"
    blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and blocking is not None:
        reason = f"{blocking} is a file, not a directory"
    return GemxError(f"cannot {doing} {path}: {reason}")


def _tmp_sibling(path: Path, directory: bool) -> Path:
    prefix, parent = f".{path.name}{TMP_MARK}{os.getpid()}-", path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        if directory:
            return Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        return Path(tmp)
    except OSError as e:
        raise os_error(e, path) from None


def clean_stale(path: Path) -> list[Path]:
    """Remove temporaries of `path` left by gemx runs that were killed; returns what was removed."""
    removed = []
    for tmp in Path(path).parent.glob(f".{glob.escape(Path(path).name)}{TMP_MARK}*.tmp"):
        pid = tmp.name[len(Path(path).name) + 1 + len(TMP_MARK):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write: Callable[[Path], object], overwrite: bool = True) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then move it to `path`.

    With `overwrite=False` the move never replaces anything: a file that appeared at `path` while this one
    was written is left alone and the write is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise GemxError(f"cannot write {path}: it is a directory")
    tmp = _tmp_sibling(path, directory=False)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; the final file gets the usual mode
        _last_check(path)
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_replace(tmp, path)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def _move_no_replace(tmp: Path, path: Path) -> None:
    appeared = GemxError(f"{path} appeared while gemx was writing it; left it alone (pass --force to replace it)")
    try:
        os.link(tmp, path)  # fails if anything is there now: no check-then-replace window
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a filesystem without hard links: the narrowest check there is
            raise appeared from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path, replaceable: Callable[[Path], bool] | None = None,
               written_later: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place in one rename, with an
    inventory of its files.

    Whatever is at `path` at that moment is replaced only if `replaceable(path)` says it may be (the
    caller's --force, and the folder being one gemx wrote) and it holds nothing its inventory does not list
    (or names in `written_later`); otherwise it is left alone and this raises.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, directory=True)
    old = None
    try:
        yield tmp
        _write_inventory(tmp)
        tmp.chmod(0o777 & ~_umask())
        _last_check(path)
        if path.exists() or path.is_symlink():
            if replaceable is None or not replaceable(path):
                raise GemxError(f"{path} appeared or changed while gemx was writing it; left it alone "
                                "(choose another output, or pass --force if it is gemx's own)")
            refuse_foreign(path, None, written_later)
            old = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-old.tmp"
            path.rename(old)
        tmp.rename(path)
    except OSError as e:
        if old is not None and not path.exists():
            old.rename(path)  # put the previous artifact back
            old = None
        raise os_error(e, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
