"""Writing files safely: an output never replaces an input, every file is written to a temporary file
created exclusively beside it and renamed into place, and resumable work keeps its state in a directory
whose steps commit atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pocketquant.errors import PocketQuantError

PARTIAL = ".partial-"  # temporary files are named .NAME.partial-PID-RANDOM


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(f: Path, max_bytes: int | None = None, max_depth: int | None = None):
    """A JSON file's contents, or a one-line error for one that is unreadable, not UTF-8 or not JSON; with
    `max_bytes` / `max_depth`, also for one larger or more deeply nested than that (refused before parsing)."""
    try:
        if max_bytes is not None and f.stat().st_size > max_bytes:
            raise PocketQuantError(f"{f} is {f.stat().st_size:,} bytes; refusing JSON of more than {max_bytes:,}")
        text = f.read_text(encoding="utf-8")
    except OSError as e:
        raise PocketQuantError(f"cannot read {f}: {e.strerror or e}") from e
    except ValueError as e:  # UnicodeDecodeError
        raise PocketQuantError(f"{f} is not valid JSON: {type(e).__name__}: {e}") from e
    if max_depth is not None and (depth := json_depth(text)) > max_depth:
        raise PocketQuantError(f"{f} nests {depth:,} levels deep; refusing JSON deeper than {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5,000-digit number, absurd nesting
        raise PocketQuantError(f"{f} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON text nest (brackets inside strings do not count)."""
    import re

    depth = deepest = 0
    # one pass: a string (closed or not: an open one runs to the end) is skipped whole, a bracket counted
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "]}":
            depth -= 1
    return deepest


def tensors_digest(tensors: dict) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes): what identifies a model's weights."""
    import torch

    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def check_output(path: str | Path, inputs: Iterable = (), suffix: str | None = None) -> Path:
    """Refuse, before any work is done, an output that is a directory, lacks `suffix`, would replace a file
    one of `inputs` is made of (a file, or a file inside a model directory), or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise PocketQuantError(f"{path} is a directory; name the file to write")
    if suffix and path.suffix != suffix:
        raise PocketQuantError(f"the output file must end in {suffix}, got {path.name}")
    for source in inputs:
        if source is not None and _replaces(path, Path(str(source))):
            raise PocketQuantError(f"refusing to write {path}: it would replace {source}, an input of this command")
    _check_writable(path)
    return path


def _replaces(out: Path, source: Path) -> bool:
    if not (out.exists() and source.exists()):
        return False
    if source.is_dir():
        return source.resolve() in out.resolve().parents
    return os.path.samefile(out, source)  # also through links and hard links


def _check_writable(path: Path):
    parent = path.parent
    while not parent.exists():  # the nearest existing folder must let us create what is missing
        parent = parent.parent
    if not parent.is_dir():
        raise PocketQuantError(f"cannot write {path}: {parent} is not a directory")
    if parent == path.parent:
        try:  # a real probe: permissions, read-only file systems, ACLs
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise PocketQuantError(f"cannot write {path}: {e.strerror or e}") from e
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise PocketQuantError(f"cannot write {path}: {parent} is not writable")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a new temporary file beside `path`, then rename it to `path`. The temporary file
    is created exclusively (never through a planted link), removed after any failure, and removed by the
    next write of `path` if a kill left it; `path` is either untouched or complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent, [path.name])
        fd, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise PocketQuantError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(name)
    _in_flight.add(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result gets the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except PocketQuantError:
        raise
    except Exception as e:  # a full disk or a size limit, as OSError or as a serializer's own error type
        first = (str(e).strip().splitlines() or [""])[0][:200]
        reason = getattr(e, "strerror", None) or first or type(e).__name__
        raise PocketQuantError(f"cannot write {path}: {reason}") from e
    finally:
        _in_flight.discard(tmp)
        tmp.unlink(missing_ok=True)


def atomic_directory(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`atomic_write` for a directory of files: write(tmp) fills a new temporary directory beside `path`, which
    is then renamed to `path` (which must not exist); after any failure nothing is left behind."""
    path = Path(path)
    if path.exists():
        raise PocketQuantError(f"{path} exists; name a new directory to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent, [path.name])
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise PocketQuantError(f"cannot write {path}: {e.strerror or e}") from e
    _in_flight.add(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        os.rename(tmp, path)
    except PocketQuantError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        reason = getattr(e, "strerror", None) or first or type(e).__name__
        raise PocketQuantError(f"cannot write {path}: {reason}") from e
    finally:
        _in_flight.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it to read it is not thread-safe
_in_flight: set[Path] = set()  # this process's temporary files now being written


def remove_stale_partials(directory: Path, names: Iterable[str]):
    """Remove the temporary files (.NAME.partial-PID-...) of the files `names` that a killed writer left in
    `directory`: those of a process that is gone, or of this process's PID but not being written now (a
    rerun in a container often gets the PID of the run that was killed)."""
    prefixes = tuple(f".{name}{PARTIAL}" for name in names)
    for entry in os.scandir(directory):
        if entry.name.startswith(prefixes):
            pid = entry.name.rsplit(PARTIAL, 1)[1].split("-")[0]
            ours = pid == str(os.getpid()) and Path(entry.path) not in _in_flight
            if not (pid.isdigit() and (ours or not _alive(pid))):
                continue
            if entry.is_dir(follow_symlinks=False):  # a directory being written (atomic_directory)
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)  # a link is removed, never followed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


class StateDir:
    """The state of resumable work (GPTQ layer by layer, training step by step): data files plus a manifest,
    state.json, that names each committed file with its SHA-256. A step writes its files under new names,
    then commits by replacing the manifest, so a kill at any moment leaves the last committed step
    whole. The manifest also lists the files a step may have started, so a rerun removes exactly those and
    never a file it did not write."""

    MANIFEST = "state.json"

    def __init__(self, path: str | Path, kind: str, key: dict):
        self.path, self.kind = Path(path), kind
        self.key = json.loads(json.dumps(key))  # as the manifest will hold it (tuples become lists)
        self.files: dict[str, str] = {}  # committed name -> SHA-256
        self.info: dict | None = None  # what the last committed step recorded

    def open(self) -> dict | None:
        """Create the directory, or take up the state an earlier run with the same key left there; return the
        info of its last committed step (None when starting afresh)."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise PocketQuantError(f"{self.path} is not a plain directory; refusing to keep {self.kind} state "
                                   "there (remove it)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            saved = self._manifest()
            if saved is None and any(not p.name.startswith(f".{self.MANIFEST}{PARTIAL}") for p in self.path.iterdir()):
                raise PocketQuantError(f"{self.path} holds files that are not pocketquant {self.kind} state; "
                                       "move them away or choose another output name")
            if saved is not None:
                self._take_up(saved)
            for name in set(saved["pending"] if saved else ()) - set(self.files):  # an interrupted step's files
                (self.path / name).unlink(missing_ok=True)
            if self.info is None:  # nothing committed, so nothing kept, whatever run it was
                self._save({}, None, pending=())
        except OSError as e:
            raise PocketQuantError(f"{self.path}: {e.strerror or e}") from e
        return self.info

    def read(self) -> dict | None:
        """Like `open`, for a process that only reads the state another one writes: changes nothing."""
        try:
            saved = self._manifest()
            if saved is not None:
                self._take_up(saved)
        except OSError as e:
            raise PocketQuantError(f"{self.path}: {e.strerror or e}") from e
        return self.info

    def _take_up(self, saved: dict):
        """Check the committed step of a manifest (if any) against this run and its files, then make it ours."""
        if not _committed(saved):
            return  # nothing to resume, whatever run it was
        if saved["key"] != self.key:
            raise PocketQuantError(f"{self.path} holds a {self.kind} run with other settings or another model; "
                                   "delete it to start over")
        for name, digest in saved["files"].items():
            f = self.path / name
            if not f.is_file() or f.is_symlink() or sha256_of(f) != digest:
                raise PocketQuantError(f"{f}: damaged {self.kind} state (missing, truncated or changed); "
                                       f"delete {self.path} to start over")
        self.files, self.info = saved["files"], saved["info"]

    def _manifest(self) -> dict | None:
        """The manifest on disk, checked for form (None when there is none)."""
        manifest = self.path / self.MANIFEST
        if not manifest.is_file():
            return None
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
            ok = (saved.get("format") == "pocketquant.state" and saved.get("kind") == self.kind
                  and isinstance(saved.get("files"), dict) and isinstance(saved.get("pending"), list)
                  and isinstance(saved.get("info"), (dict, type(None))) and "key" in saved
                  and all(_plain_name(n) for n in [*saved["files"], *saved["pending"]]))
        except (OSError, ValueError, AttributeError, RecursionError) as e:
            raise PocketQuantError(f"{manifest}: damaged {self.kind} state ({e}); delete {self.path} to start "
                                   "over") from e
        if not ok:
            raise PocketQuantError(f"{manifest} is not a pocketquant {self.kind} state; delete {self.path} to "
                                   "start over")
        return saved

    def file(self, name: str) -> Path:
        """The path of a file of the state."""
        return self.path / name

    def commit(self, info: dict, write: dict[str, Callable[[Path], object]], drop: Iterable[str] = ()):
        """Write the files of a step (name -> write(tmp)), then commit them with `info`; the committed files
        named in `drop` leave the state and are deleted."""
        drop = set(drop) & set(self.files) - set(write)
        self._save(self.files, self.info, pending=[*write, *drop])  # what may exist beside the committed files
        digests = {}
        for name, fn in write.items():
            atomic_write(self.path / name, fn)
            digests[name] = _digest(self.path / name)
        files = {k: v for k, v in self.files.items() if k not in drop} | digests
        self._save(files, info, pending=drop)
        for name in drop:
            _unlink(self.path / name)
        self.files, self.info = files, info

    def _save(self, files: dict, info, pending):
        body = {"format": "pocketquant.state", "kind": self.kind, "key": self.key, "files": files, "info": info,
                "pending": sorted(pending)}
        atomic_write(self.path / self.MANIFEST, lambda tmp: tmp.write_text(json.dumps(body), encoding="utf-8"))

    def remove(self, only_if_uncommitted: bool = False):
        """Delete the state as the manifest on disk names it: first a manifest that commits nothing (so a kill
        in between leaves a state a rerun starts afresh from), then the files, then the manifest and the
        directory, unless something pocketquant did not write lives there. With `only_if_uncommitted` (after a
        refused run) a state that holds a committed step is kept for the rerun."""
        try:
            saved = self._manifest()
        except PocketQuantError:
            return  # not ours to delete
        if saved is None or (only_if_uncommitted and _committed(saved)):
            return
        names = set(saved["files"]) | set(saved["pending"])
        try:
            self._save({}, None, pending=names)
            for name in names:
                (self.path / name).unlink(missing_ok=True)
            remove_stale_partials(self.path, [*names, self.MANIFEST])
            if {p.name for p in self.path.iterdir()} == {self.MANIFEST}:
                (self.path / self.MANIFEST).unlink()
                self.path.rmdir()
            else:
                self._save({}, None, pending=())  # other things live there: they stay, in a state of ours
        except OSError:
            pass  # the state stays for a later run to take up or remove
        self.files, self.info = {}, None


def _committed(saved: dict) -> bool:
    return saved["info"] is not None or bool(saved["files"])


def _digest(path: Path) -> str:
    try:
        return sha256_of(path)
    except OSError as e:
        raise PocketQuantError(f"cannot read back {path}: {e.strerror or e}") from e


def _unlink(path: Path):
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # left for the next run, which removes what the manifest lists as pending


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def drop_file_pages(*tensors):
    """Let go of the resident pages of tensors that lie in a file mapping (a packed file is read in place)
    once they have been repacked. Those pages are unmodified copies of the file, so this lowers resident
    memory only: anything that reads them again reads the file. Tensors in ordinary memory are left alone."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return  # not Linux with glibc
    files = []
    for line in maps:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            files.append((start, end))
    page, MADV_DONTNEED = os.sysconf("SC_PAGE_SIZE"), 4
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for t in tensors:
        a = t.data_ptr()
        b = a + t.numel() * t.element_size()
        lo, hi = -(-a // page) * page, b // page * page  # whole pages inside the tensor only
        if hi > lo and any(s <= a and b <= e for s, e in files):
            libc.madvise(lo, hi - lo, MADV_DONTNEED)


def disk_bytes(path: Path) -> int:
    """A file's size, or the sum of a directory's files."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size
