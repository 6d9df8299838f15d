"""Small shared pieces of the weak-corpus builder: atomic files, stage manifests, the run report.

Nothing here imports torch, faiss, spaCy or sentence-transformers.
"""
import json
import os
import sys
import tempfile


class RetrievalError(Exception):
    """A problem with the user's input or settings; the message says what and where."""


class StageMismatchError(RetrievalError):
    """A work directory holds a stage built with other settings than the ones given now."""


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class AtomicFile:
    """``with AtomicFile(path, "w") as f: ...``: the file appears under ``path`` only when the block ends cleanly."""

    def __init__(self, path, mode="w", encoding="utf-8"):
        self.path = os.fspath(path)
        self.mode = mode
        self.encoding = None if "b" in mode else encoding
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        self.file = None

    def __enter__(self):
        self.file = open(self.tmp, self.mode, encoding=self.encoding)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
        finally:
            if exc_type is None:
                os.replace(self.tmp, self.path)
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            else:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
        return False


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_temps(folder):
    """Delete temporary files a killed run left in ``folder`` (names ``.<name>.<random>.tmp``)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


# --------------------------------------------------------------------------- manifests
class Manifest:
    """The record of one resumable stage: its settings and the chunks already finished.

    ``settings`` must equal those of an existing manifest, otherwise the stage was built
    with other inputs or options and resuming it would mix results: that raises
    :class:`StageMismatchError` naming the differing keys. ``mark_done`` rewrites the
    manifest atomically, so after kill -9 it lists exactly the chunks whose data were
    written (and flushed) before.
    """

    def __init__(self, path, stage, settings):
        self.path = os.fspath(path)
        self.stage = stage
        self.settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists, ...)
        self.done = set()
        self.extra = {}
        self.complete = False
        if os.path.exists(self.path):
            try:
                old = read_json(self.path)
            except (OSError, ValueError) as exc:
                raise StageMismatchError(f"{self.path}: unreadable manifest ({exc}); delete the stage folder to rebuild it") from None
            if old.get("settings") != self.settings:
                old_settings = old.get("settings") or {}
                keys = sorted(k for k in set(old_settings) | set(self.settings) if old_settings.get(k) != self.settings.get(k))
                diffs = "; ".join(f"{k}: built with {old_settings.get(k)!r}, now {self.settings.get(k)!r}" for k in keys)
                raise StageMismatchError(
                    f"{self.path}: the {stage} stage in this work directory was built with other settings ({diffs}). "
                    f"Use another --work directory, or pass --force to rebuild this stage."
                )
            self.done = set(old.get("done", []))
            self.extra = dict(old.get("extra", {}))
            self.complete = bool(old.get("complete", False))

    def is_done(self, chunk):
        return chunk in self.done

    def mark_done(self, chunk, **extra):
        self.done.add(chunk)
        self.extra.update(extra)
        self._write()

    def mark_complete(self, **extra):
        self.extra.update(extra)
        self.complete = True
        self._write()

    def _write(self):
        atomic_write_json(
            self.path,
            {"stage": self.stage, "settings": self.settings, "done": sorted(self.done), "extra": self.extra, "complete": self.complete},
        )


# --------------------------------------------------------------------------- report
class Report:
    """Counts what was skipped or repaired, prints the first few examples of each, and a final summary."""

    def __init__(self, max_examples=5, stream=None, quiet=False):
        self.counts = {}
        self.examples = {}
        self.info = {}
        self.max_examples = max_examples
        self.stream = stream
        self.quiet = quiet

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def problem(self, kind, message):
        """One bad input item of ``kind`` (e.g. ``corpus_empty_line``); ``message`` names file/line/field."""
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= self.max_examples:
            self.examples.setdefault(kind, []).append(message)
            if not self.quiet:
                print(f"warning: {message}", file=self._out())
            if n == self.max_examples and not self.quiet:
                print(f"warning: further '{kind}' problems are only counted (see the summary)", file=self._out())

    def note(self, key, value):
        self.info[key] = value

    def say(self, message):
        if not self.quiet:
            print(message, file=self._out())

    def merge_counts(self, counts, examples=None):
        """Add another report's counts (and its first examples, not printed again)."""
        for kind, n in counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        for kind, messages in (examples or {}).items():
            kept = self.examples.setdefault(kind, [])
            kept.extend(messages[: max(0, self.max_examples - len(kept))])

    def summary(self):
        return {"problems": dict(sorted(self.counts.items())), **{k: self.info[k] for k in sorted(self.info)}}


def progress(iterable=None, total=None, desc="", unit="it", disable=None, initial=0):
    """A tqdm bar (items/s shown); disabled with MMF_ML_NO_PROGRESS=1 or when stderr is not a terminal in CI logs."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("MMF_ML_NO_PROGRESS", "") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, dynamic_ncols=True, smoothing=0.1)
