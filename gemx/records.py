"""Typed records: each JSON file gemx writes and reads back is one pydantic model, read through one loader.

The records are the export manifest (`gemx.exporter.manifest`), the build record (`gemx.runtimes.build_record`), the
serving manifest (`gemx.serving.repository`) and the INT8 range table (`gemx.int8.ranges`). The loader checks a file's
format and version first, so a file of another kind, or of a newer gemx, is named as such. Then it checks every field's
type strictly: a hand-edited "3" is not 3. A bad file gets one line that names the first wrong field and says what
to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemx.errors import GemxError
from gemx.fs import atomic_write


class Part(BaseModel):
    """A part of a record: the fields it declares, each of its type, and no others."""

    model_config = ConfigDict(extra="forbid", strict=True)


def omitted_when_none(default: Any = None) -> Any:
    """A field written only when it has a value (a record of one kind lacks what another kind has)."""
    return Field(default=default, exclude_if=lambda v: v is None)


class Record(Part):
    """A JSON file of one format and version. Subclasses fix both as literal fields with their one allowed value:
    `format: Literal["gemx-export"] = "gemx-export"`, `version: Literal[1] = 1`."""

    INDENT: ClassVar[int] = 2  # how the file is laid out (kept as it was, so rewriting a record leaves its bytes)

    @classmethod
    def kind(cls) -> tuple[str, int]:
        return cls.model_fields["format"].default, cls.model_fields["version"].default

    @classmethod
    def read(cls, path: Path, redo: str) -> Self:
        """The record in `path`, or one GemxError line ending in `redo` (what makes the file again)."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text)
        except OSError as e:
            raise GemxError(f"cannot read {path}: {e.strerror}; {redo}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GemxError(f"{path} is corrupt ({e}); {redo}") from None
        fmt, version = cls.kind()
        if not isinstance(data, dict) or data.get("format") != fmt:
            raise GemxError(f"{path} is not a {fmt} file; {redo}")
        if not isinstance(data.get("version"), int):
            raise GemxError(f"{path} is malformed (no integer version); {redo}")
        if data["version"] > version:
            raise GemxError(f"{path} has format version {data['version']}; this gemx reads {fmt} up to version "
                            f"{version}: upgrade gemx")
        if data["version"] < version:
            raise GemxError(f"{path} was written by an older gemx ({fmt} version {data['version']}); {redo}")
        cls.check_raw(data, path, redo)
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise GemxError(f"{path} is malformed ({first_error(e)}); {redo}") from None

    @classmethod
    def check_raw(cls, data: dict, path: Path, redo: str) -> None:
        """A check of the file as read, before its fields are typed (the export manifest's content hash)."""

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=self.INDENT) + "\n"

    def write(self, path: Path) -> None:
        """The file whole or not at all."""
        text = self.to_json()
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def first_error(e: ValidationError) -> str:
    """The first wrong field of a record, as `a.b.0.c: what is wrong`."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    what = {"missing": "missing", "extra_forbidden": "not a field of this record"}.get(err["type"],
                                                                                    err["msg"].removeprefix("Value error, "))
    return f"{where}: {what}" if where else what
