"""Files: atomic writes, output-path checks and the one JSON-lines and JSON-object readers.

An atomic write is a temp file in the same folder, fsync, then one rename: a reader (or a
killed run) never sees half a file; the result gets the usual permissions (0666 minus the
umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple

from echox.errors import ConfigError



def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def disk_full(exc: BaseException) -> bool:
    """`exc` says the disk (or the user's quota) is full: an OSError with ENOSPC or EDQUOT, or a
    writer in Rust (safetensors) that keeps only the text, "... (os error 28)"."""
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if isinstance(exc, OSError):
        return exc.errno in codes
    return any(f"(os error {c})" in str(exc) for c in codes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_open(p, "w") as f: ...` writes p atomically; on error p is untouched."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """safetensors' `save_file` with the usual permissions (0666 minus the umask): safetensors
    creates its file 0600, so weights saved by one user could not be read by another (a shared
    model folder, a container run as another user) while the config beside them could."""
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    _usual_mode(Path(path))
    return Path(path)


def _usual_mode(path: Path) -> None:
    """Give one file the usual mode (0666 minus the umask), where the file system lets us."""
    with contextlib.suppress(PermissionError, NotImplementedError):  # vfat, some CIFS/NFS mounts
        os.chmod(path, 0o666 & ~_umask())


def usual_permissions(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the usual mode (0666 minus the umask): files that a
    library wrote 0600 (safetensors, through transformers' save_pretrained) are then readable
    where the folder is shared."""
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            _usual_mode(f)


def is_file_name(name: str) -> bool:
    """Whether `name` (an id, say) can name a file inside its folder: not empty, no path of its
    own (never `a/b`, `.`, `..`), no NUL byte, and short enough for the file system's 255-byte
    names with a suffix added (200 bytes of UTF-8)."""
    return (bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")
            and len(name.encode("utf-8", "surrogatepass")) <= 200)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def _remove(path: Path) -> None:
    """Delete a folder tree, a file or a link (best effort: a leftover is only clutter)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _pid_space() -> str:
    """Where a PID means one process: this boot of this machine (its boot id) and this PID
    namespace (a container has its own, under the same boot id and maybe the same host
    name). Empty where that cannot be known: scratch folders are then never judged dead."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
        ns = os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError):
        return ""
    return f"{boot}.{ns:x}" if boot.isalnum() else ""


_PID_SPACE = _pid_space()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or not a PID we can ask about): keep its folder
    return True


def _clear_dead_scratch(dst: Path) -> None:
    """Remove the scratch folders of `dst` that a killed save left in this PID space (a
    converted 8B model leaves up to 16 GB in a hidden folder); a running save's is kept, and so
    is any of another machine or container (its PIDs are not ours to ask about)."""
    if not _PID_SPACE:
        return
    prefix = f".{dst.name}.tmp-{_PID_SPACE}-"
    for tmp in dst.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside `dst`; on success it replaces `dst` in one rename.

    A killed run leaves no half-written folder. If another process finished the same folder
    first (two conversions racing), its result is kept and ours is dropped.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clear_dead_scratch(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{_PID_SPACE + '-' if _PID_SPACE else ''}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)  # its files' bytes are on disk before the rename makes them the folder
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        moved = dst.exists() or dst.is_symlink()
        if moved:
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except OSError:
            if not dst.is_dir():  # not a lost race: a real failure; put the old one back
                if moved and not dst.exists():
                    os.replace(old, dst)
                raise
        _sync_dir(dst.parent)  # and the rename itself
        if moved:
            _remove(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder: without it a power loss soon after
    the rename could leave the renamed folder with empty or short files."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError as e:  # a file system without fsync: nothing more to do here
                if e.errno not in (errno.EINVAL, errno.ENOTSUP):
                    raise
            finally:
                os.close(fd)
        _sync_dir(Path(root))


def _sync_dir(folder: Path) -> None:
    """fsync a folder's entries (where the system allows opening a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def clear_interrupted(folder: str | os.PathLike, name: str = "*") -> None:
    """Clear what `atomic_dir`s killed midway left in `folder` for the folders matching `name`:
    scratch copies (`.<name>.tmp-[<pid space>-]<pid>`) go, and a folder moved aside
    (`.<name>.old-<pid>`) goes too, or is put back where its replacement never took its place."""
    folder = Path(folder)
    for tmp in folder.glob(f".{name}.tmp-*"):  # name is a pattern ("step-*")
        _remove(tmp)
    for old in folder.glob(f".{name}.old-*"):
        dst = folder / old.name[1:].rsplit(".old-", 1)[0]
        if dst.exists() or dst.is_symlink():
            _remove(old)
        else:
            with contextlib.suppress(OSError):
                os.replace(old, dst)


def moved_aside_hint(dst: str | os.PathLike) -> str:
    """For a missing folder: where an `atomic_dir` killed between its two renames left the
    previous version (`.<name>.old-<pid>` beside it), as a clause to end an error line with;
    "" when there is none."""
    dst = Path(dst)
    olds = list(dst.parent.glob(f".{glob.escape(dst.name)}.old-*")) if dst.name else []
    if not olds:
        return ""
    newest = max(olds, key=lambda p: p.stat().st_mtime)
    return (f" (a save there was cut short: its previous version is {newest}; rename it to "
            f"{dst.name} to use it)")


def open_to_append(path: str | os.PathLike) -> IO[str]:
    """`path` opened to append JSON lines (UTF-8): a last line torn by a kill (no newline) is
    ended first, so the next record starts a line of its own instead of being lost with it."""
    f = open(path, "a", encoding="utf-8")
    if f.tell():  # appending starts at the end
        with open(path, "rb") as last:
            last.seek(-1, os.SEEK_END)
            if last.read(1) != b"\n":
                f.write("\n")
    return f


def check_replaceable(folder: str | os.PathLike, what: str, *,
                      is_earlier_save: Callable[[Path], bool],
                      error: type[Exception] = ConfigError) -> Path:
    """Refuse to replace `folder` whole (as an atomic save does) where that would delete what
    is not an earlier save: a file, or a folder that is neither empty nor an earlier save.
    `is_earlier_save(folder)` says what counts as one (an earlier save of the same kind: a
    config.json alone would let a vocoder replace a model); the refusal is raised as `error`.
    Returns the path."""
    p = Path(folder)
    if not (p.exists() or p.is_symlink()):
        return p
    if not p.is_dir():
        raise error(f"{p} is a file, not a folder: {what} would replace it")
    names = sorted(x.name for x in p.iterdir())
    if names and not is_earlier_save(p):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise error(f"{p} holds other files ({shown}) that {what} would delete; give a "
                    "new or empty folder")
    return p


def folder_config(folder: str | os.PathLike, name: str = "config.json") -> dict[str, Any] | None:
    """`folder/name` as a JSON object, or None where it is missing, unreadable or not one:
    what a saver reads to tell an earlier save of its own kind from another program's."""
    try:
        return read_json_object(Path(folder, name), ValueError)
    except (OSError, ValueError):  # missing, or read_json_object's one-line refusal
        return None


_ASSETS = Path(__file__).resolve().parent / "assets"  # the shipped model, vocoder and question


def check_out_path(path: str | os.PathLike, option: str = "--out", *, folder: bool = True,
                   inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any slow work, an output path that cannot be made: a `folder` that is an
    existing file, or a path below a file; and an output file that is one of the command's
    `inputs`, or lies inside an input folder (writing it would replace what was read). Returns
    the path."""
    if not str(path).strip():  # `--out "$UNSET"`: Path("") is the working folder
        raise ConfigError(f"{option} is empty; give a path")
    p = Path(path)
    resolved = p.resolve()
    if _ASSETS == resolved or _ASSETS in resolved.parents:
        raise ConfigError(f"{option} {p} lies inside the installed package's assets ({_ASSETS}), "
                          "which hold the shipped model; give a path outside them")
    if not folder:
        for src in inputs:
            if src is None:
                continue
            where = Path(src).resolve()
            if where == resolved:
                raise ConfigError(f"{option} {p} is an input of this command ({src}); writing "
                                  "it would replace it: give another path")
            if where.is_dir() and where in resolved.parents:  # a model's config.json, say
                raise ConfigError(f"{option} {p} lies inside {src}, an input of this command; "
                                  "writing it could replace what is read there: give another path")
    if folder and p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {p} is a file; give a folder")
    if not folder and p.is_dir():
        raise ConfigError(f"{option} {p} is a folder; give a file path")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {p}: {parent} is a file, not a folder")
            break
    return p


def check_plot_path(path: str | os.PathLike, option: str = "--png", *,
                    inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`check_out_path` of a plot file, whose suffix must be one matplotlib writes (without
    one it adds `.png` to the name; with another it fails only when the plot is drawn, after
    the command's work)."""
    from matplotlib.figure import Figure

    p = check_out_path(path, option, folder=False, inputs=inputs)
    kinds = set(Figure().canvas.get_supported_filetypes()) - {"pgf"}  # pgf runs LaTeX
    if p.suffix.lower().lstrip(".") not in kinds:
        raise ConfigError(f"{option} {p}: give a file name ending in .png (or one of "
                          f"{', '.join('.' + k for k in sorted(kinds))})")
    return p


class JsonLine(NamedTuple):
    """One non-blank line of a JSON-lines file: its value, or why it could not be read."""

    lineno: int  # 1-based
    value: Any  # None when `error` is set
    error: str | None  # "not UTF-8 text (...)" or "malformed JSON (...)"


def json_lines(path: str | os.PathLike) -> Iterator[JsonLine]:
    """Each non-blank line of a JSON-lines file, parsed. The file is read by bytes, so a
    line that is not UTF-8, is not JSON (a torn last line, say) or is nested too deeply costs
    that line only: it comes with `error` set, and the caller decides whether to stop, skip
    or redo it. A missing file raises FileNotFoundError. A UTF-8 byte order mark at the start
    (Windows editors write one) is read past."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield JsonLine(lineno, None, f"not UTF-8 text ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            yield JsonLine(lineno, *_loads(line, where=lambda err: f"column {err.colno}"))


def _loads(text: str, where: Callable[[json.JSONDecodeError], str]) -> tuple[Any, str | None]:
    """(value, None) for JSON `text`, or (None, why not) in the words every reader here uses;
    `where` places a syntax error (a column of a line, a line and column of a file)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg} at {where(err)})"
    except ValueError:  # an integer of 4300+ digits, which Python will not convert
        return None, "malformed JSON (a number too long to read)"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"


def json_object_lines(path: str | os.PathLike,
                      error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every line of a JSON-lines file that must hold only JSON
    objects: the first line that does not (or cannot be read) raises `error`, naming it."""
    rows = []
    for lineno, value, why in json_lines(path):
        if why is None and not isinstance(value, dict):
            why = f"expected a JSON object, got {type(value).__name__}"
        if why is not None:
            raise error(f"{path} line {lineno}: {why}")
        rows.append((lineno, value))
    return rows


def read_json_object(path: str | os.PathLike, error: type[Exception],
                     what: str = "") -> dict[str, Any]:
    """The JSON object a whole file holds (a config, an index, a side file). A file that is
    empty or cut short, not UTF-8, not JSON or JSON but not an object raises `error`, one line
    naming the file (after `what`, e.g. "audio tower config") and why, so that a damaged file
    is a clear error instead of a traceback. A missing file raises FileNotFoundError, as
    `json_lines` does: the caller knows what belongs there and says so; any other failure to
    read it (a folder, no permission) is `error` too. Keys are the caller's to check."""
    p = Path(path)
    name = f"{what} {p}" if what else str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"{name}: cannot read it ({err.strerror or err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise error(f"{name}: empty file (expected a JSON object)")
    value, why = _loads(text, where=lambda err: f"line {err.lineno} column {err.colno}")
    if why is None and not isinstance(value, dict):
        why = f"expected a JSON object, got {'null' if value is None else type(value).__name__}"
    if why is not None:
        raise error(f"{name}: {why}")
    return value


def json_records(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every non-blank line of a JSON-lines input (a question or manifest file a script
    reads whole), each a JSON object whose `required` keys hold non-empty strings. The first
    line that is not one is a ConfigError naming the file and line, not a KeyError or
    TypeError further on; a missing file is one too."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    need = tuple(required)
    out = []
    for lineno, value, error in json_lines(p):
        if error is not None or not isinstance(value, dict):
            raise ConfigError(f"{p}:{lineno}: {error or 'not a JSON object'}")
        lacking = [k for k in need if not (isinstance(value.get(k), str) and value[k].strip())]
        if lacking:
            raise ConfigError(f"{p}:{lineno}: no {lacking[0]!r} text")
        out.append(value)
    return out


def json_objects(path: str | os.PathLike, key: str,
                 log: logging.Logger | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """The readable JSON objects holding a string (or int) `key` of a file a run appends to and resumes from (a
    results or labels cache): a damaged line (a kill mid-write, an edit) is skipped with a
    warning (on `log`, the caller's logger), so its item is done again. A missing file yields
    nothing."""
    p = Path(path)
    if not p.is_file():
        return
    for lineno, value, error in json_lines(p):
        if error is None and isinstance(value, dict) and isinstance(value.get(key), (str, int)):
            yield lineno, value
        else:
            why = error or f"not a JSON object with a string or integer {key!r}"
            (log or logging.getLogger(__name__)).warning(
                "%s:%d: damaged line skipped (%s); its item is done again", p, lineno, why)
