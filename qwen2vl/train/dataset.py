"""Training data: JSONL records, encoded on demand, measured once up front.

Before training, every record is encoded once (split over the processes) to learn its token count
and to find the bad ones: malformed, missing or undecodable media, longer than ``seq_len``, or
without a supervised token. Each is reported as ``file:line: reason``, then skipped and counted or,
with ``on_bad_record: fail``, fatal. The packer needs only the lengths; samples are encoded again
when their step comes, so memory does not grow with the data set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import Dist, all_gather_objects
from .records import Record, RecordError, read_jsonl

Encoder = Callable[[list[dict[str, Any]]], Any]  # messages -> sample with input_ids, labels, pixels, grids


class DataError(ValueError):
    """Bad records under ``on_bad_record: fail``, or no usable record at all."""


@dataclass
class Bad:
    source: str  # "data.jsonl:12"
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class Dataset:
    """The usable samples of one or more JSONL files: ``lengths[i]``, ``supervised[i]``, ``sample(i)``."""

    def __init__(self, paths: list[str | Path], encode: Encoder, seq_len: int, d: Dist,
                 on_bad_record: str = "skip"):
        self.encode, self.seq_len = encode, seq_len
        records: list[Record] = []
        self.bad: list[Bad] = []
        for path in paths:
            for source, item in read_jsonl(path):
                if isinstance(item, RecordError):
                    self.bad.append(Bad(source, str(item)))
                else:
                    records.append(item)
        measured: dict[int, tuple[int, int] | Bad] = {}
        for part in all_gather_objects(d, self._measure(records, range(d.rank, len(records), d.world_size))):
            measured.update(part)
        self.records, self.lengths, self.supervised = [], [], []
        for i, record in enumerate(records):
            result = measured[i]
            if isinstance(result, Bad):
                self.bad.append(result)
            else:
                self.records.append(record)
                self.lengths.append(result[0])
                self.supervised.append(result[1])
        self.bad.sort(key=_source_key)
        names = ", ".join(str(p) for p in paths)
        if self.bad and on_bad_record == "fail":
            shown = "; ".join(str(b) for b in self.bad[:5])
            more = f" (and {len(self.bad) - 5} more)" if len(self.bad) > 5 else ""
            raise DataError(f"{len(self.bad)} bad record(s) in {names}: {shown}{more}")
        if not self.records:
            shown = "; ".join(str(b) for b in self.bad[:3])
            raise DataError(f"no usable record in {names}" + (f" ({shown})" if shown else ""))

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int):
        return self.encode(self.records[i].messages)

    def _measure(self, records: list[Record], indices) -> dict[int, tuple[int, int] | Bad]:
        out: dict[int, tuple[int, int] | Bad] = {}
        for i in indices:
            record = records[i]
            try:
                sample = self.encode(record.messages)
            except (ValueError, OSError) as e:  # media errors, budget errors, unreadable files
                out[i] = Bad(record.source, str(e))
                continue
            tokens = int(sample.input_ids.numel())
            supervised = int((sample.labels[1:] != -100).sum())
            if tokens > self.seq_len:
                out[i] = Bad(record.source, f"{tokens} tokens, more than seq_len {self.seq_len} "
                                            "(samples are never cut)")
            elif supervised == 0:
                out[i] = Bad(record.source, "no supervised token (empty assistant reply?)")
            else:
                out[i] = (tokens, supervised)
        return out

    def summary(self) -> str:
        text = f"{len(self.records)} samples, {sum(self.lengths)} tokens ({sum(self.supervised)} supervised)"
        if self.bad:
            text += f"; {len(self.bad)} bad record(s) skipped, first: {self.bad[0]}"
        return text


def _source_key(bad: Bad) -> tuple[str, int]:
    name, _, line = bad.source.rpartition(":")
    return (name, int(line)) if line.isdigit() else (bad.source, 0)
