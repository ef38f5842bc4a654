"""A cohort on Ray (the `ray` package): one loaded engine per worker, across the machines of a Ray cluster.

Owns: `run_cohort_ray` (start or join a cluster, one `SegmentWorker` actor per GPU -- or per CPU where the
cluster has none --, hand out cases as workers become free, retry a case whose worker crashed or raised an
unexpected error, write the cohort summary) and `schedule` (that hand-out-and-retry loop, for any actor with a
``run(entry)`` method; it gives up workers that cannot start or died for good, so a run always ends). Workers write each case's outputs into the output folder themselves, through
`cohort.run_case` -- the same lock, resume, atomic files and layout as a single-process run -- so the folder
must be visible at the same path on every node (a shared file system).
Imports: ray (lazily); `cohort`, `core.errors`, `models` (lazily), `options`. Never torch.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from .cohort import CaseStatus, CohortEntry, CohortResult, _record, run_case, write_summary
from .options import RunSettings
from ..core.errors import BackendError

LOGGER = logging.getLogger(__name__)

#: Attempts after the first for a case whose worker died or raised something other than a `DiffsegError`
#: (those are the user's data: retrying cannot help, they are reported at once).
DEFAULT_RETRIES = 2
#: Seconds a worker may take to start -- be placed on a node and load the model -- or to restart after it died,
#: before it is given up. Ray keeps an actor it cannot place (no node has the CPU or GPU it asks for, none frees
#: one, the autoscaler adds none) pending for ever, and a driver waiting for it would wait for ever too.
DEFAULT_START_TIMEOUT = 900.0
#: The driver wakes at least this often (seconds) to check the workers' start deadlines.
POLL_S = 2.0


def import_ray():
    """The `ray` module, or `BackendError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise BackendError("--ray needs the ray package, which is not installed",
                           fix="pip install 'diffseg-engine[ray]'") from None
    return ray


class SegmentWorker:
    """A Ray actor (wrapped with ``ray.remote`` at run time): opens the model once, then segments case after
    case into `out_dir` with `cohort.run_case`."""

    def __init__(self, model: str, backend: str, device: str, out_dir: str, settings: RunSettings, command: str):
        from .models import model_sha256, open_model
        self.engine = open_model(model, backend, device)
        self.model_sha = model_sha256(self.engine)
        self.out_dir, self.settings, self.command = Path(out_dir), settings, command

    def run(self, entry: CohortEntry) -> dict:
        st = run_case(entry, self.engine, self.out_dir, self.settings, model_sha=self.model_sha, quiet=True,
                      command=self.command)
        return st.to_dict()

    def where(self) -> dict:
        import os
        import socket
        return {"host": socket.gethostname(), "pid": os.getpid(), **self.engine.describe()}


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[-300:]


def schedule(actors: Sequence[Any], entries: Sequence[CohortEntry], *, retries: int = DEFAULT_RETRIES,
             start_timeout: float = DEFAULT_START_TIMEOUT,
             on_done: Callable[[CaseStatus, int], None] | None = None,
             on_retry: Callable[[CohortEntry, int, BaseException], None] | None = None) -> list[CaseStatus]:
    """Run ``actor.run.remote(entry)`` for every entry, one case per actor at a time; returns the statuses in
    `entries` order. Never waits for ever: it ends once every case is done or failed.

    A worker gets cases only once it answers (Ray's ``__ray_ready__`` probe): at the start, and again after it
    died and Ray restarted it (``max_restarts``). One that does not answer within `start_timeout` seconds (Ray
    cannot place it, its restart cannot get the resources) is killed and given up, as is one that died for
    good (restarts used up, or its constructor raised). A call that fails with a Ray error (the worker process
    died, or raised an unexpected exception) is retried up to `retries` more times, on whichever worker is
    free, and the case resumes from its finished chunks; after that the case is "failed" with the error. Once
    no worker is left, the cases not yet run are "failed" with the reasons. `on_done(status, attempts)` and
    `on_retry(entry, attempt, error)` report progress."""
    ray = import_ray()
    queue = deque((e, 0) for e in entries)
    idle: list[Any] = []
    probes: dict[Any, tuple[Any, float]] = {}  # readiness probe -> (actor, give-up time)
    reprobe: list[tuple[float, Any, float]] = []  # (when, actor, give-up time): unavailable for now, ask again
    pending: dict[Any, tuple[Any, CohortEntry, int, float]] = {}  # run call -> (actor, entry, attempt, t0)
    results: dict[str, CaseStatus] = {}
    lost: list[str] = []  # why workers were given up

    def probe(actor: Any, give_up: float) -> None:
        # at-least-once: the probe waits through the actor's restarts, so it answers once the actor is up, and
        # raises only when the actor is dead for good (or, rarely, unreachable for now)
        probes[actor.__ray_ready__.options(max_task_retries=-1).remote()] = (actor, give_up)

    def finish(st: CaseStatus, attempts: int) -> None:
        results[st.case_id] = st
        if on_done:
            on_done(st, attempts)

    for a in actors:
        probe(a, time.monotonic() + start_timeout)
    while queue or pending:
        while queue and idle:
            actor = idle.pop(0)
            entry, attempt = queue.popleft()
            pending[actor.run.remote(entry)] = (actor, entry, attempt, time.perf_counter())
        now = time.monotonic()
        for item in [r for r in reprobe if r[0] <= now]:
            reprobe.remove(item)
            probe(item[1], item[2])
        for ref, (actor, give_up) in list(probes.items()):
            if now >= give_up:  # Ray could not (re)start it in time: stop asking for it
                del probes[ref]
                ray.kill(actor, no_restart=True)
                free = ray.available_resources()
                lost.append(f"a worker did not start within {start_timeout:g} s (free in the cluster now: "
                            f"{free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU)")
                LOGGER.warning(f"ray: {lost[-1]}; giving it up")
        if not (idle or probes or reprobe or pending):  # every worker is gone: nothing can run the rest
            why = "; ".join(dict.fromkeys(lost)) or "no worker"
            while queue:
                entry, attempt = queue.popleft()
                finish(CaseStatus(entry.case_id, "failed", entry.source,
                                  f"not run on Ray: no worker left ({why[-400:]})"), attempt)
            break
        waits = [POLL_S] + [give_up - now for _, give_up in probes.values()] + [when - now for when, *_ in reprobe]
        refs = list(pending) + list(probes)
        if not refs:
            time.sleep(max(0.0, min(waits)))
            continue
        ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, min(waits)))
        if not ready:
            continue
        ref = ready[0]
        if ref in probes:
            actor, give_up = probes.pop(ref)
            try:
                ray.get(ref)
                idle.append(actor)
            except getattr(ray.exceptions, "ActorDiedError", ray.exceptions.RayActorError) as exc:  # dead for good
                lost.append(_short(exc))
                LOGGER.warning(f"ray: a worker died for good: {lost[-1]}")
            except ray.exceptions.RayError:  # unavailable for now (e.g. its node is unreachable): ask again
                reprobe.append((time.monotonic() + POLL_S, actor, give_up))
            continue
        actor, entry, attempt, t0 = pending.pop(ref)
        try:
            st = CaseStatus(**ray.get(ref))
            idle.append(actor)
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):
                idle.append(actor)  # run() raised: the worker itself is fine
            else:  # the worker process (or its node) died: use it again once Ray has restarted it
                probe(actor, time.monotonic() + start_timeout)
            if attempt < retries:
                if on_retry:
                    on_retry(entry, attempt + 1, exc)
                queue.append((entry, attempt + 1))
                continue
            st = CaseStatus(entry.case_id, "failed", entry.source,
                            f"failed {attempt + 1} times on Ray: {_short(exc)}", time.perf_counter() - t0)
        finish(st, attempt + 1)
    return [results[e.case_id] for e in entries]


def run_cohort_ray(entries: Sequence[CohortEntry], model: str | Path, out_dir: str | Path, settings: RunSettings, *,
                   cohort: Sequence[CohortEntry] | None = None, backend: str = "onnxruntime", device: str = "auto",
                   address: str | None = None, workers: int = 0, retries: int = DEFAULT_RETRIES,
                   start_timeout: float = DEFAULT_START_TIMEOUT, quiet: bool = False, command: str = "",
                   init_kwargs: dict | None = None) -> CohortResult:
    """Segment `entries` on Ray and write the summary of `cohort` (default: `entries`) into `out_dir`.

    address: ``"local"`` starts a Ray instance on this machine for the run; None joins the cluster in
    ``RAY_ADDRESS`` or starts a local one; ``"auto"`` joins the cluster
    started on this machine with ``ray start``; ``"ray://HOST:10001"`` a remote one. If Ray is already
    initialised in this process (a notebook, a test), that session is used and left running. workers: how
    many engines to load (0: one per GPU of the cluster, or one per CPU where it has no GPU; never more than
    the cases). Each worker asks Ray for 1 GPU where the cluster has GPUs, else 1 CPU. start_timeout: seconds a
    worker may take to start or restart before it is given up (`schedule`); with no worker left, the cases not
    run are "failed" and the run ends.
    """
    ray = import_ray()
    out_dir = Path(out_dir).absolute()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=not quiet,
                 logging_level=logging.ERROR if quiet else logging.INFO, **(init_kwargs or {}))
        started = True
    try:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        count = max(1, min(len(entries) or 1, workers or (gpus or cpus)))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        Worker = ray.remote(max_restarts=retries, max_task_retries=0, **options)(SegmentWorker)
        actors = [Worker.remote(str(Path(model).absolute()), backend, device, str(out_dir), settings, command)
                  for _ in range(count)]
        if not quiet:
            LOGGER.info(f"ray: {count} worker(s) on {res.get('CPU', 0):g} CPU / {gpus} GPU")

        def done(st: CaseStatus, attempts: int) -> None:
            by_driver = st.message.startswith(("failed ", "not run on Ray")) and "on Ray" in st.message
            if st.status == "failed" and by_driver:
                _record(out_dir, st)  # a worker crash, or no worker left: no worker could record it
            if not quiet:
                what = st.message if st.status != "done" else f"{st.seconds:.1f} s"
                LOGGER.info(f"{st.case_id}: {st.status} ({what})" + (f" after {attempts} attempts" if attempts > 1 else ""))

        def retry(entry: CohortEntry, attempt: int, exc: BaseException) -> None:
            if not quiet:
                LOGGER.info(f"{entry.case_id}: {type(exc).__name__} on Ray, retrying ({attempt}/{retries})")
        # workers may run elsewhere (another node, another working directory): absolute paths only
        entries_abs = [CohortEntry(e.case_id, tuple(Path(p).absolute() for p in e.inputs),
                                   tuple(a.split("=", 1)[0] + "=" + str(Path(a.split("=", 1)[1]).absolute())
                                         for a in e.modality_args)) for e in entries]
        statuses = schedule(actors, entries_abs, retries=retries, start_timeout=start_timeout, on_done=done,
                            on_retry=retry)
        statuses = [CaseStatus(**{**st.to_dict(), "source": e.source}) for st, e in zip(statuses, entries)]
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    summary = write_summary(cohort if cohort is not None else entries, out_dir, statuses, settings=settings)
    return CohortResult(statuses, summary)
