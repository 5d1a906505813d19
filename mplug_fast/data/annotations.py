"""Annotation files of the official-format readers: loading and record checks with one-line errors.

``load_annotations`` reads a JSON list, Karpathy's ``dataset_coco.json`` ({"images": [...]}), JSON lines (one
object per line, e.g. ``.jsonl``), several such files (concatenated, as the official ``ann_file`` lists) or an
in-memory list of dicts. Every record remembers where it came from (``Record.origin``: ``"vqa_train.json
record 17"``, the index counting within its own file, or ``"annotation list record 17"`` in memory), so an
error about a record of several joined files names the right file and record.

``field(record, name, kind)`` reads one field and checks its JSON type: a number where a question string
belongs, or a string where a caption list belongs, fails at read time with ``AnnotationError``
(``vqa_train.json record 17: field "question" must be a string, got int``), never later character by
character.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

PathLike = str | Path
AnnotationSource = PathLike | Sequence[PathLike] | Sequence[Mapping[str, Any]]


class AnnotationError(ValueError, KeyError):
    """A bad annotation file or record; the message (one line) names the file, the record and the field.

    A ValueError, so the CLI reports it as one line; also a KeyError, for a missing field.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Record(dict):
    """One annotation record (a dict of its fields) and ``origin``, where it came from."""

    def __init__(self, fields: Mapping[str, Any], origin: str):
        super().__init__(fields)
        self.origin = origin


class Kind(NamedTuple):
    """A JSON type a field must have: how to say it and how to test a value."""

    name: str
    test: Callable[[Any], bool]


def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _is_texts(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TEXT = Kind("a string", _is_text)
TEXTS = Kind("a non-empty list of strings", _is_texts)
TEXT_OR_TEXTS = Kind("a string or a non-empty list of strings", lambda v: _is_text(v) or _is_texts(v))
TEXT_OR_INT = Kind("a string or an integer", lambda v: _is_text(v) or _is_int(v))
LIST = Kind("a list", lambda v: isinstance(v, list))

_REQUIRED = object()


def field(record: Record, name: str, kind: Kind, default: Any = _REQUIRED) -> Any:
    """``record[name]`` after checking it is of ``kind``; ``default`` when absent (without it: an error)."""
    if name not in record:
        if default is not _REQUIRED:
            return default
        raise AnnotationError(f'{record.origin} lacks field "{name}" (it has {sorted(record)})')
    value = record[name]
    if not kind.test(value):
        raise AnnotationError(
            f'{record.origin}: field "{name}" must be {kind.name}, got {type(value).__name__}'
        )
    return value


def load_annotations(ann: AnnotationSource) -> list[Record]:
    """The records of one or several annotation files, or of an in-memory list (see the module docstring).

    Raises ``FileNotFoundError`` for a missing file and ``AnnotationError`` for an empty list, or a file that
    is not JSON or JSON lines, holds no records, or holds a record that is not an object.
    """
    if isinstance(ann, (str, Path)):
        return _read_file(Path(ann))
    if len(ann) == 0:
        raise AnnotationError("no annotations: got an empty list (of files or of records)")
    if isinstance(ann[0], Mapping):
        return _records(ann, "annotation list")
    return [r for p in ann for r in _read_file(Path(p))]  # type: ignore[arg-type]


def _records(entries: Sequence[Any], where: str) -> list[Record]:
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise AnnotationError(f"{where} record {i} must be a JSON object, got {type(e).__name__}")
    return [Record(e, f"{where} record {i}") for i, e in enumerate(entries)]


def _read_file(path: Path) -> list[Record]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    images = data.get("images") if isinstance(data, dict) else None  # Karpathy's dataset_coco.json
    if isinstance(images, list) and all(isinstance(e, Mapping) for e in images):
        data = images
    elif data is None or isinstance(data, dict):  # JSON lines (a one-line file parses as one dict)
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AnnotationError(
                        f"{str(path)!r} line {n} is neither a JSON list nor JSON lines: {e}"
                    ) from e
    if not isinstance(data, list):
        raise AnnotationError(
            f"annotation file {str(path)!r} must hold a JSON list of objects or JSON lines, got "
            f"{type(data).__name__}"
        )
    if not data:
        raise AnnotationError(f"annotation file {str(path)!r} is empty: it holds no records")
    return _records(data, path.name)
