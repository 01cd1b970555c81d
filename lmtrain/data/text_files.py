"""Local text and JSON-lines files, read in pieces so memory stays flat however large a file (or a line) is.

A `.txt`/`.md` file is one document, yielded as pieces of about PIECE_BYTES, cut after a newline where
there is one, else after a space, else anywhere (at a character boundary): a multi-gigabyte file that is
a single line prepares like any other. Each record carries `_document` (the file's index: the
validation split keeps whole documents) and `_continues` (more of the same document follows, so no
end-of-text goes after it). Bytes that are not UTF-8 are an error naming the file and the byte offset,
or become U+FFFD with `data.encoding_errors=replace`.

A `.jsonl` file has one record per line; a line that is not JSON, not an object, or whose text is
missing, null or not a string is an error naming the file and line, or is skipped and counted with
`data.skip_bad_records=true`.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmtrain.errors import DataError

log = logging.getLogger(__name__)

PIECE_BYTES = 256 * 1024  # text read and handed on at a time; a tokenizer batch holds a few hundred of them


def _not_utf8(file: Path, offset: int, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{file} is not UTF-8 text: byte {offset:,} (0x{e.object[e.start]:02x}) cannot be decoded; "
                     "convert the file to UTF-8, or set data.encoding_errors=replace to replace such bytes with U+FFFD")


def text_pieces(file: Path, errors: str) -> Iterator[str]:
    """A text file's content in pieces of about PIECE_BYTES, cut after a newline or space where possible."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, carry = 0, ""  # bytes read so far; the text after the last cut
    with open(file, "rb") as f:
        while chunk := f.read(PIECE_BYTES):
            buffered = len(decoder.getstate()[0])  # a character's first bytes, held from the previous chunk
            try:
                text = carry + decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise _not_utf8(file, offset - buffered + e.start, e) from None
            offset += len(chunk)
            cut = text.rfind("\n") + 1 or text.rfind(" ")  # before a space: byte-level BPE keeps " word" whole
            cut = cut if cut > 0 else len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]
        try:
            carry += decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise _not_utf8(file, offset - len(decoder.getstate()[0]) + e.start, e) from None
    if carry:
        yield carry


def text_records(files: list[str], column: str, errors: str, max_documents: int | None) -> Iterator[dict]:
    """Each file one document, as pieces: {column: piece, "_document": file index, "_continues": bool}."""
    for index, file in enumerate(files[:max_documents]):
        held = None  # a piece is yielded once the next is known, so the last one says it ends the document
        for piece in text_pieces(Path(file), errors):
            if held is not None:
                yield {column: held, "_document": index, "_continues": True}
            held = piece
        if held is not None:
            yield {column: held, "_document": index, "_continues": False}


@dataclass
class _Skipped:
    """Bad records skipped in one file: their count and the first one's words (memory stays flat)."""
    count: int = 0
    first: str | None = None


def _bad(file: str, line: int, why: str, skip: bool, skipped: _Skipped) -> None:
    if not skip:
        raise DataError(f"{file}, line {line}: {why}; fix the line, or skip such records with "
                        "data.skip_bad_records=true")
    skipped.count += 1
    skipped.first = skipped.first or f"line {line}: {why}"


def jsonl_records(files: list[str], column: str, errors: str, skip_bad: bool,
                  max_documents: int | None) -> Iterator[dict]:
    """One record per line: {column: text, "_document": its index, "_continues": False}."""
    count = 0
    for file in files:
        skipped = _Skipped()
        offset = 0
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    raise _not_utf8(Path(file), offset + e.start, e) from None
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(file, number, f"not valid JSON ({e.msg} at column {e.colno})", skip_bad, skipped)
                    continue
                if not isinstance(record, dict):
                    _bad(file, number, f"a JSON {type(record).__name__}, not an object", skip_bad, skipped)
                    continue
                if column not in record:
                    if count == 0 and not skipped.count:  # the first record: more likely a wrong column than a bad line
                        raise DataError(f"data.text_column={column!r} is not a field of {file}, line {number}; "
                                        f"its fields are {sorted(record)}")
                    _bad(file, number, f"no {column!r} field (data.text_column)", skip_bad, skipped)
                    continue
                text = record[column]
                if not isinstance(text, str):
                    _bad(file, number, f"its {column!r} is {json.dumps(text)[:40]}, not a string", skip_bad, skipped)
                    continue
                if max_documents is not None and count >= max_documents:
                    return
                yield {column: text, "_document": count, "_continues": False}
                count += 1
        if skipped.count:
            log.warning("Skipped %d bad records in %s (data.skip_bad_records=true); the first: %s",
                        skipped.count, file, skipped.first)
