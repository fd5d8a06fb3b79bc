"""The jobs store behind `POST /v1/jobs` + `GET /v1/jobs/{id}` (the playground's
progress): bounded by count, bytes and age, and private to the API key that made each
job.

Every job belongs to an owner: the index of the API key that created it when the
server has several keys (None otherwise, one owner for everyone). A job is visible
only to its owner (another key gets 404, as for a job that does not exist), and
each owner has its own budget, so one key's jobs never evict another's results:

- `max_jobs` records (queued, running or finished); a new job evicts the owner's
  oldest finished one, and is refused (429) when all of them are still in flight;
- `max_bytes` of kept results (their base64 text); past it the owner's oldest
  results go; a single result larger than that is not kept (the job reports an error
  saying to use `POST /v1/generate`);
- a finished job is forgotten `ttl_s` seconds after it finished.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class JobRecord:
    id: str
    job: Any           # the batching Job (state, step, total)
    body: Any          # the GenerateRequest
    owner: Hashable
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    size: int = 0      # bytes of the kept result


def result_size(result: dict[str, Any] | None) -> int:
    """What a kept result costs: its images' base64 text (everything else is small)."""
    return sum(len(image["b64"]) for image in (result or {}).get("images", ()))


class JobStore:
    def __init__(self, max_jobs: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_jobs, self.max_bytes, self.ttl_s, self.clock = max(1, max_jobs), max_bytes, ttl_s, clock
        self._records: OrderedDict[str, JobRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def room_for(self, owner: Hashable) -> bool:
        """Whether `owner` may start one more job (evicting its oldest finished one)."""
        self.expire()
        mine = self._of(owner)
        return len(mine) < self.max_jobs or any(r.finished is not None for r in mine)

    def add(self, record: JobRecord) -> None:
        """Keep a new job (call `room_for` first), evicting the owner's oldest finished
        job while it has `max_jobs` of them."""
        mine = self._of(record.owner)
        while len(mine) >= self.max_jobs:
            oldest = next((r for r in mine if r.finished is not None), None)
            if oldest is None:
                break
            mine.remove(oldest)
            del self._records[oldest.id]
        self._records[record.id] = record

    def finish(self, record: JobRecord, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        record.finished = self.clock()
        size = result_size(result)
        if size > self.max_bytes:
            error = {"message": f"the result ({size} bytes) is larger than the {self.max_bytes} bytes the server "
                                "keeps per key; use POST /v1/generate, which returns it directly",
                     "type": "server_error", "param": None, "code": "result_too_large"}
            result, size = None, 0
        record.result, record.error, record.size = result, error, size
        mine = [r for r in self._of(record.owner) if r.size]
        total = sum(r.size for r in mine)
        for old in mine:  # oldest first
            if total <= self.max_bytes:
                break
            if old is not record:
                total -= old.size
                self._records.pop(old.id, None)

    def get(self, job_id: str, owner: Hashable) -> JobRecord | None:
        self.expire()
        record = self._records.get(job_id)
        return record if record is not None and record.owner == owner else None

    def expire(self) -> None:
        now = self.clock()
        for job_id in [k for k, r in self._records.items() if r.finished is not None and now - r.finished > self.ttl_s]:
            del self._records[job_id]

    def _of(self, owner: Hashable) -> list[JobRecord]:
        return [r for r in self._records.values() if r.owner == owner]
