"""A batch on a Ray cluster (the extra sdstream[ray]): a pool of workers, one per GPU (or CPU slot), each keeping
the models it loaded; each line goes to the next worker that is free (one that has the line's model loaded
first); a line whose worker died is made again on another, at most RayCluster.retries times, then recorded
as failed.

The driver plans the batch with plan(), shows the progress and writes OUT/batch.json with run.py's code; each
worker runs its lines with run.py's _execute (the orchestrator with a RunFolder, exactly as a local batch and
`generate` write run folders) into OUT, which every node must see at the same path: before any line runs,
each worker proves it by reading a file the driver wrote there and writing one of its own.

Retries are this module's own (the actors have max_restarts=0, max_task_retries=0): a dead worker is replaced
by a new actor, wherever the cluster has room, and its line goes back to the front of the queue; the row of
each line in batch.json says how many attempts it took ("attempts"), which worker made it ("worker"), and
why the attempts before it were lost ("lost_attempts").

Nothing here imports ray until a batch runs on it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import BadInput, SdstreamError
from ..record.files import new_dir
from ..record.rundir import probe_writable, write_failed
from .distribute import distributed
from .plan import BatchRun, plan
from .run import BatchResult, _announce, _check_summary, _now, _row, _rows, _summarise

EXTRA_MISSING = "sdstream batch --ray needs the ray extra: pip install 'sdstream[ray]'"
PASSED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")  # driver -> workers
PROBE = ".sdstream-ray-probe-"  # OUT/.sdstream-ray-probe-<token>: written by the driver, read by every worker
START_SECONDS = 600.0  # how long workers may take to start (the cluster busy, or scaling up) before we give up
STOP_SECONDS = 15.0  # after Ctrl-C, how long running lines get to stop and record themselves "interrupted"
WAIT_SECONDS = 0.5  # the driver's wait for results, between which Ctrl-C is seen


@dataclass(frozen=True)
class RayCluster:
    """Where and how a batch runs on Ray."""

    address: str | None = None  # None or "local": start a local cluster; "auto": the running one; HOST:PORT, ray://…
    workers: int | None = None  # None: one per GPU of the cluster, or one per CPU slot (--device cpu, or no GPU)
    retries: int = 2  # times a line is made again after its worker died


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def looks_like_address(text: str) -> bool:
    """Whether TEXT names a Ray cluster (auto, local, HOST:PORT, ray://HOST:PORT) rather than a batch file."""
    return text in ("auto", "local") or text.startswith("ray://") or bool(re.fullmatch(r"[\w.\-\[\]:]+:\d+", text))


# ------------------------------------------------------------------------------------------ the worker


class SweepWorker:
    """A worker of the pool (a Ray actor, one process): runs one line at a time; the models it loads stay in its
    process (the loader's cache) for the lines after. stop() comes in on a second thread (max_concurrency 2)."""

    def __init__(self, device: str):
        self.device = device  # what a line's "auto" device becomes here: "cuda:0" (the one GPU Ray gave it) or "cpu"
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.stopping = threading.Event()

    def probe(self, out: str, token: str) -> dict:
        """This worker as the driver records it, with why it cannot take lines (error), if it cannot."""
        info = {"worker": f"{self.host}:{self.pid}", "host": self.host, "pid": self.pid, "device": self.device,
                "error": None}
        try:
            seen = (Path(out) / f"{PROBE}{token}").read_text()
        except OSError:
            seen = None
        if seen != token:
            info["error"] = (f"does not see the batch folder {out!r} that the driver made: --out must be a folder on a "
                             "file system every node shares, at the same path")
            return info
        try:
            probe_writable(Path(out))
        except BadInput as e:
            info["error"] = f"cannot write into it: {e}"
            return info
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                info["error"] = "was given a GPU by Ray, but torch sees no CUDA device there"
        return info

    def run_line(self, run: BatchRun, request, animations: tuple) -> dict:
        """Run one line into its folder (run._execute, the orchestrator as every batch runs it); its row."""
        from .run import _execute

        if request.device == "auto" or (self.device.startswith("cuda") and request.device.startswith("cuda")):
            request = replace(request, device=self.device)  # cuda:N means nothing here: Ray gave us one GPU
        self.stopping.clear()
        try:
            return _execute(run, request, (), animations, cancelled=self.stopping.is_set)
        except KeyboardInterrupt:  # stop() (the driver was interrupted): the run says "interrupted"
            return {**_row(run), "status": "interrupted"}

    def stop(self) -> None:
        self.stopping.set()


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class _Worker:
    handle: object
    name: str = "?"
    host: str | None = None
    pid: int | None = None
    models: set = field(default_factory=set)


def run_batch_ray(source, out, defaults, cluster: RayCluster, *, force: bool = False, keep_going: bool = False,
                  on_event=lambda event: None, animations=(), check=None) -> BatchResult:
    """run.run_batch on a Ray cluster (see there for the arguments and events; here also {"event": "sweep", ...}
    once the workers are ready and {"event": "retry", ...} when a worker died and its line goes again)."""
    if distributed():
        raise BadInput("--ray runs a batch from one process; start it with `sdstream batch`, not accelerate launch")
    if cluster.retries < 0 or (cluster.workers is not None and cluster.workers < 1):
        raise BadInput("--ray-retries must be 0 or more and --ray-workers 1 or more")
    if not ray_available():
        raise BadInput(EXTRA_MISSING)
    out = Path(out) if out is not None else new_dir(Path("outputs"), "batch")
    _check_summary(out)
    runs = plan(source, out, defaults, force=force, keep_going=keep_going, check=check)
    animations = tuple(animations)
    started = _now()
    pool = _Pool(cluster, out, on_event)

    def report(run: BatchRun, row: dict) -> None:
        on_event({"event": "run", **pool.more(row)})

    todo = [r for r in runs if r.request is not None and not r.skip]
    made = not out.exists()
    outcomes: dict[int, dict] = {}
    try:
        if todo:  # nothing to run (all kept): no cluster needed
            on_event({"event": "cluster", "address": cluster.address or "local", "runs": len(todo)})
            pool.connect()
        _announce(runs, animations, on_event, report)
        out.mkdir(parents=True, exist_ok=True)
        if todo:
            pool.open(_device(defaults), len(todo))
            pool.sweep(todo, animations, outcomes)
    except BadInput:  # the cluster or a worker refused: nothing ran, and nothing stays behind
        pool.close()
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    except KeyboardInterrupt as e:
        pool.stop(outcomes)
        out.mkdir(parents=True, exist_ok=True)  # (interrupted while joining the cluster: before it was made)
        result = BatchResult(out, [pool.more(r) for r in _rows(runs, outcomes, todo_status="pending")],
                             interrupted=True)
        _summarise(result, source, started, on_event, pool.summary())
        e.batch_result = result
        raise
    finally:
        pool.close()
    result = BatchResult(out, [pool.more(r) for r in _rows(runs, outcomes, todo_status=None)])
    _summarise(result, source, started, on_event, pool.summary())
    return result


def _device(defaults) -> str:
    if defaults is None:
        return "auto"
    value = defaults.get("device") if isinstance(defaults, dict) else getattr(defaults, "device", None)
    return value or "auto"


_LOST = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError",
         "LocalRayletDiedError")  # ray.exceptions that mean the worker (its process or node) is gone


class _Pool:
    """The driver's side: connects, starts and probes the workers, hands out lines, replaces dead workers."""

    def __init__(self, cluster: RayCluster, out: Path, on_event):
        self.cluster, self.out, self.on_event = cluster, out, on_event
        self.ray = None
        self.connected = False  # we called ray.init (and so ray.shutdown at the end)
        self.token = secrets.token_hex(8)
        self.probe_file: Path | None = None
        self.starting: dict = {}  # probe ref -> _Worker not yet ready
        self.idle: list[_Worker] = []
        self.running: dict = {}  # run_line ref -> (_Worker, BatchRun)
        self.attempts: dict[int, int] = {}
        self.worker_of: dict[int, str] = {}
        self.lost: dict[int, list[str]] = {}
        self.workers: list[dict] = []  # every worker that became ready, as probed
        self.dead: list[str] = []
        self.replacements = 0
        self.max_replacements = 0  # set by open(): how many dead workers may be replaced in all
        self.lines = 0
        self.device = "cpu"
        self.options: dict = {}
        self._stdout_kept = None  # puts back where Ray prints the cluster's messages

    # ---------------------------------------------------------------- rows and batch.json

    def more(self, row: dict) -> dict:
        """ROW with what the pool knows of its line: attempts, the worker that made it, the attempts lost."""
        line = row["line"]
        return {**row, "attempts": self.attempts.get(line, 0), "worker": self.worker_of.get(line),
                "lost_attempts": self.lost.get(line, [])}

    def summary(self) -> dict:
        return {"ray": {"address": self.cluster.address or "local", "retries": self.cluster.retries,
                        "workers": [w["worker"] for w in self.workers], "device": self.device,
                        "workers_lost": self.dead}}

    # ---------------------------------------------------------------- starting

    def open(self, device: str, lines: int) -> None:
        """Start min(--ray-workers, LINES) workers and wait until each has probed --out."""
        ray = self.ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if gpu and not gpus:
            raise BadInput(f"--device {device}: the Ray cluster has no GPU (it has {cpus} CPUs); use --device cpu")
        slots, kind = (gpus, "GPU") if gpu else (cpus, "CPU")
        wanted = self.cluster.workers or slots
        if wanted > slots:
            raise BadInput(f"--ray-workers {wanted}: the Ray cluster has {slots} {kind}{'s' * (slots != 1)} "
                           f"(one worker each)")
        if wanted < 1:
            raise BadInput(f"the Ray cluster has no {kind} for a worker")
        self.device = "cuda:0" if gpu else ("cpu" if device == "auto" else device)
        self.options = dict(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0,
                            max_concurrency=2)
        self.max_replacements = max(1, self.cluster.retries) * wanted + wanted  # a bound on restarts for any reason
        self.lines = lines
        self.probe_file = self.out / f"{PROBE}{self.token}"
        self.probe_file.write_text(self.token)
        for _ in range(min(wanted, lines)):
            self._start()
        self._wait_started()

    def connect(self) -> None:
        """Join (or start) the cluster: BadInput when it cannot be reached."""
        import logging

        import ray

        self.ray = ray
        self._stdout_kept = _cluster_messages_to_stderr()
        if ray.is_initialized():  # a program that connected itself keeps its connection
            return
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        address = self.cluster.address or "local"
        settings = dict(address=address, logging_level=logging.WARNING, log_to_driver=False,
                        runtime_env={"env_vars": env} if env else None)
        if address == "local":
            settings["include_dashboard"] = False
        self.connected = True  # from before ray.init returns: close() then stops what an interrupted start began
        try:
            ray.init(**settings)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = "a running Ray cluster" if address == "auto" else f"the Ray cluster at {address!r}"
            raise BadInput(f"--ray: cannot connect to {where}: {str(e).strip().splitlines()[0]}") from None

    def _start(self) -> None:
        actor = self.ray.remote(SweepWorker).options(**self.options).remote(self.device)
        self.starting[actor.probe.remote(str(self.out.absolute()), self.token)] = _Worker(actor)

    def _started(self, ref) -> str | None:
        """A probe came back: the worker joins the idle ones, or the reason it can't."""
        worker = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except Exception as e:
            self._kill(worker)
            return f"a Ray worker could not start: {_first_line(e)}"
        worker.name, worker.host, worker.pid = info["worker"], info["host"], info["pid"]
        if info["error"]:
            self._kill(worker)
            return f"--out {str(self.out)!r}: the worker on {worker.name} {info['error']}"
        self.workers.append(info)
        self.idle.append(worker)
        return None

    def _wait_started(self) -> None:
        """Every first worker ready (or, after START_SECONDS, those that are); BadInput if one cannot use --out."""
        deadline = time.monotonic() + START_SECONDS
        while self.starting and time.monotonic() < deadline:
            ready, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                problem = self._started(ref)
                if problem:
                    raise BadInput(problem + "; nothing was run")
        if not self.idle:
            raise BadInput(f"no Ray worker started within {START_SECONDS:.0f} s: is the cluster busy?")
        self.on_event({"event": "sweep", "runs": self.lines, "workers": [w["worker"] for w in self.workers],
                       "device": self.device,
                       "address": self.cluster.address or "local", "starting": len(self.starting)})

    # ---------------------------------------------------------------- the sweep

    def sweep(self, todo: list[BatchRun], animations: tuple, outcomes: dict) -> None:
        pending, begun = deque(todo), 0
        stuck_since = None
        while pending or self.running:
            while pending and self.idle:
                worker = self.idle.pop(0)
                run = next((r for r in pending if r.request.model in worker.models), pending[0])
                pending.remove(run)
                if run.line not in self.attempts:
                    begun += 1
                self._submit(worker, run, animations, begun, len(todo))
            if not self.running and not self.starting:
                self._give_up(pending, outcomes, "no Ray worker is left to run it")
                return
            if not self.running:  # only workers starting: the cluster may be busy, but not for ever
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > START_SECONDS:
                    self._give_up(pending, outcomes, f"no Ray worker started within {START_SECONDS:.0f} s")
                    return
            else:
                stuck_since = None
            ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                if ref in self.starting:
                    problem = self._started(ref)
                    if problem:
                        self.on_event({"event": "warning", "message": problem})
                else:
                    self._finished(ref, pending, outcomes)

    def _submit(self, worker: _Worker, run: BatchRun, animations: tuple, index: int, of: int) -> None:
        attempt = self.attempts[run.line] = self.attempts.get(run.line, 0) + 1
        shipped = replace(run, run_dir=run.run_dir.absolute())  # the same path on every node
        ref = worker.handle.run_line.remote(shipped, run.request, animations)
        self.running[ref] = (worker, run)
        worker.models.add(run.request.model)
        self.worker_of[run.line] = worker.name
        self.on_event({"event": "begin", "line": run.line, "index": index, "of": of, "prompt": run.prompt,
                       "seed": run.request.seed, "run_dir": str(run.run_dir), "worker": worker.name,
                       "attempt": attempt})

    def _finished(self, ref, pending: deque, outcomes: dict) -> None:
        worker, run = self.running.pop(ref)
        try:
            row = self.ray.get(ref)
        except Exception as e:
            if type(e).__name__ not in _LOST and not any(c.__name__ in _LOST for c in type(e).__mro__):
                self.idle.append(worker)  # our own code failed on the worker, which lives on: the line failed
                self._record(run, {**_row(run), "status": "failed", "error": _first_line(e)}, outcomes)
                return
            self._lost(worker, run, e, pending, outcomes)
            return
        self.idle.append(worker)
        self._record(run, {**row, "run_dir": str(run.run_dir)}, outcomes)

    def _record(self, run: BatchRun, row: dict, outcomes: dict) -> None:
        outcomes[run.line] = row
        self.on_event({"event": "run", **self.more(row)})

    def _lost(self, worker: _Worker, run: BatchRun, error: Exception, pending: deque, outcomes: dict) -> None:
        """RUN's worker died: its folder is freed of the dead attempt, and the line goes again (or has failed)."""
        self._kill(worker)
        self.dead.append(worker.name)
        reason = f"its worker {worker.name} died ({_death(error)})"
        self.lost.setdefault(run.line, []).append(reason)
        attempt = self.attempts[run.line]
        if attempt <= self.cluster.retries:
            pending.appendleft(run)
            self.on_event({"event": "retry", "line": run.line, "attempt": attempt, "of": self.cluster.retries + 1,
                           "worker": worker.name, "error": reason,
                           "message": f"line {run.line}: {reason}; running it again (attempt {attempt + 1} of "
                                      f"{self.cluster.retries + 1})"})
        else:
            message = (f"its worker died {attempt} time{'s' * (attempt > 1)} "
                       f"(--ray-retries {self.cluster.retries}); last: {reason}")
            write_failed(run.run_dir, run.request, SdstreamError(message), 0.0)
            self._record(run, {**_row(run), "status": "failed", "error": message}, outcomes)
        if pending and self.replacements < self.max_replacements:  # a worker for the slot the dead one held
            self.replacements += 1
            self._start()

    def _give_up(self, pending: deque, outcomes: dict, why: str) -> None:
        while pending:
            run = pending.popleft()
            self._record(run, {**_row(run), "status": "failed", "error": why}, outcomes)

    # ---------------------------------------------------------------- stopping

    def stop(self, outcomes: dict) -> None:
        """Ctrl-C: the running lines are asked to stop (each records itself "interrupted"), briefly waited for."""
        if self.ray is None or not self.running:
            return
        for worker, _ in self.running.values():
            try:
                worker.handle.stop.remote()
            except Exception:
                pass
        try:
            ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=STOP_SECONDS)
        except Exception:
            ready = []
        for ref, (_, run) in self.running.items():
            row = None
            if ref in ready:
                try:
                    row = {**self.ray.get(ref), "run_dir": str(run.run_dir)}
                except Exception:
                    pass
            outcomes[run.line] = row if row and row["status"] != "killed" else {**_row(run), "status": "interrupted"}
        self.running.clear()

    def close(self) -> None:
        """Every worker ended, the probe file removed, the connection closed if we opened it."""
        if self.ray is not None:
            for worker in [*self.idle, *(w for w, _ in self.running.values()), *self.starting.values()]:
                self._kill(worker)
            self.idle, self.running, self.starting = [], {}, {}
            if self.connected:
                self.connected = False
                try:
                    self.ray.shutdown()
                except Exception:
                    pass
        if self.probe_file is not None:
            self.probe_file.unlink(missing_ok=True)
        if self._stdout_kept is not None:
            self._stdout_kept()
            self._stdout_kept = None

    def _kill(self, worker: _Worker) -> None:
        try:
            self.ray.kill(worker.handle, no_restart=True)
        except Exception:
            pass


def _cluster_messages_to_stderr():
    """Ray's driver prints what the cluster publishes ("(raylet) A worker died…") on stdout, where --json's
    events go: on stderr instead, while the sweep runs. Returns what puts it back (None if Ray's inner workings
    are not as expected: then nothing is changed)."""
    try:
        from ray._private import worker as internals
    except ImportError:
        return None
    original = getattr(internals, "print_to_stdstream", None)
    if not callable(original):
        return None

    def to_stderr(data, *args, **kwargs):
        return original({**data, "is_err": True} if isinstance(data, dict) else data, *args, **kwargs)

    internals.print_to_stdstream = to_stderr

    def put_back() -> None:
        internals.print_to_stdstream = original

    return put_back


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


def _death(error: Exception) -> str:
    """Why Ray says a worker died, in a few words (its messages run to paragraphs)."""
    text = str(error)
    for pattern, words in ((r"SIGKILL|signal 9|killed", "killed"), (r"out of memory|OutOfMemory|OOM", "out of memory"),
                           (r"node .*(died|dead)|NodeDied", "its node was lost"), (r"SIGSEGV|segfault", "crashed")):
        if re.search(pattern, text, re.IGNORECASE):
            return words
    return type(error).__name__




