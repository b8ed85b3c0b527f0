"""Bytes on disk of some installed distributions and everything they require.

    ENV/bin/python install_size.py keras tensorflow-cpu

Prints one JSON object: ``bytes`` (the closure's total) and ``distributions``
(name -> bytes). Run with each contender's own Python so the closure is that
environment's; needs only the standard library and pip (always in a venv).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name


def closure(names: list[str]) -> dict[str, metadata.Distribution]:
    """The named distributions and, transitively, their unconditional requirements."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def dist_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        try:
            total += dist.locate_file(f).stat().st_size
        except OSError:
            pass
    return total


def main(argv: list[str]) -> int:
    sizes = {name: dist_bytes(d) for name, d in sorted(closure(argv[1:]).items())}
    print(json.dumps({"bytes": sum(sizes.values()), "distributions": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
