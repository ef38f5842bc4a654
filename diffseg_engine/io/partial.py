"""The unfinished work of one `segment` run, kept so that an interrupted run resumes where it stopped.

Owns: `PartialRun`, the folder ``<out>/.<case>.partial/`` holding
- ``params.json``: the fingerprint of everything that decides the result (case, input and model sha256, model
  card, sampler, steps, eta, n, seed, slices, backend, engine version, whether member masks are kept);
- ``chunk-<lo>-<hi>.npz``, one per finished chunk of work items [lo, hi): the streamed statistics (count,
  mean, m2; float64) of the slices the chunk touched (a range of rows) as they stood after it and, with
  --save-samples, each member's probability map; for ``--n auto`` also the schedule (`rounds.Rounds.state`:
  round, its slices, the decisions so far, every slice's count), under names starting ``sched_``.
Every file is written atomically. A chunk file whose rows later files all hold is then removed (unless member
maps are kept), so the folder stays about one statistics volume in size. Loading replays the files in order
and checks that the counts are exactly those of the first `next_item` work items (a fixed N: slice-major;
auto: what the saved schedule gives, checked by `Rounds.restore`), so a resumed run continues from the very
float64 state an uninterrupted one had: bit-identical results.
Imports: numpy; `atomic`, `core.ensemble`, `core.errors`. Never torch.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import AtomicFiles, atomic_write
from ..core.ensemble import EnsembleStats
from ..core.errors import OutputError

_CHUNK = re.compile(r"^chunk-(\d{9})-(\d{9})\.npz$")


class PartialRun:
    """The partial-results folder of case `case_id` in `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str | Path, case_id: str):
        self.folder = Path(out_dir) / f".{case_id}.partial"
        self._files: list[tuple[int, int, Path]] = []  # (first, last slice row, file) of the chunk files, in order
        #: after `load`: the schedule of an auto run as its newest chunk file saved it (None for a fixed N)
        self.schedule: dict[str, np.ndarray] | None = None

    def exists(self) -> bool:
        return self.folder.is_dir()

    def _broken(self, what: str) -> OutputError:
        return OutputError(f"holds unfinished work that cannot be resumed ({what})", path=self.folder,
                           fix="pass --overwrite to discard it and start again")

    def params(self) -> dict[str, Any] | None:
        """The fingerprint of the unfinished run, or None if there is none."""
        path = self.folder / "params.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise self._broken(f"params.json unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise self._broken("params.json is not an object")
        return data

    def start(self, params: dict[str, Any]) -> None:
        """Begin a fresh unfinished run: an empty folder with `params`."""
        self.remove()
        try:
            self.folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot be created ({exc.strerror or exc})", path=self.folder,
                              fix="choose a writable --out folder") from None
        with atomic_write(self.folder / "params.json") as f:
            f.write(json.dumps(params, indent=1, sort_keys=True).encode())
        self._files = []

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def chunk_files(self) -> list[tuple[int, int, Path]]:
        found = []
        for p in self.folder.glob("chunk-*.npz"):
            m = _CHUNK.match(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(found)

    def save_chunk(self, lo: int, hi: int, stats: EnsembleStats, members: int | None,
                   samples: np.ndarray | None = None, *, rows: tuple[int, int] | None = None,
                   schedule: dict[str, np.ndarray] | None = None) -> None:
        """Record the finished chunk of work items [lo, hi). A fixed N (`members`): item i is slice i // members
        and member i % members. Otherwise (``--n auto``, members None) `rows` (first, last slice the chunk
        touched) and `schedule` (`Rounds.state`) say where it stands; member maps are not kept then."""
        if rows is None:
            if not members:
                raise ValueError("save_chunk needs `members` (a fixed N) or `rows`")
            rows = (lo // members, (hi - 1) // members)
        first, last = rows
        arrays: dict[str, np.ndarray] = {"lo": np.int64(lo), "hi": np.int64(hi), "first": np.int64(first),
                                          **stats.rows(first, last)}
        if samples is not None:
            items = np.arange(lo, hi)
            arrays["probs"] = samples[items // members, items % members]
        for k, v in (schedule or {}).items():
            arrays[f"sched_{k}"] = np.asarray(v)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = self.folder / f"chunk-{lo:09d}-{hi:09d}.npz"
        with AtomicFiles() as files:
            files.write_bytes(path, buf.getvalue())
            files.commit()
        self._files.append((first, last, path))
        if samples is None:
            self._drop_superseded()

    def _drop_superseded(self) -> None:
        """Remove chunk files each of whose rows a later file holds (the newest file always stays)."""
        owner: dict[int, int] = {}
        for i, (first, last, _) in enumerate(self._files):
            for row in range(first, last + 1):
                owner[row] = i
        keep = set(owner.values())
        for i, (_, _, path) in enumerate(self._files):
            if i not in keep:
                path.unlink(missing_ok=True)
        self._files = [f for i, f in enumerate(self._files) if i in keep]

    def load(self, num_slices: int, members: int | None, shape: tuple[int, int],
             samples: np.ndarray | None = None) -> tuple[int, EnsembleStats]:
        """Replay the chunk files: (next work item, statistics after it); fills `samples` [S, n, h, w] if given.
        members: the fixed N, or None for ``--n auto`` (then `schedule` holds the newest file's schedule, which
        the caller checks against the statistics with `Rounds.restore`).

        Raises `OutputError` (fix: --overwrite) if the files are unreadable or not the record of one run.
        """
        stats = EnsembleStats(num_slices, shape)
        next_item = 0
        self.schedule = None
        self._files = []
        for lo, hi, path in self.chunk_files():
            try:
                with np.load(path, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            except Exception as exc:
                raise self._broken(f"{path.name} unreadable: {exc}") from None
            first = int(data.get("first", -1))
            rows = len(data.get("count", ()))
            fixed_ok = members is None or (first == lo // members and first + rows == (hi - 1) // members + 1)
            if (int(data.get("lo", -1)), int(data.get("hi", -1))) != (lo, hi) or not fixed_ok \
                    or first < 0 or rows < 1 or first + rows > num_slices \
                    or data["mean"].shape != (rows, *shape) or data["m2"].shape != (rows, *shape):
                raise self._broken(f"{path.name} does not fit this case")
            if members is None and hi >= next_item:
                sched = {k[len("sched_"):]: v for k, v in data.items() if k.startswith("sched_")}
                if not sched:
                    raise self._broken(f"{path.name} holds no schedule")
                self.schedule = sched
            stats.set_rows(first, data)
            if samples is not None:
                if members is None or lo != next_item or "probs" not in data \
                        or data["probs"].shape != (hi - lo, *shape):
                    raise self._broken(f"member maps missing before {path.name}")
                items = np.arange(lo, hi)
                samples[items // members, items % members] = data["probs"]
            next_item = max(next_item, hi)
            self._files.append((first, first + rows - 1, path))
        if members is not None:
            want = np.clip(next_item - np.arange(num_slices) * members, 0, members)
        else:
            want = self.schedule.get("count") if self.schedule is not None else np.zeros(num_slices, np.int64)
        if want is None or not np.array_equal(stats.count, want):
            raise self._broken(f"the chunk files do not add up to the first {next_item} work items")
        return next_item, stats

def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'seed 0 -> 1, n 5 -> 3' for the keys whose values differ (long digests shortened)."""
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
        return text[:12] + "..." if len(text) > 16 else text
    diffs = [f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    return ", ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")
