"""Revisions derived from the code that makes an artifact, instead of counters bumped by hand.

A cached export or a build is reused only if it was made by the same code: its revision is a hash of the source
files that decide its bytes (and the versions of the libraries that write them). Any edit to those files makes
a new revision, so a forgotten bump can no longer serve stale graphs; an edit that changes nothing (a comment)
only costs one re-export.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


@cache
def code_revision(*sources: str, libraries: tuple[str, ...] = ()) -> str:
    """A short hash of gemx's `sources` (paths inside the package, e.g. "model/network.py") and the installed
    versions of `libraries` (distribution names)."""
    h = hashlib.sha256()
    for source in sources:
        h.update(source.encode() + b"\0" + (PACKAGE / source).read_bytes() + b"\0")
    for library in libraries:
        try:
            version = metadata.version(library)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{library}=={version}\0".encode())
    return h.hexdigest()[:16]
