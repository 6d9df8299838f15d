"""Annotation files: jsonl (one JSON object per line), checked as they are read.

Errors name the file, the line number and the field, e.g.
``annotations/vqa_train.jsonl:17: field 'answers' must be a list of 10 strings, got 3``.
"""
import json
import os

from mmf_multilevel.files import write_lines_atomically


class AnnotationError(ValueError):
    """A malformed annotation file or record (the message names file, line and field)."""


def read_jsonl(path, required=(), validate=None):
    """Records of a jsonl file as dicts.

    ``required``: field names every record must carry. ``validate(record) -> str|None``
    returns a problem description for a record, or None. Blank lines are skipped.
    """
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file not found: {path}")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise AnnotationError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            for field in required:
                if field not in record:
                    raise AnnotationError(f"{path}:{number}: missing field '{field}'")
            if validate is not None:
                problem = validate(record)
                if problem:
                    raise AnnotationError(f"{path}:{number}: {problem}")
            records.append(record)
    if not records:
        raise AnnotationError(f"{path}: no records")
    return records


def write_jsonl(path, records):
    """Write records atomically (temporary file, then rename)."""
    write_lines_atomically(path, (json.dumps(record, ensure_ascii=False) for record in records))
