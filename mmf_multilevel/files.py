"""Small file helpers shared by the long-running tools (extractor, image packer, data generator)."""
import os

__all__ = ["write_lines_atomically", "save_torch_atomically", "write_atomically", "write_bytes_atomically",
           "write_picture"]


def write_lines_atomically(path, lines, header=None, remove_when_empty=False):
    """Write ``header`` and ``lines`` (each without its newline) to ``path`` through a temporary file and
    a rename, so a reader never sees half a file. With ``remove_when_empty`` and no lines, a file left by
    an earlier run is removed instead (a failure list that has become empty)."""
    lines = list(lines)
    if remove_when_empty and not lines:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        if header is not None:
            handle.write(header + "\n")
        for line in lines:
            handle.write(line + "\n")
    os.replace(tmp, path)


def save_torch_atomically(obj, path):
    """``torch.save(obj, path)`` through a temporary file and a rename: a converter that fails or is
    killed leaves no half-written checkpoint (and no temporary file)."""
    import torch

    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_atomically(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, then a rename onto ``path`` (a figure, a checkpoint):
    a writer that fails leaves neither a half-written ``path`` nor the temporary file; one that is killed
    leaves at most the temporary file, never a half-written ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomically(path, data: bytes):
    """``data`` written to ``path`` through a temporary file and a rename (a page, a PNG, a small JSON file); the
    parent folder is created. Returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)

    write_atomically(path, write)
    return path


def write_picture(figure, path):
    """Save a matplotlib ``figure`` to ``path`` (format from its extension, PNG by default) through a
    temporary file and a rename; the parent folder is created. Returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    extension = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    write_atomically(path, lambda tmp: figure.savefig(tmp, format=extension, dpi=figure.dpi))
    return path
