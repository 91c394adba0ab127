"""Text corpora: the running interpreter's standard library (the default, on every machine with
Python, no download) or the user's own text files and folders; split into training and validation
documents by file, deterministically."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Third-party code installed under the standard library's folder is not part of it.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the folder it was found in: the key of sorting and of the split
    text: str


def read_text(path: Path) -> str | None:
    """The file's text if it is UTF-8 without NUL bytes, else None (binary or another encoding)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_file(path: Path) -> str:
    """The text of a file the user named; ValueError naming it when it is not UTF-8 text."""
    text = read_text(path)
    if text is None:
        raise ValueError(f"{path} is not a UTF-8 text file")
    return text


def stdlib_documents() -> list[Document]:
    """Every `.py` file of the standard library, sorted by path. The few that are not UTF-8
    (test data for other encodings) are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if _NOT_STDLIB.isdisjoint(p.relative_to(root).parts))
    documents = [Document(p.relative_to(root).as_posix(), read_text(p)) for p in files]
    return [d for d in documents if d.text is not None]


def user_documents(paths: Sequence[str | Path]) -> list[Document]:
    """The text files named, and every text file below the folders named (hidden ones skipped), each
    folder's in sorted order. FileNotFoundError for a missing path or when no text is found;
    ValueError for a named file that is not UTF-8 text."""
    documents: list[Document] = []
    for path in map(Path, paths):
        if path.is_file():
            documents.append(Document(path.name, text_file(path)))
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                relative = file.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                text = read_text(file)
                if text is not None:
                    documents.append(Document(relative.as_posix(), text))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not any(d.text for d in documents):
        raise FileNotFoundError(f"no UTF-8 text files found in {', '.join(map(str, paths))}")
    return documents


def load_documents(paths: Sequence[str | Path] = ()) -> list[Document]:
    """The user's documents, or the standard library's when no path is given."""
    return user_documents(paths) if paths else stdlib_documents()


def _hash_fraction(name: str) -> float:
    """A number in [0, 1) fixed by the name alone (same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(documents: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation): a document goes to validation when the hash of its name falls below
    `val_fraction`, so adding or removing other files never moves it. At least one document is held
    out (the one of smallest hash), and at least one is kept for training. A corpus of one document
    (one file) is split within it by `split_text`."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"invalid val_fraction={val_fraction!r}: must be in (0, 1)")
    if not documents:
        raise ValueError("no document to split into training and validation")
    if len(documents) == 1:
        train, val = split_text(documents[0].text, val_fraction, documents[0].name)
        return [Document(documents[0].name, train)], [Document(documents[0].name, val)]
    fractions = [_hash_fraction(d.name) for d in documents]
    threshold = max(val_fraction, min(fractions) + 1e-12)
    val = [d for d, f in zip(documents, fractions) if f < threshold]
    if len(val) == len(documents):
        raise ValueError(f"val_fraction={val_fraction} leaves no document for training")
    train = [d for d, f in zip(documents, fractions) if f >= threshold]
    return train, val


def split_text(text: str, val_fraction: float, name: str) -> tuple[str, str]:
    """(training, validation) parts of one text: validation is its last `val_fraction` of characters
    (at least one), begun instead at the start of their first line when that keeps it under twice its
    share; each part keeps at least one character."""
    point = len(text) - max(1, round(len(text) * val_fraction))
    if point < 1:
        raise ValueError(f"{name} is too short to hold out val_fraction={val_fraction} of it for validation")
    line = text.rfind("\n", 0, point) + 1
    cut = line if line and len(text) - line <= 2 * (len(text) - point) else point
    return text[:cut], text[cut:]
