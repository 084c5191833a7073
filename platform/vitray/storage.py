"""Where vitray reads and writes: a local path, or an object store URI (``s3://bucket/prefix``, ``gs://...``) through
pyarrow's filesystems, the same ones Ray Data and Ray Train use.

Credentials and endpoints come the standard way, never from vitray's config: AWS's environment variables, profiles
and instance or pod roles, ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph, moto), Google's application
default credentials. :data:`FORWARDED_ENV` lists the variable names handed on to Ray workers and jobs.

Atomic writes: a local file is written to a temporary name and renamed. Object stores have no rename: an object
becomes visible only when its upload completes, so a killed writer leaves nothing under the final name. vitray still
uploads under a ``_tmp/`` key beside the target and copies it server-side to its name once the upload has closed
without an error, so that an error path can never complete an upload that holds part of the bytes
(:func:`write_bytes`). A ``_tmp/`` key left by a killed writer is never read, and is cleared by the next writer.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import threading
import uuid
from pathlib import Path

__all__ = ["StorageError", "is_uri", "join", "basename", "resolve", "exists", "is_file", "is_dir", "read_bytes",
           "read_text", "write_bytes", "write_text", "list_files", "delete", "delete_tmp", "size", "sha256_of",
           "open_input", "upload_dir", "download_dir", "local_copy", "check", "stat", "uri_in",
           "ray_job_env_keys", "forwarded_env", "FORWARDED_ENV", "TMP_DIR", "display"]

TMP_DIR = "_tmp"  # uploads in progress beside their target (object stores only)

# what configures object storage access, handed on to Ray workers and `ray job submit` (values are never printed)
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
)


class StorageError(OSError):
    """A path that cannot be used: the message names it and why, in one line."""


def is_uri(path) -> bool:
    """An object store (or any pyarrow filesystem) URI; ``file://`` and plain paths are local."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _local(path) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def join(base, *names: str) -> str:
    """``base/name/...`` for a URI or a local path (as a string)."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return str(_local(base).joinpath(*names))


def basename(path) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else _local(path).name


def display(path) -> str:
    """A path as the user wrote it: the URI, or the local path with ``~`` expanded."""
    return str(path) if is_uri(path) else str(_local(path))


_FS: dict[tuple, object] = {}
_FS_LOCK = threading.Lock()


def resolve(path) -> tuple[object, str]:
    """(pyarrow filesystem, path inside it). Object store filesystems are built once per bucket (region lookup and
    client set-up are network round trips)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(_local(path).absolute())
    scheme, _, rest = str(path).partition("://")
    # one per bucket and per configuration in force (an endpoint or identity changed within a process: a new one)
    key = (scheme, rest.split("/", 1)[0], *(os.environ.get(k, "") for k in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")))
    with _FS_LOCK:
        fs = _FS.get(key)
    try:
        if fs is None:
            fs, inner = pafs.FileSystem.from_uri(str(path))
            with _FS_LOCK:
                _FS[key] = fs
            return fs, inner.rstrip("/")
    except (OSError, ValueError) as err:
        raise StorageError(f"{path}: {_reason(err)}") from None
    return fs, rest.rstrip("/")


def _reason(err: BaseException) -> str:
    """The useful part of an AWS SDK / GCS error, in words."""
    text = str(err)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "the bucket does not exist"
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Could not resolve" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return ("cannot reach the object store" + (f" at AWS_ENDPOINT_URL={endpoint}" if endpoint else "")
                + " (check the endpoint and the network)")
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY", "SIGNATURE",
                               "response code: 403")):
        return "access denied (check the credentials and the bucket policy)"
    return text.splitlines()[0][:300] if text else type(err).__name__


def _call(path, fn, *args):
    try:
        return fn(*args)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{path}: {_reason(err)}") from None


def _info(path):
    import pyarrow.fs as pafs

    fs, inner = resolve(path)
    return _call(path, fs.get_file_info, inner), pafs.FileType


def exists(path) -> bool:
    if not is_uri(path):
        return _local(path).exists()
    info, ft = _info(path)
    return info.type != ft.NotFound


def is_file(path) -> bool:
    if not is_uri(path):
        return _local(path).is_file()
    info, ft = _info(path)
    return info.type == ft.File


def is_dir(path) -> bool:
    """A local folder; for an object store, a prefix that holds at least one object."""
    if not is_uri(path):
        return _local(path).is_dir()
    info, ft = _info(path)
    return info.type == ft.Directory


def size(path) -> int:
    if not is_uri(path):
        return _local(path).stat().st_size
    info, ft = _info(path)
    if info.type == ft.NotFound:
        raise FileNotFoundError(path)
    return int(info.size)


def open_input(path):
    """A seekable binary file (pyarrow ``NativeFile`` for a URI), for ``pyarrow.parquet`` or plain reads."""
    if not is_uri(path):
        return open(_local(path), "rb")
    fs, inner = resolve(path)
    return _call(path, fs.open_input_file, inner)


def read_bytes(path) -> bytes:
    if not is_uri(path):
        return _local(path).read_bytes()
    with open_input(path) as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` so that a reader sees all of it under ``path`` or nothing (see the module doc). ``durable``:
    fsync a local file before it is named (object stores acknowledge an upload once it is stored)."""
    if not is_uri(path):
        dest = _local(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
        return
    fs, inner = resolve(path)
    parent, name = posixpath.split(inner)
    tmp = posixpath.join(parent, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
    stream = _call(path, fs.open_output_stream, tmp)
    try:
        stream.write(data)
    except BaseException:
        # the stream is left unclosed on purpose: closing would complete the upload; its temp key is never read
        raise
    _call(path, stream.close)
    try:
        _call(path, fs.move, tmp, inner)  # a server-side copy, then the temp key's delete
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def list_files(path, *, recursive: bool = False) -> list[tuple[str, int]]:
    """(full path or URI, size) of the files under a folder or prefix, sorted; empty when there is none. Names
    under ``_tmp/`` (uploads in progress) are left out."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        root = _local(path)
        if not root.is_dir():
            return []
        it = root.rglob("*") if recursive else root.iterdir()
        return sorted((str(p), p.stat().st_size) for p in it if p.is_file())
    fs, inner = resolve(path)
    infos = _call(path, fs.get_file_info, pafs.FileSelector(inner, allow_not_found=True, recursive=recursive))
    base = str(path).rstrip("/")
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(inner):].lstrip("/")
        if rel.split("/", 1)[0] == TMP_DIR:
            continue
        out.append((f"{base}/{rel}", int(info.size)))
    return sorted(out)


def delete(path) -> None:
    """Delete a file or object (nothing when it is not there)."""
    if not is_uri(path):
        _local(path).unlink(missing_ok=True)
        return
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"{path}: {_reason(err)}") from None


def delete_tmp(folder) -> None:
    """Clear the ``_tmp/`` uploads a killed writer left under an object store prefix."""
    if not is_uri(folder):
        return
    import pyarrow.fs as pafs

    fs, inner = resolve(folder)
    tmp = posixpath.join(inner, TMP_DIR)
    if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
        _call(folder, fs.delete_dir, tmp)


def sha256_of(path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open_input(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def upload_dir(local: str | Path, dest: str) -> None:
    """Copy a local folder to ``dest`` (a URI, or a local folder, replaced)."""
    import pyarrow.fs as pafs

    if not is_uri(dest):
        out = _local(dest)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(local, out)
        return
    fs, inner = resolve(dest)
    _call(dest, lambda: fs.create_dir(inner, recursive=True))
    try:
        pafs.copy_files(str(local), inner, destination_filesystem=fs)
    except OSError as err:
        raise StorageError(f"{dest}: {_reason(err)}") from None


def download_dir(src: str, local: str | Path) -> Path:
    """Copy a folder or prefix to the local folder ``local`` (created); returns it."""
    import pyarrow.fs as pafs

    dest = Path(local)
    dest.mkdir(parents=True, exist_ok=True)
    fs, inner = resolve(src)
    info = _call(src, fs.get_file_info, inner)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{src}: no such folder or prefix")
    try:
        pafs.copy_files(inner, str(dest), source_filesystem=fs)
    except OSError as err:
        raise StorageError(f"{src}: {_reason(err)}") from None
    return dest


def _aws_credentials_found() -> bool:
    """AWS's own credential chain (environment, profiles, web identity, container and instance roles)."""
    try:
        import botocore.session
    except ImportError:  # no boto3 here: let the AWS SDK inside pyarrow try its chain
        return True
    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile file is the user's to see, in the error below
        return False


def check(path, what: str, *, write: bool = False) -> None:
    """Before any cluster work: an object store path is reachable with the credentials at hand, its bucket exists,
    and (``write``) an object can be written there. One :class:`StorageError` line otherwise, naming ``what`` (the
    config field or flag) and the path. Local paths are the callers' to check."""
    if not is_uri(path):
        return
    scheme, _, rest = str(path).partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{what}: {path} names no bucket (write {scheme}://BUCKET/PREFIX)")
    if scheme == "s3" and not _aws_credentials_found():
        raise StorageError(f"{what}: {path}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an IAM role)")
    import pyarrow.fs as pafs

    try:
        fs, inner = resolve(path)
        info = fs.get_file_info(bucket)
    except StorageError as err:
        raise StorageError(f"{what}: {err}") from None
    except OSError as err:
        raise StorageError(f"{what}: {path}: {_reason(err)}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {path}: bucket {bucket!r} does not exist")
    if write:
        probe = join(path, TMP_DIR, f"probe-{uuid.uuid4().hex}")
        try:
            write_bytes(probe, b"")
            delete(probe)
        except StorageError as err:
            raise StorageError(f"{what}: cannot write under {path} ({str(err).split(': ', 1)[-1]})") from None


def ray_job_env_keys() -> set[str]:
    """The environment variables the Ray job this driver runs in (``ray job submit``) already sets on every worker.
    A driver's ``ray.init(runtime_env=...)`` must not set them again: Ray refuses the merge (and its error message
    prints both environments, values included)."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return set()
    return set(((job.get("runtime_env") or {}).get("env_vars") or {}).keys())


def forwarded_env(environ: dict | None = None) -> dict[str, str]:
    """The object storage variables set here (:data:`FORWARDED_ENV`), for a Ray runtime env; inside a Ray job, only
    those the job does not set already."""
    environ = os.environ if environ is None else environ
    skip = ray_job_env_keys()
    return {k: environ[k] for k in FORWARDED_ENV if environ.get(k) and k not in skip}


def local_copy(path, what: str) -> str:
    """A local path for a file or folder given as a URI (model weights, a teacher's export): downloaded into a
    temporary folder of this machine (a cache, removed with the process's temp files); a local path as is."""
    import tempfile

    if not is_uri(path):
        return path
    dest = Path(tempfile.mkdtemp(prefix="vitray-fetch-")) / basename(path)
    try:
        if is_file(path):
            dest.write_bytes(read_bytes(path))
            return str(dest)
        if not is_dir(path):
            raise StorageError(f"{path}: no such file, folder or prefix")
        return str(download_dir(path, dest))
    except StorageError as err:
        raise StorageError(f"{what}: {err}") from None


def stat(path) -> tuple[int, int]:
    """(size, modification time in ns) of a file or object."""
    if not is_uri(path):
        st = _local(path).stat()
        return st.st_size, st.st_mtime_ns
    info, ft = _info(path)
    if info.type == ft.NotFound:
        raise FileNotFoundError(path)
    return int(info.size), int(info.mtime_ns or 0)


def uri_in(path: str, like: str) -> str:
    """A path inside a filesystem (Ray Train's ``Checkpoint.path``: ``bucket/prefix/...``) as a URI of the same
    scheme as ``like`` (the run storage), so it can be printed and passed back; a local path as is."""
    if not is_uri(like) or is_uri(path):
        return path
    return f"{str(like).split('://', 1)[0]}://{path.lstrip('/')}"
