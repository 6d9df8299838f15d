"""Downloads for the model zoo: resumable, checksum-verified before use, extracted atomically.

``fetch_resources(resources, folder, version)`` makes ``folder`` hold the extracted
``resources`` of one zoo entry:

* archives are downloaded to ``<cache>/downloads/<file_name>.part`` and resumed with an HTTP
  ``Range`` request after an interruption (``file://`` URLs and plain paths are copied);
* the SHA-256 of the whole file is checked before anything is extracted; a mismatch deletes the
  download and raises :class:`ZooChecksumError` (the previous folder, if any, is untouched);
* extraction goes into a temporary sibling folder (tar members are filtered: no absolute paths,
  no ``..``, no links out of the folder); only when every resource is in place is it renamed to
  ``folder``, with a ``.built.json`` recording the version and checksums - so an interrupted or
  failed build never leaves a half-extracted model behind;
* a folder whose ``.built.json`` has the same version is used as is, with no network access.
  Without a network (or with ``MMF_ZOO_OFFLINE=1``) an entry that is not cached raises
  :class:`ZooOfflineError`, naming the cache folder and where to put the archive by hand.
"""
import hashlib
import json
import os
import shutil
import tarfile
import time
import urllib.parse
import zipfile

MMF_PREFIX = "mmf://"
MMF_BASE_URL = "https://dl.fbaipublicfiles.com/mmf/data/"
BUILT_FILE = ".built.json"
CHUNK = 1 << 16


class ZooError(RuntimeError):
    """Base class of model zoo errors."""


class ZooChecksumError(ZooError):
    """A downloaded file's SHA-256 differs from the zoo entry's."""


class ZooArchiveError(ZooError):
    """A downloaded archive is truncated, corrupt, or holds unsafe paths."""


class ZooOfflineError(ZooError):
    """An entry is not cached and cannot be downloaded."""


def expand_url(url):
    return MMF_BASE_URL + url[len(MMF_PREFIX):] if url.startswith(MMF_PREFIX) else url


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def offline():
    return os.environ.get("MMF_ZOO_OFFLINE", "") not in ("", "0")


def _progress(total, name, initial):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False)


def download(url, target, retries=3, timeout=60, progress=True):
    """Download ``url`` to ``target`` (atomic: via ``target.part``, resumed when it exists)."""
    url = expand_url(url)
    parsed = urllib.parse.urlparse(url)
    part = f"{target}.part"
    if parsed.scheme in ("", "file"):
        source = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isfile(source):
            raise ZooOfflineError(f"zoo resource not found: {source}")
        shutil.copyfile(source, part)
        os.replace(part, target)
        return target
    if offline():
        raise ZooOfflineError(f"MMF_ZOO_OFFLINE is set; not downloading {url}")
    import requests

    last_error = None
    for attempt in range(retries + 1):
        done = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        try:
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
                if response.status_code == 416:  # the part file is already complete
                    break
                if response.status_code not in (200, 206):
                    raise ZooError(f"downloading {url}: HTTP {response.status_code} {response.reason}")
                if done and response.status_code == 200:  # the server ignored Range: start over
                    done = 0
                length = response.headers.get("Content-Length")
                total = done + int(length) if length is not None else None
                bar = _progress(total, os.path.basename(target), done) if progress else None
                try:
                    with open(part, "ab" if done else "wb") as f:
                        for chunk in response.iter_content(CHUNK):
                            f.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                if total is not None and os.path.getsize(part) < total:
                    raise ZooError(f"downloading {url}: connection closed after {os.path.getsize(part)} of {total} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, ZooError) as exc:
            last_error = exc
            if isinstance(exc, ZooError) and "HTTP" in str(exc):
                raise
            if attempt < retries:
                time.sleep(min(2 ** attempt, 8))
    else:
        raise ZooOfflineError(f"could not download {url} after {retries + 1} attempts: {last_error}")
    os.replace(part, target)
    return target


def _safe_members(archive, tar, destination):
    root = os.path.realpath(destination)
    for member in tar.getmembers():
        path = os.path.realpath(os.path.join(root, member.name))
        if not (path == root or path.startswith(root + os.sep)) or member.isdev():
            raise ZooArchiveError(f"{archive}: member {member.name!r} would land outside the model folder")
        if member.issym() or member.islnk():
            link = os.path.realpath(os.path.join(os.path.dirname(path), member.linkname))
            if not link.startswith(root + os.sep):
                raise ZooArchiveError(f"{archive}: link {member.name!r} -> {member.linkname!r} points outside the model folder")
        yield member


def extract(archive, destination):
    """Unpack a tar(.gz/.bz2/.xz) or zip archive into ``destination`` (which must exist)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ZooArchiveError(f"{archive}: member {bad!r} is corrupt")
                root = os.path.realpath(destination)
                for name in zf.namelist():
                    path = os.path.realpath(os.path.join(root, name))
                    if not (path == root or path.startswith(root + os.sep)):
                        raise ZooArchiveError(f"{archive}: member {name!r} would land outside the model folder")
                zf.extractall(destination)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(destination, members=list(_safe_members(archive, tar, destination)))
        else:
            return False
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ZooArchiveError(f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {exc})") from None
    return True


def is_built(folder, version):
    try:
        with open(os.path.join(folder, BUILT_FILE)) as f:
            return str(json.load(f).get("version")) == str(version)
    except (OSError, ValueError):
        return False


def fetch_resources(resources, folder, version, downloads=None, progress=True):
    """Make ``folder`` hold the resources of one zoo entry (see the module docstring); returns ``folder``."""
    if is_built(folder, version):
        return folder
    downloads = downloads or os.path.join(os.path.dirname(folder.rstrip(os.sep)), "downloads")
    os.makedirs(downloads, exist_ok=True)
    work = f"{folder.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    checksums = {}
    try:
        for resource in resources:
            url, name = resource["url"], resource.get("file_name") or os.path.basename(urllib.parse.urlparse(expand_url(resource["url"])).path)
            expected = resource.get("hashcode")
            target = os.path.join(downloads, name)
            if not (os.path.isfile(target) and expected and sha256_of(target) == expected):
                download(url, target, progress=progress)
            actual = sha256_of(target)
            if expected and actual != expected:
                os.remove(target)
                raise ZooChecksumError(
                    f"{expand_url(url)}: SHA-256 of {name} is {actual}, the zoo expects {expected}; the download was "
                    "deleted and nothing was extracted (a changed or corrupted file: try again, or check the entry)"
                )
            checksums[name] = actual
            compressed = resource.get("compressed", True)
            if not (compressed and extract(target, work)):
                shutil.copyfile(target, os.path.join(work, name))
        with open(os.path.join(work, BUILT_FILE), "w") as f:
            json.dump({"version": str(version), "sha256": checksums, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        if os.path.exists(folder):
            old = f"{folder.rstrip(os.sep)}.old-{os.getpid()}"
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
