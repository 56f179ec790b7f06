"""The user's data, read through Hugging Face `datasets`: rows as dicts, the fields they have, and a digest.

    rows = load_rows("aime24.parquet")             # one file: .jsonl .json .parquet .arrow .csv .txt
    rows = load_rows("r1_math/", split="train")    # a folder written by Dataset(Dict).save_to_disk, or holding
                                                   # one data file per split (train.jsonl, test.jsonl, ...)
    field = rows.pick("prompt", ("prompt", "text"), explicit=args.prompt_field, flag="--prompt-field")

Every refusal is a DataError (a ValueError) whose message names the fix, raised before any server starts.
Nothing is written to the Hugging Face cache: files are parsed into a temporary cache, then held as rows.
"""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
                ".txt": "text"}  # suffix -> datasets' packaged builder
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk
QUIET_BYTES = 64 << 20  # datasets' progress bars only for data larger than this: small files parse at once
SUPPORTED = f"{', '.join(FILE_FORMATS)} files, or a folder saved with datasets' save_to_disk"


class DataError(ValueError):
    """Data that cannot be used as given; the message names the fix."""


@dataclass(frozen=True)
class Rows:
    source: str  # the path, with the split chosen: "data/:test"
    columns: tuple[str, ...]
    rows: list[dict]

    def pick(self, role: str, candidates: Sequence[str], explicit: str | None, flag: str, required: bool = True,
             fix: str | None = None) -> str | None:
        """`explicit` if given (it must be a column), else the first of `candidates` that is one; None if
        nothing matches and not `required`, else a DataError naming `fix` (default: "FLAG FIELD")."""
        if explicit is not None:
            if explicit not in self.columns:
                raise DataError(f"{self.source} has no field {explicit!r} ({flag}); its fields are "
                                f"{list(self.columns)}: pass one of them with {flag}")
            return explicit
        found = next((name for name in candidates if name in self.columns), None)
        if found is None and required:
            raise self.no_field(role, candidates, fix or f"{flag} FIELD")
        return found

    def no_field(self, role: str, candidates: Sequence[str], fix: str) -> DataError:
        looked = ", ".join(repr(c) for c in candidates)
        return DataError(f"{self.source} has no {role} field (looked for {looked}); its fields are "
                         f"{list(self.columns)}: name the {role} field with {fix}")


def load_rows(path: str | Path, split: str | None = None) -> Rows:
    """All rows of a data file or saved dataset; refuses a missing path, an unknown format, a missing or
    ambiguous split and data with no rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass {SUPPORTED}")
    with tempfile.TemporaryDirectory(prefix="easyep-datasets-") as cache_dir, _progress_bars(_size(path) > QUIET_BYTES):
        dataset, source = _open_folder(path, split, cache_dir) if path.is_dir() else _open_file(path, split, cache_dir)
        columns, rows = tuple(dataset.column_names), dataset.to_list()  # read before the cache goes
    if path.is_file() and FILE_FORMATS[path.suffix.lower()] == "text":  # a line per row; blank lines hold nothing
        rows = [row for row in rows if row["text"].strip()]
    if not rows:
        raise DataError(f"{source} holds no rows; pass data with at least one row")
    return Rows(source, columns, rows)


@contextmanager
def _progress_bars(show: bool):
    import datasets

    was_shown = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_shown else datasets.disable_progress_bars)()


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _open_file(path: Path, split: str | None, cache_dir: str):
    import datasets

    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; pass {SUPPORTED}")
    if split is not None:
        raise DataError(f"{path} is a single file, which has no splits; drop --split {split}")
    if builder in ("json", "csv", "text") and not path.read_bytes().strip():
        raise DataError(f"{path} is empty; pass a file with at least one row")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:  # datasets and pyarrow raise many types for a file they cannot parse
        raise DataError(f"{path} could not be read as {builder} ({type(err).__name__}: {err}); fix the file or "
                        f"convert it to one of {', '.join(FILE_FORMATS)}") from None
    return dataset, str(path)


def _open_folder(path: Path, split: str | None, cache_dir: str):
    import datasets

    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(path))
    else:
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FILE_FORMATS)
        if not files:
            raise DataError(f"{path} holds no data files and was not written by save_to_disk; pass {SUPPORTED}")
        try:
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        except Exception as err:
            raise DataError(f"{path} could not be read as a dataset of {files} ({type(err).__name__}: {err}); "
                            "keep one format per folder, files named by split (train.jsonl, test.jsonl)") from None
    return _choose_split(loaded, split, path)


def _choose_split(loaded, split: str | None, path: Path):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise DataError(f"{path} holds one dataset, which has no splits; drop --split {split}")
        return loaded, str(path)
    names = list(loaded)
    if split is None and len(names) == 1:
        split = names[0]
    elif split is None:
        raise DataError(f"{path} has the splits {names}; choose one with --split")
    elif split not in names:
        raise DataError(f"{path} has no split {split!r}; its splits are {names}: choose one with --split")
    return loaded[split], f"{path}:{split}"


def data_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative name and content, in name order)."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
