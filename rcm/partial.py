"""Certification that survives preemption: each finished image's row is appended to a partial file
(flushed and synced as it goes), and a rerun of the same shard resumes after the rows it finds.

The partial file sits beside the certificate, hidden: ``.shard_K-of-N.tsv.partial``. Its first line
fingerprints the run (the protocol options, the size and modification time of every model file and
of the test split, and the arithmetic: device model, compute capability, torch / CUDA / cuDNN versions,
TF32 switches, since CUDA's noise streams depend on the GPU model); a rerun with another fingerprint
starts over, so rows certified under other
settings or other models never mix into a certificate. Then one JSON object per finished image: a
row written by a process killed mid-line is incomplete JSON and is dropped (that image is certified
again). JSON keeps floats exactly, so the final certificate equals an uninterrupted run's (the time
column aside). The certificate itself is still written atomically at the end, then the partial file
is removed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rcm.atomic import write_text

MAGIC = "# rcm-partial-certificate "


def partial_path(certificate: str | Path) -> Path:
    certificate = Path(certificate)
    return certificate.with_name(f".{certificate.name}.partial")


def file_stamp(path: str | Path) -> list:
    """(name, size, modification time in ns) of a file: a model or data file the rows depend on."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def _plain(value):
    """numpy scalars as the Python numbers they hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a partial certificate")


class PartialRows:
    """The rows already certified for this shard, and an appender for the next ones."""

    def __init__(self, certificate: str | Path, fingerprint: dict):
        self.path = partial_path(certificate)
        self.header = MAGIC + json.dumps(fingerprint, sort_keys=True)
        self.done: dict[int, dict] = {}
        lines = []
        if self.path.exists():
            text = self.path.read_text(errors="replace")
            first, _, rest = text.partition("\n")
            if first != self.header:
                print(f"{self.path}: written under other settings or models; starting this shard over",
                      file=sys.stderr)
            else:
                for line in rest.split("\n")[:-1]:        # the part after the last newline is unfinished
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.done[int(row["idx"])] = row
                    lines.append(line)
                if self.done:
                    print(f"{self.path}: resuming after {len(self.done)} certified images", file=sys.stderr)
        # start the file afresh with exactly the rows kept (atomically: a kill here loses nothing)
        write_text(self.path, "\n".join([self.header, *lines]) + "\n")
        self._file = open(self.path, "a")

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row, default=_plain) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, finished: bool) -> None:
        """Close; once the certificate is written (``finished``), remove the partial file."""
        self._file.close()
        if finished:
            self.path.unlink(missing_ok=True)
