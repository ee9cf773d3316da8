"""Small file helpers with no mtp-spec imports: everything written is written whole or not at all.

A file goes to a temp file beside it and is renamed into place; a directory (a checkpoint, an
import) is built in a temp directory beside its destination and renamed at the end, so a kill
mid-way leaves the old destination (or nothing), never half of a new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_not_inside(dst: str | os.PathLike, src: str | os.PathLike, what: str = "destination") -> None:
    """Refuse a destination that is the source or lies inside it (a rewrite would eat its own input)."""
    d, s = Path(dst).resolve(), Path(src).resolve()
    if d == s or s in d.parents:
        raise ValueError(f"{what} {dst} is {'the source' if d == s else 'inside the source'} {src}; "
                         "choose another directory")


@contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory beside `dst`; on success make it readable and rename it to `dst`
    (replacing an old checkpoint there), on any error remove it. Anything at `dst` that is not an
    empty directory or a checkpoint (config.json) is refused, never replaced."""
    dst = Path(dst)
    if dst.exists() and not (dst.is_dir() and (not any(dst.iterdir()) or (dst / "config.json").exists())):
        raise ValueError(f"refusing to replace {dst}: it exists and is not a checkpoint directory "
                         "(no config.json); choose a new or empty directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
