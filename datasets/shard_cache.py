"""A per-node cache of a prepared dataset's shards on local disk, shared by the trials of a node.

A shard is fetched from object storage once, checked against the size and SHA-256 its manifest
records, and read from local disk by every later epoch, trial and `final` on the node.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chestxpert.datasets.schema import DatasetError

# pyarrow only where shards are read: the trial config imports this module for OFF_WORDS, and
# every CLI command imports the trial config.
if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

# Where the cache lives: the trial setting `shard_cache`, else this variable, else the user's
# cache folder; one of OFF_WORDS turns it off. Its cap, in GB: `shard_cache_gb`, else CAP_ENV.
CACHE_ENV = "CHESTXPERT_SHARD_CACHE"
CAP_ENV = "CHESTXPERT_SHARD_CACHE_GB"
DEFAULT_CAP_GB = 20.0
OFF_WORDS = ("0", "off", "false", "no", "none")

ENTRY_SUFFIX = ".parquet"
PARTIAL_PREFIX = ".partial-"  # a shard being fetched: never read, removed if its fetcher died
INDEX_LOCK = ".index.lock"  # held while space is counted and made, so the cap holds
FETCH_LOCKS = ".locks"  # one lock per key prefix: one process fetches a shard, the rest wait
FETCH_LOCK_STRIPES = 2  # hex digits of the key naming its fetch lock (256 files at most)
CHUNK_BYTES = 1 << 22

# Entries this process has hashed since it last saw them change: (path, inode, size, mtime).
# A trial opens each shard every epoch; hashing it once per process is enough to catch a
# file damaged on disk, without reading every shard twice per epoch.
_VERIFIED: set[tuple[str, int, int, int]] = set()
# Fallbacks already reported by this process, so a trial warns once, not once per shard.
_WARNED: set[str] = set()


@dataclass(frozen=True)
class ShardCheck:
    """What the manifest records of one shard: its size in bytes and its SHA-256 (hex)."""

    bytes: int
    sha256: str


def default_cache_root() -> Path:
    """The cache folder when neither the trial setting nor CHESTXPERT_SHARD_CACHE names one:
    `$XDG_CACHE_HOME/chestxpert/shards`, else `~/.cache/chestxpert/shards`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chestxpert" / "shards"


def shard_cache_for(setting: str = "", cap_gb: float = 0.0) -> ShardCache | None:
    """The node's shard cache as `setting` (a folder, "" for CHESTXPERT_SHARD_CACHE or the
    default folder, or `off`/`0` for none) and `cap_gb` (GB, 0 for CHESTXPERT_SHARD_CACHE_GB
    or 20) say; None when the cache is off. Nothing is created on disk until a shard is
    fetched."""
    where = setting.strip() or os.environ.get(CACHE_ENV, "").strip()
    if where.lower() in OFF_WORDS:
        return None
    root = Path(where).expanduser() if where else default_cache_root()
    if not cap_gb:
        text = os.environ.get(CAP_ENV, "").strip()
        try:
            cap_gb = float(text) if text else DEFAULT_CAP_GB
        except ValueError:
            raise DatasetError(
                f"{CAP_ENV}={text!r} is not a number; give the shard cache's cap in GB, e.g. 50"
            ) from None
    if not cap_gb > 0:
        raise DatasetError(
            f"shard cache cap {cap_gb} GB must be > 0; turn the cache off with "
            f"{CACHE_ENV}=off (or trial.shard_cache: off) instead"
        )
    return ShardCache(root, int(cap_gb * 1e9))


def warn_once(reason: str, message: str) -> None:
    """Print `message` to stderr the first time this process meets `reason`."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ShardCache:
    """Shards on local disk under `root`, at most `cap_bytes` of them, least recently used
    evicted first.

    Processes on one node share it through file locks: a fetch lock per shard key (one process
    downloads, the others wait and then read its copy), a shared lock on each entry while it is
    read (eviction skips entries held so), and an index lock while space is counted and freed.
    A shard is written to a partial name, checked, then renamed into place: an entry that
    exists is whole.
    """

    root: Path
    cap_bytes: int

    @contextmanager
    def open_shard(
        self, fs: pafs.FileSystem, path: str, check: ShardCheck
    ) -> Iterator[pa.NativeFile]:
        """An open file of shard `path` of `fs`: the local copy, fetched first if missing or
        damaged; or, when the cache cannot hold it (cap below its size, full disk, folder not
        writable), the object itself, streamed, with one warning per process."""
        entry = self._entry(path, check)
        handle = self._open_entry(entry, check)
        if handle is None:
            handle = self._fetch(fs, path, entry, check)
        if handle is None:
            with fs.open_input_file(path) as streamed:
                yield streamed
            return
        locked, native = handle
        try:
            yield native
        finally:
            native.close()
            os.close(locked)

    def _entry(self, path: str, check: ShardCheck) -> Path:
        # The shard's path names it within its store; its hash makes a key no other content
        # shares, so a dataset written again under the same path never reads a stale copy.
        key = hashlib.sha256(f"{path}\0{check.sha256}".encode()).hexdigest()[:40]
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def _open_entry(self, entry: Path, check: ShardCheck) -> tuple[int, pa.NativeFile] | None:
        """The entry, shared-locked and open, if it is there and intact; a damaged one is
        removed (it can only be fetched again)."""
        try:
            locked = os.open(entry, os.O_RDONLY)
        except OSError:  # not there, or the folder unusable (which fetching then reports)
            return None
        try:
            fcntl.flock(locked, fcntl.LOCK_SH)
            stat = os.fstat(locked)
            if stat.st_nlink == 0:  # evicted between our open and our lock
                os.close(locked)
                return None
            seen = (str(entry), stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if seen not in _VERIFIED:
                if stat.st_size != check.bytes or _sha256_of_fd(locked) != check.sha256:
                    warn_once(
                        f"damaged {entry}",
                        f"shard cache: {entry} does not match its manifest (size or SHA-256); "
                        "fetching it again",
                    )
                    with suppress(FileNotFoundError):
                        if os.stat(entry).st_ino == stat.st_ino:  # not a copy fetched since
                            entry.unlink()
                    os.close(locked)
                    return None
                _VERIFIED.add(seen)
            # Last use is the access time (eviction order); the modification time stays, so
            # a file changed in place is hashed again.
            with suppress(PermissionError):  # a cache another user filled: no LRU for us
                os.utime(locked, ns=(time.time_ns(), stat.st_mtime_ns))
            import pyarrow as pa

            return locked, pa.OSFile(str(entry), "r")
        except BaseException:
            with suppress(OSError):
                os.close(locked)
            raise

    def _fetch(
        self, fs: pafs.FileSystem, path: str, entry: Path, check: ShardCheck
    ) -> tuple[int, pa.NativeFile] | None:
        """Download shard `path` into `entry` under its fetch lock, unless another process did
        while we waited; None when the cache cannot hold it (the caller streams)."""
        if check.bytes > self.cap_bytes:
            warn_once(
                f"cap {self.root}",
                f"shard cache {self.root}: a shard of {check.bytes} bytes is larger than the "
                f"cache's cap of {self.cap_bytes} bytes; streaming such shards from storage "
                f"(raise {CAP_ENV} or trial.shard_cache_gb)",
            )
            return None
        try:
            lock_dir = self.root / FETCH_LOCKS
            lock_dir.mkdir(parents=True, exist_ok=True)
            name = f"{entry.name[:FETCH_LOCK_STRIPES]}.lock"
            fetch_lock = os.open(lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            return self._cannot_cache(err)
        try:
            fcntl.flock(fetch_lock, fcntl.LOCK_EX)
            handle = self._open_entry(entry, check)  # fetched while we waited
            if handle is not None:
                return handle
            reserved = self._reserve(entry, check.bytes)
            if reserved is None:
                return None
            partial, descriptor = reserved
            try:
                self._download(fs, path, descriptor, check)
                os.rename(partial, entry)  # publish last: an entry that exists is whole
            except BaseException as err:
                with suppress(FileNotFoundError):
                    os.unlink(partial)
                if isinstance(err, OSError):
                    return self._cannot_cache(err)
                raise
            finally:
                os.close(descriptor)  # releases the partial's lock, after the rename
            stat = entry.stat()
            _VERIFIED.add((str(entry), stat.st_ino, stat.st_size, stat.st_mtime_ns))
            return self._open_entry(entry, check)
        finally:
            os.close(fetch_lock)

    def _reserve(self, entry: Path, size: int) -> tuple[str, int] | None:
        """Make room for `size` bytes under the index lock, evicting the least recently used
        entries no process is reading, and allocate them to a new partial file, so others count
        them too; returns its path and its descriptor, locked while the fetch runs; None when
        the room cannot be had."""
        partial = str(self.root / f"{PARTIAL_PREFIX}{entry.stem}-{uuid.uuid4().hex[:8]}")
        try:
            with _locked(self.root / INDEX_LOCK):
                used, entries = self._usage()
                for _, entry_size, old in sorted(entries):
                    if used + size <= self.cap_bytes:
                        break
                    if _evict(old):
                        used -= entry_size
                if used + size > self.cap_bytes:
                    warn_once(
                        f"busy {self.root}",
                        f"shard cache {self.root} is full of shards in use (cap "
                        f"{self.cap_bytes} bytes); streaming the others from storage (raise "
                        f"{CAP_ENV} or trial.shard_cache_gb)",
                    )
                    return None
                descriptor = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    # Held until the fetch ends: a partial nobody holds is a dead fetch's,
                    # which _usage removes.
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
                    os.posix_fallocate(descriptor, 0, size)  # a full disk fails here
                except BaseException:
                    os.close(descriptor)
                    os.unlink(partial)
                    raise
        except OSError as err:
            return self._cannot_cache(err)
        return partial, descriptor

    def _usage(self) -> tuple[int, list[tuple[int, int, Path]]]:
        """Bytes the cache holds (entries and fetches in progress) and its entries as
        (last use, size, path); partials whose fetcher died are removed on the way."""
        used, entries = 0, []
        for item in self.root.iterdir():
            try:
                stat = item.stat()
            except FileNotFoundError:
                continue
            if item.name.startswith(PARTIAL_PREFIX):
                if not _evict(item):
                    used += stat.st_size
            elif item.name.endswith(ENTRY_SUFFIX):
                used += stat.st_size
                entries.append((stat.st_atime_ns, stat.st_size, item))
        return used, entries

    def _download(self, fs: pafs.FileSystem, path: str, descriptor: int, check: ShardCheck) -> None:
        digest, written = hashlib.sha256(), 0
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:  # a write may take less than it was given
                    done = os.pwrite(descriptor, view, written)
                    view, written = view[done:], written + done
        if written != check.bytes or digest.hexdigest() != check.sha256:
            raise DatasetError(
                f"shard {path} does not match the dataset's manifest: expected {check.bytes} "
                f"bytes with SHA-256 {check.sha256[:16]}…, read {written} bytes with SHA-256 "
                f"{digest.hexdigest()[:16]}…; the stored dataset is damaged: prepare it again"
            )

    def _cannot_cache(self, err: OSError) -> None:
        reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror
        warn_once(
            f"oserror {self.root}",
            f"shard cache {self.root} cannot hold shards ({reason}); streaming them from "
            f"storage every epoch (free space, or set {CACHE_ENV} or trial.shard_cache to "
            "another folder)",
        )


def _sha256_of_fd(descriptor: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(descriptor, CHUNK_BYTES, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _evict(path: Path) -> bool:
    """Remove an entry or partial that no process holds (a reader's shared lock, a fetcher's
    exclusive one); False if one does."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(descriptor)
    return True


@contextmanager
def _locked(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)
