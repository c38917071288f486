"""
Small layer tars for tests: regular files with given contents, built with
L{tarfile}, so that a test says what the layer holds rather than how a tar
is written.  (Tests of the tar format itself craft their entries by hand.)
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Mapping


def files_tar(
    files: Mapping[str, bytes], *, format: int = tarfile.PAX_FORMAT, directories: bool = False
) -> bytes:
    """
    A tar of regular files, C{{name: content}} in order, each mode 0644,
    owned by 0:0, dated the epoch, in C{format}.  With C{directories}, each
    file is preceded by an entry (mode 0755) for its parent directory.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as tar:
        for name, data in files.items():
            if directories:
                info = tarfile.TarInfo(os.path.dirname(name))
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
