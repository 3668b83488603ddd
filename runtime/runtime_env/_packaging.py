"""Packages: a directory, a module file or a zip, as one content-addressed zip.

    driver: package_dir / package_module_file / package_zip --> Package(uri, data)
    node:   unpack(uri, data, dest): verify that the content is what the URI names, then
            extract into a fresh directory

A package's URI is ``pkg://<hash>``: the hash is over its files' names, executable bits
and bytes (not over the zip's bytes, which depend on timestamps and the zlib version), so
the same content has the same URI on every machine, and a node can check what it was sent.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import shutil
import stat
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

from ._excludes import Excludes

URI_RE = re.compile(r"^pkg://([0-9a-f]{32})(/[^\x00]*)?$")

# Never packaged: caches that Python rebuilds, and version control.
ALWAYS_EXCLUDED = ["__pycache__/", "*.pyc", ".git/"]

# The most bytes a node unpacks from one package (a zip bomb stops here).
MAX_UNPACKED_BYTES = 4 << 30
_DATE = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20


def max_package_bytes() -> int:
    """The size limit for working_dir and py_modules (uncompressed), read at each use."""
    text = os.environ.get("SHOAL_RUNTIME_ENV_MAX_PACKAGE_BYTES", "")
    return int(text) if text.strip() else 100 * 1024 * 1024


@dataclass
class Package:
    uri: str
    data: bytes
    size: int  # uncompressed bytes


class PackageTooLarge(ValueError):
    pass


def _hash_update(h: hashlib._Hash, name: str, executable: bool, size: int) -> None:
    h.update(name.encode() + b"\x00" + (b"x" if executable else b"-") + struct.pack("<Q", size))


def _walk(root: str, excludes: Excludes) -> list[tuple[str, str, bool, int]]:
    """(relative name, path, executable, size) of every file under ``root`` not excluded."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        kept = []
        for d in sorted(dirnames):
            if not excludes.excluded(rel_dir + d, True):
                kept.append(d)
        dirnames[:] = kept  # os.walk descends only into these (and never through symlinks)
        for f in sorted(filenames):
            rel = rel_dir + f
            if excludes.excluded(rel, False):
                continue
            path = os.path.join(dirpath, f)
            try:
                st = os.stat(path)  # a symlink to a file counts as the file
            except OSError:
                continue  # a dangling link
            if not stat.S_ISREG(st.st_mode):
                continue
            files.append((rel, path, bool(st.st_mode & 0o111), st.st_size))
    return files


def _check_size(what: str, files: list[tuple[str, str, bool, int]]) -> int:
    total = sum(f[3] for f in files)
    limit = max_package_bytes()
    if total > limit:
        largest = sorted(files, key=lambda f: -f[3])[:3]
        names = ", ".join(f"{f[0]} ({_mib(f[3])})" for f in largest)
        raise PackageTooLarge(
            f"{what} holds {_mib(total)} of files, more than the limit of {_mib(limit)}; "
            f"the largest are {names}. Leave files out with runtime_env excludes "
            "(gitignore-style patterns), or raise the limit with "
            "SHOAL_RUNTIME_ENV_MAX_PACKAGE_BYTES"
        )
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def snapshot(path: str, excludes: list[str]) -> tuple[tuple[str, int, int], ...]:
    """What a directory holds, by name, size and modification time: cheap to take, and
    equal as long as nothing in it changed (a cache of packages compares these)."""
    out = []
    for rel, full, _, size in _walk(path, Excludes(ALWAYS_EXCLUDED + excludes)):
        try:
            out.append((rel, size, os.stat(full).st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


def package_dir(path: str, excludes: list[str], keep_name: bool) -> Package:
    """Package a directory; with ``keep_name`` its files sit under its own name (a Python
    package for py_modules), else at the root (a working_dir)."""
    files = _walk(path, Excludes(ALWAYS_EXCLUDED + excludes))
    prefix = os.path.basename(os.path.normpath(path)) + "/" if keep_name else ""
    what = f"the directory {path}"
    size = _check_size(what, files)
    entries = [(prefix + rel, full, ex, n) for rel, full, ex, n in files]
    return _build(entries, size)


def package_module_file(path: str) -> Package:
    """A single-file module (``mod.py``), importable as ``mod``."""
    st = os.stat(path)
    files = [(os.path.basename(path), path, bool(st.st_mode & 0o111), st.st_size)]
    return _build(files, _check_size(f"the module {path}", files))


def _build(entries: list[tuple[str, str, bool, int]], size: int) -> Package:
    h = hashlib.sha256()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, full, executable, _ in sorted(entries):
            with open(full, "rb") as f:
                data = f.read()
            _hash_update(h, name, executable, len(data))
            h.update(data)
            info = zipfile.ZipInfo(name, _DATE)
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return Package(f"pkg://{h.hexdigest()[:32]}", buf.getvalue(), size)


def package_zip(path: str) -> tuple[Package, str]:
    """A zip file as it is, and the directory inside it to use: its single top-level
    directory when it has one (as zips of a directory usually do), else ''."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        digest, size, names = content_hash(data, max_package_bytes())
    except PackageTooLarge as exc:
        raise PackageTooLarge(f"the zip file {path}: {exc}") from None
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"{path} is not a usable zip file: {exc}") from None
    tops = {name.split("/", 1)[0] for name in names}
    top = ""
    if len(tops) == 1 and all("/" in name for name in names):
        top = tops.pop()
    return Package(f"pkg://{digest}", data, size), top


def _safe_names(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The file entries of a zip, sorted, refusing any that could land outside the
    directory it is extracted into."""
    seen = set()
    out = []
    for info in zf.infolist():
        name = info.filename
        if name.endswith("/"):
            continue
        norm = posixpath.normpath(name)
        if (
            "\\" in name
            or "\x00" in name
            or name.startswith("/")
            or norm != name
            or norm == ".."
            or norm.startswith("../")
        ):
            raise ValueError(f"it has an entry with an unsafe name: {name!r}")
        if norm in seen:
            raise ValueError(f"it has the entry {name!r} twice")
        seen.add(norm)
        out.append(info)
    return sorted(out, key=lambda i: i.filename)


def content_hash(data: bytes, limit: int) -> tuple[str, int, list[str]]:
    """The hash a package's URI names, its uncompressed size, and its file names."""
    h = hashlib.sha256()
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = _safe_names(zf)
        for info in infos:
            executable = bool((info.external_attr >> 16) & 0o111)
            _hash_update(h, info.filename, executable, info.file_size)
            n = 0
            with zf.open(info) as member:
                while chunk := member.read(_CHUNK):
                    n += len(chunk)
                    total += len(chunk)
                    if total > limit:
                        raise PackageTooLarge(f"it unpacks to more than {_mib(limit)}")
                    h.update(chunk)
            if n != info.file_size:
                raise ValueError(f"the entry {info.filename!r} is not the size it claims")
    return h.hexdigest()[:32], total, [i.filename for i in infos]


def unpack(uri: str, data: bytes, dest: str) -> None:
    """Check that ``data`` is the package ``uri`` names, then extract it to ``dest`` (which
    must not exist): into a temporary directory first, renamed when complete."""
    m = URI_RE.match(uri)
    if m is None:
        raise ValueError(f"not a package URI: {uri!r}")
    digest, _, _ = content_hash(data, MAX_UNPACKED_BYTES)
    if digest != m.group(1):
        raise ValueError(f"the package sent for {uri} has other content (hash {digest})")
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, 0o755)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in _safe_names(zf):
                target = os.path.join(tmp, *info.filename.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                if (info.external_attr >> 16) & 0o111:
                    os.chmod(target, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_uri(uri: str) -> tuple[str, str]:
    """``pkg://<hash>/sub/dir`` -> (``pkg://<hash>``, ``sub/dir``)."""
    m = URI_RE.match(uri)
    if m is None:
        raise ValueError(f"not a package URI: {uri!r}")
    sub = (m.group(2) or "").strip("/")
    if sub and any(part in ("", ".", "..") for part in sub.split("/")):
        raise ValueError(f"bad directory in the package URI {uri!r}")
    return f"pkg://{m.group(1)}", sub


def is_uri(value: object) -> bool:
    return isinstance(value, str) and URI_RE.match(value) is not None


def total_size(paths: Iterable[str]) -> int:
    n = 0
    for p in paths:
        for dirpath, _, filenames in os.walk(p):
            for f in filenames:
                try:
                    n += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
    return n
