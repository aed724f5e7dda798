"""The results store: every run, cell, curve and porting result, kept in SQLite.

A *run* is one invocation of ``hwport compare``, ``hwport run`` or ``hwport port`` (or of
their Python API with a store): its definition (recipe, seed, steps, backends, pipelines,
modes), the hwport version, and its *cells*, each one :class:`~hwport.runner.RunResult`
with the backend spec it ran on. Every finished cell is committed in its own transaction as
it finishes, so an interrupted run (Ctrl-C, SIGTERM, a killed process) loses at most the
cell in flight, and SQLite's journal (WAL mode) keeps the file consistent whatever happens.

A cell is identified by its :func:`cell_key`: a hash of the backend spec's content, the
pipeline's configuration, the mode, the recipe's definition, the seed, the world size, the
outcome rules and the framework. ``resume`` skips any cell whose key is already stored,
from the same run or another one.

The default store is ``$HWPORT_STORE``, else ``$XDG_DATA_HOME/hwport/results.sqlite``
(``~/.local/share/hwport/results.sqlite``). The schema is versioned (``PRAGMA
user_version``); an older store is migrated on open, in one transaction, and a store
written by a newer hwport is refused rather than misread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwport.errors import HwportError
from hwport.memory import finite, infinite

if TYPE_CHECKING:
    from hwport.pipeline import Pipeline
    from hwport.porting import PortResult
    from hwport.recipes import Recipe
    from hwport.runner import OutcomeRules, RunResult
    from hwport.spec import BackendSpec

SCHEMA_VERSION = 1
KINDS = ("compare", "run", "port")


class StoreError(HwportError):
    """A results store that cannot be opened, read or written, or an unknown run id."""


def default_path() -> Path:
    """``$HWPORT_STORE``, else ``$XDG_DATA_HOME/hwport/results.sqlite``."""
    if os.environ.get("HWPORT_STORE"):
        return Path(os.environ["HWPORT_STORE"])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "hwport" / "results.sqlite"


# -- the schema ---------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE specs (
    hash TEXT PRIMARY KEY,           -- sha256 of the spec's canonical JSON
    name TEXT NOT NULL,
    spec TEXT NOT NULL               -- BackendSpec.to_dict(), as JSON
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,              -- compare, run or port
    definition TEXT NOT NULL,        -- hash of what the run was asked to do (resume finds it)
    created TEXT NOT NULL,           -- ISO 8601, UTC
    finished TEXT,
    status TEXT NOT NULL,            -- running, finished, interrupted, failed
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    hwport_version TEXT NOT NULL,
    recipe TEXT NOT NULL,
    recipe_def TEXT NOT NULL,        -- Recipe.to_dict(), as JSON
    seed INTEGER NOT NULL,
    steps INTEGER,                   -- NULL: each pipeline's default
    world_size INTEGER NOT NULL,
    framework TEXT NOT NULL,
    params TEXT NOT NULL,            -- backends, pipelines, modes, budget, ... as JSON
    cells_total INTEGER NOT NULL,
    error TEXT
);
CREATE TABLE cells (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    role TEXT NOT NULL,              -- 'cell' of the grid, or a porting search's 'trial'
    position INTEGER,                -- order in the run's grid (NULL: a trial)
    key TEXT NOT NULL,               -- cell_key(): what makes two cells the same
    reused_from INTEGER,             -- the cell it was taken from on resume
    created TEXT NOT NULL,
    hwport_version TEXT NOT NULL,    -- the hwport that measured it
    backend TEXT NOT NULL,
    spec_hash TEXT NOT NULL REFERENCES specs(hash),
    pipeline TEXT NOT NULL,
    mode TEXT NOT NULL,
    recipe TEXT NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    metric TEXT NOT NULL,
    metric_value REAL,
    wall_s REAL NOT NULL,
    telemetry TEXT NOT NULL,         -- JSON
    memory TEXT NOT NULL,            -- JSON: hwport.memory.MemoryPlan
    time TEXT NOT NULL,              -- JSON: hwport.profile.StepTime
    result TEXT NOT NULL,            -- the rest of RunResult.to_dict(), as JSON
    UNIQUE (run_id, position)
);
CREATE INDEX cells_by_key ON cells(key);
CREATE TABLE curves (                -- per-step metrics of training cells
    cell_id INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
    series TEXT NOT NULL,            -- 'backend' or 'reference' (fp32 on the reference)
    step INTEGER NOT NULL,
    name TEXT NOT NULL,              -- loss, val_loss, accuracy, perplexity, ...
    value REAL                       -- NULL: NaN
);
CREATE INDEX curves_by_cell ON curves(cell_id);
CREATE TABLE ports (                 -- porting searches, one per cell searched
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key TEXT NOT NULL,               -- the cell's key plus the search's budget and pool
    reused_from INTEGER,
    created TEXT NOT NULL,
    backend TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    mode TEXT NOT NULL,
    effort INTEGER,                  -- NULL: no fix within the budget
    outcome_before TEXT NOT NULL,
    outcome_after TEXT NOT NULL,
    result TEXT NOT NULL             -- PortResult.to_dict(), as JSON
);
CREATE INDEX ports_by_key ON ports(key);
"""

# MIGRATIONS[v] takes a store at schema version v to v + 1 (SQL run in one transaction
# with the version bump). Append to it when the schema changes; never edit an entry.
MIGRATIONS: dict[int, str] = {}


# -- what is stored -----------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """One stored run, as ``hwport runs list`` shows it."""

    id: int
    kind: str
    created: str
    finished: str | None
    status: str  # running, finished, interrupted, failed (or died: running, its process gone)
    hwport_version: str
    recipe: str
    seed: int
    steps: int | None
    world_size: int
    framework: str
    params: dict[str, Any]
    cells_done: int
    cells_total: int
    error: str | None = None


@dataclass
class StoredRun:
    """A stored run with everything it measured: what reports and diffs are made from."""

    record: RunRecord
    recipe: dict[str, Any]  # the recipe's definition (Recipe.to_dict())
    cells: list[RunResult]  # in the run's order
    ports: dict[tuple[str, str, str], dict[str, Any]]  # (backend, pipeline, mode): PortResult
    specs: dict[str, dict[str, Any]]  # backend name: the spec it ran on (to_dict())
    # cells taken from another run on resume: (backend, pipeline, mode) -> that run's id
    reused: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def cell(self, backend: str, pipeline: str, mode: str) -> RunResult | None:
        """The cell of ``pipeline`` in ``mode`` on ``backend``, if the run has it."""
        for c in self.cells:
            if (c.backend, c.pipeline, c.mode) == (backend, pipeline, mode):
                return c
        return None


# -- identity -----------------------------------------------------------------------------
def digest(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys, non-finite numbers as strings)."""
    blob = json.dumps(finite(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cell_key(spec: BackendSpec, pipeline: Pipeline, mode: str, recipe: Recipe, seed: int,
             world_size: int = 1, rules: OutcomeRules | None = None,
             framework: str = "torch") -> str:
    """What makes two cells the same measurement: the hwport version (another version may
    emulate differently), the spec's content (not only its name), the pipeline's name and
    configuration, the mode, the recipe's definition, the seed, the world size, the outcome
    rules and the framework. Capture and eager give the same bits, so capture is not part
    of it."""
    from hwport import __version__
    from hwport.runner import OutcomeRules

    return digest({"hwport": __version__, "spec": spec.to_dict(), "pipeline": pipeline.name,
                   "pipeline_key": pipeline.key(), "mode": mode, "recipe": recipe.to_dict(),
                   "seed": seed, "world_size": world_size, "framework": framework,
                   "rules": dataclasses.asdict(rules or OutcomeRules())})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _real(v: Any) -> float | None:
    """A number for a REAL column (NaN has no SQL value: NULL)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    return None if math.isnan(v) else float(v)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Interrupted(KeyboardInterrupt):
    """The process received SIGTERM (raised in the main thread, like Ctrl-C's)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt) while the block runs, so a
    terminated run unwinds, records itself as interrupted and closes the store."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:  # a handler installed from C reads back as None: restore the default then
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# -- the store ----------------------------------------------------------------------------
class Store:
    """A results store on one SQLite file (see the module docstring).

    ``readonly`` opens an existing store without ever writing to it (after a crash, say).
    """

    def __init__(self, path: str | Path | None = None, *, readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.readonly = readonly
        self.db = self._connect()
        try:
            self._check_schema()
        except BaseException:
            self.db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        where = f"store {self.path}"
        if self.readonly:
            if not self.path.is_file():
                raise StoreError(f"{where}: no such file")
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True,
                                 timeout=30)  # opens lazily: the first query may fail
            try:
                db.execute("PRAGMA user_version").fetchone()
                return db
            except sqlite3.OperationalError:
                db.close()
                # a directory we cannot write holds no -shm file: a store with no WAL
                # left to replay (closed cleanly) is read as the immutable file it is
                if Path(f"{self.path}-wal").exists():
                    raise StoreError(f"{where}: cannot open read-only (its journal "
                                     f"{self.path}-wal needs a writable directory)") from None
                return sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro&immutable=1",
                                       uri=True)
            except sqlite3.DatabaseError as e:
                db.close()
                raise StoreError(f"{where}: not a hwport results store ({e})") from None
        if self.path.is_dir():
            raise StoreError(f"{where}: is a directory; give the path of a file")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise StoreError(f"{where}: cannot create it ({parent} is a file, not a "
                                     "directory)")
                break
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except OSError as e:
            raise StoreError(f"{where}: cannot create it ({e.strerror or e})") from None
        except sqlite3.Error as e:
            raise StoreError(f"{where}: cannot open it for writing ({e})") from None
        try:
            for attempt in range(100):  # WAL mode is set under an exclusive lock: wait a turn
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 99:
                        raise
                    time.sleep(0.05)
            db.execute("PRAGMA synchronous=FULL")  # each cell durable, even on power loss
            db.execute("PRAGMA foreign_keys=ON")
            return db
        except sqlite3.DatabaseError as e:
            db.close()
            if "not a database" in str(e):
                raise StoreError(f"{where}: not a hwport results store ({e})") from None
            raise StoreError(f"{where}: cannot open it for writing ({e})") from None
        except BaseException:
            db.close()
            raise

    def _version(self) -> tuple[int, set[str]]:
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"store {self.path}: not a hwport results store ({e})") from None
        return int(version), tables

    def _check_schema(self) -> None:
        where = f"store {self.path}"
        version, tables = self._version()
        self._check_version(version, tables)
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            if version == 0:
                raise StoreError(f"{where}: not a hwport results store (an empty file)")
            raise StoreError(f"{where}: schema version {version} needs migrating to "
                             f"{SCHEMA_VERSION}, which a read-only open cannot do")
        with self._writing("create or migrate its schema"), self._transaction():
            version, tables = self._version()  # again, under the lock: another process
            self._check_version(version, tables)  # may have created or migrated it
            if version == 0:
                for statement in _statements(SCHEMA):
                    self.db.execute(statement)
                version = SCHEMA_VERSION
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise StoreError(f"{where}: no migration from schema version {version}")
                for statement in _statements(MIGRATIONS[version]):
                    self.db.execute(statement)
                version += 1
            self.db.execute(f"PRAGMA user_version = {int(version)}")

    def _check_version(self, version: int, tables: set[str]) -> None:
        where = f"store {self.path}"
        if version > SCHEMA_VERSION:
            raise StoreError(f"{where}: written by a newer hwport (schema version {version}; "
                             f"this hwport reads up to {SCHEMA_VERSION}): upgrade hwport, or "
                             "use another store with --store")
        if version == 0 and tables:
            raise StoreError(f"{where}: not a hwport results store (it has tables "
                             f"{sorted(tables)} and no hwport schema version)")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"store {self.path}: opened read-only")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------
    def begin(self, kind: str, recipe: Recipe, *, seed: int, steps: int | None,
              world_size: int = 1, params: dict[str, Any] | None = None, cells_total: int = 1,
              resume: bool = False, specs: Sequence[BackendSpec] = ()) -> Session:
        """Start (or, with ``resume``, continue) a stored run; use it as a context manager,
        which records how the run ended: finished, interrupted (Ctrl-C, SIGTERM) or failed.

        ``resume`` continues the newest unfinished run with the same definition (kind,
        recipe, seed, steps, world size, ``params``, the content of ``specs`` and the hwport
        version) whose process is gone, if there is one, and in any case lets cells already
        stored anywhere be reused instead of run again."""
        from hwport import __version__

        if kind not in KINDS:
            raise StoreError(f"run kind {kind!r}: must be one of {list(KINDS)}")
        params = dict(params or {})
        definition = digest({"kind": kind, "recipe": recipe.to_dict(), "seed": seed,
                             "steps": steps, "world_size": world_size, "params": params,
                             "hwport": __version__,
                             "specs": sorted(digest(sp.to_dict()) for sp in specs)})
        here = socket.gethostname()
        with self._writing("start a run"), self._transaction() as db:
            run_id = None
            if resume:
                for id_, status, host, pid in db.execute(
                        "SELECT id, status, host, pid FROM runs WHERE definition = ? AND "
                        "status != 'finished' ORDER BY id DESC", (definition,)):
                    if status == "running" and host == here and _pid_alive(pid):
                        continue  # another process is still running it
                    run_id = int(id_)
                    break
            if run_id is not None:
                db.execute("UPDATE runs SET status = 'running', pid = ?, host = ?, error = NULL,"
                           " finished = NULL WHERE id = ?", (os.getpid(), here, run_id))
            else:
                cur = db.execute(
                    "INSERT INTO runs (kind, definition, created, status, host, pid, "
                    "hwport_version, recipe, recipe_def, seed, steps, world_size, framework, "
                    "params, cells_total) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?)",
                    (kind, definition, _now(), here, os.getpid(), __version__,
                     recipe.name, json.dumps(recipe.to_dict()), seed, steps, world_size,
                     params.get("framework", "torch"), json.dumps(params), cells_total))
                run_id = int(cur.lastrowid or 0)
        return Session(self, run_id, resume)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: cannot {what} ({e})") from None

    def _spec(self, db: sqlite3.Connection, spec: BackendSpec) -> str:
        data = spec.to_dict()
        h = digest(data)
        db.execute("INSERT OR IGNORE INTO specs (hash, name, spec) VALUES (?, ?, ?)",
                   (h, spec.name, json.dumps(data)))
        return h

    def _add_cell(self, run_id: int, role: str, position: int | None, key: str,
                  result: RunResult, spec: BackendSpec | None, reused_from: int | None,
                  spec_hash: str | None = None, version: str | None = None) -> int:
        """Commit one cell (at ``position``, replacing what a resumed run had there)."""
        from hwport import __version__

        d = result.to_dict()
        curve, ref_curve = d.pop("curve"), d.pop("reference_curve")
        telemetry, memory, step_time = d.pop("telemetry"), d.pop("memory"), d.pop("time")
        points = [(series, int(point["step"]), name, _real(infinite(v)))
                  for series, pts in (("backend", curve), ("reference", ref_curve))
                  for point in pts for name, v in point.items() if name != "step"]
        blobs = [json.dumps(x, allow_nan=False) for x in (telemetry, memory, step_time, d)]
        with self._writing("store a cell"), self._transaction() as db:
            h = spec_hash or self._spec(db, spec)  # type: ignore[arg-type]
            if position is not None:  # a resumed run measured it again (another spec, say)
                db.execute("DELETE FROM cells WHERE run_id = ? AND position = ?",
                           (run_id, position))
            cur = db.execute(
                "INSERT INTO cells (run_id, role, position, key, reused_from, created, "
                "hwport_version, backend, spec_hash, pipeline, mode, recipe, seed, steps, "
                "outcome, metric, metric_value, wall_s, telemetry, memory, time, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, role, position, key, reused_from, _now(), version or __version__,
                 result.backend, h,
                 result.pipeline, result.mode, result.recipe, result.seed, result.steps,
                 result.outcome, result.metric, _real(result.metrics.get(result.metric)),
                 result.wall_s, *blobs))
            cell_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO curves (cell_id, series, step, name, value) VALUES (?, ?, ?, ?, ?)",
                [(cell_id, *point) for point in points])
        return cell_id

    def _add_port(self, run_id: int, key: str, result: dict[str, Any],
                  reused_from: int | None) -> None:
        with self._writing("store a porting result"), self._transaction() as db:
            db.execute(
                "INSERT INTO ports (run_id, key, reused_from, created, backend, pipeline, mode, "
                "effort, outcome_before, outcome_after, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?)",
                (run_id, key, reused_from, _now(), result["backend"], result["pipeline"],
                 result["mode"], result["effort"], result["outcome_before"],
                 result["outcome_after"], json.dumps(result)))

    def _end(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._writing("record the end of a run"), self._transaction() as db:
            db.execute("UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ?",
                       (status, _now(), error, run_id))

    # -- reading -----------------------------------------------------------------------
    def _cell_rows(self, where: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        self.db.row_factory = sqlite3.Row
        try:
            return list(self.db.execute(f"SELECT * FROM cells WHERE {where}", args))
        finally:
            self.db.row_factory = None

    def _result(self, row: sqlite3.Row) -> RunResult:
        from hwport.runner import RunResult

        d = json.loads(row["result"])
        d["telemetry"] = json.loads(row["telemetry"])
        d["memory"] = json.loads(row["memory"])
        d["time"] = json.loads(row["time"])
        curves: dict[str, dict[int, dict[str, float]]] = {"backend": {}, "reference": {}}
        for series, step, name, value in self.db.execute(
                "SELECT series, step, name, value FROM curves WHERE cell_id = ? ORDER BY rowid",
                (row["id"],)):
            point = curves[series].setdefault(step, {"step": step})
            point[name] = math.nan if value is None else value
        d["curve"] = list(curves["backend"].values())
        d["reference_curve"] = list(curves["reference"].values())
        return RunResult.from_dict(d)

    def find_cell(self, key: str) -> tuple[int, RunResult, str, str] | None:
        """The newest stored cell with this key: (cell id, result, spec hash, the hwport
        version that measured it), or None."""
        rows = self._cell_rows("key = ? ORDER BY id DESC LIMIT 1", (key,))
        if not rows:
            return None
        r = rows[0]
        return r["id"], self._result(r), r["spec_hash"], r["hwport_version"]

    def find_port(self, key: str) -> tuple[int, dict[str, Any]] | None:
        """The newest stored porting result with this key: (id, PortResult data), or None."""
        row = self.db.execute("SELECT id, result FROM ports WHERE key = ? ORDER BY id DESC "
                              "LIMIT 1", (key,)).fetchone()
        return (int(row[0]), json.loads(row[1])) if row else None

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        """Stored runs, newest first."""
        q = ("SELECT r.id, r.kind, r.created, r.finished, r.status, r.hwport_version, r.recipe,"
             " r.seed, r.steps, r.world_size, r.framework, r.params, r.cells_total, r.error, "
             "r.host, r.pid, (SELECT count(*) FROM cells c WHERE c.run_id = r.id AND c.role = "
             "'cell') FROM runs r ORDER BY r.id DESC")
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        with self._reading():
            rows = list(self.db.execute(q))
        out = []
        here = socket.gethostname()
        for (id_, kind, created, finished, status, version, recipe, seed, steps, world,
             framework, params, total, error, host, pid, done) in rows:
            if status == "running" and host == here and not _pid_alive(pid):
                status = "died"  # killed: no chance to say so itself
            out.append(RunRecord(id_, kind, created, finished, status, version, recipe, seed,
                                 steps, world, framework, json.loads(params), done, total,
                                 error))
        return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: cannot read it ({e})") from None

    def record(self, run_id: int) -> RunRecord:
        """The run with this id; an unknown id says which ids the store has."""
        runs = self.runs()
        for r in runs:
            if r.id == run_id:
                return r
        ids = [r.id for r in runs]
        have = (f"it has runs {min(ids)}-{max(ids)}" if len(ids) > 1 else
                f"it has run {ids[0]}" if ids else "it has no runs")
        raise StoreError(f"run {run_id} is not in store {self.path} ({have}; see hwport runs "
                         "list)")

    def latest(self) -> int:
        """The newest run's id."""
        runs = self.runs(limit=1)
        if not runs:
            raise StoreError(f"store {self.path} has no runs yet (hwport compare stores one)")
        return runs[0].id

    def load(self, run_id: int) -> StoredRun:
        """Everything run ``run_id`` stored: its cells in order, porting results, specs."""
        record = self.record(run_id)
        with self._reading():
            recipe = json.loads(self.db.execute("SELECT recipe_def FROM runs WHERE id = ?",
                                                (run_id,)).fetchone()[0])
            rows = self._cell_rows("run_id = ? AND role = 'cell' ORDER BY position", (run_id,))
            cells = [self._result(r) for r in rows]
            specs = {}
            for r in rows:
                spec = self.db.execute("SELECT spec FROM specs WHERE hash = ?",
                                       (r["spec_hash"],)).fetchone()
                specs[r["backend"]] = json.loads(spec[0])
            ports = {}
            for (result,) in self.db.execute("SELECT result FROM ports WHERE run_id = ? "
                                             "ORDER BY id", (run_id,)):
                d = json.loads(result)
                ports[(d["backend"], d["pipeline"], d["mode"])] = d
            reused = {}
            for r in rows:
                if r["reused_from"] is not None:
                    source = self.db.execute("SELECT run_id FROM cells WHERE id = ?",
                                             (r["reused_from"],)).fetchone()
                    reused[(r["backend"], r["pipeline"], r["mode"])] = (
                        int(source[0]) if source else 0)
        return StoredRun(record, recipe, cells, ports, specs, reused)


def _statements(script: str) -> list[str]:
    """The SQL statements of ``script``, each whole (semicolons in literals and comments
    do not split one)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


class Session:
    """A stored run in progress (from :meth:`Store.begin`): cells are committed one by one
    as they finish; with ``resume``, cells (and porting results) already stored with the
    same key are taken from the store instead of being run again."""

    def __init__(self, store: Store, run_id: int, resume: bool) -> None:
        self.store = store
        self.run_id = run_id
        self.resume = resume
        self.reused = 0
        self.stored = 0
        self.failed: str | None = None  # the first write error; later writes are skipped
        # told of each cell as it is stored or reused: (result, position, reused)
        self.on_stored: Callable[[RunResult, int | None, bool], None] | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if kind is None and self.failed:
            status, error = "failed", self.failed  # some cells were computed, not stored
        elif kind is None:
            status, error = "finished", None
        elif issubclass(kind, KeyboardInterrupt):
            status, error = "interrupted", str(exc) or "interrupted"
        else:
            status, error = "failed", f"{kind.__name__}: {exc}"
        with contextlib.suppress(StoreError):
            self.store._end(self.run_id, status, error)

    def reuse(self, position: int | None, key: str) -> RunResult | None:
        """With ``resume``: the stored cell with this key (recorded in this run at
        ``position`` if it came from another run), else None."""
        if not self.resume or self.failed:
            return None
        mine = self.store._cell_rows("run_id = ? AND key = ? AND position IS ?",
                                     (self.run_id, key, position))
        if mine:
            self.reused += 1
            result = self.store._result(mine[0])
            self._stored(result, position, True)
            return result
        hit = self.store.find_cell(key)
        if hit is None:
            return None
        cell_id, result, spec_hash, version = hit
        self._write(lambda: self.store._add_cell(
            self.run_id, "cell" if position is not None else "trial", position, key, result,
            None, cell_id, spec_hash, version))
        self.reused += 1
        self._stored(result, position, True)
        return result

    def add(self, position: int | None, key: str, result: RunResult, spec: BackendSpec) -> None:
        """Commit a finished cell (``position`` None: a trial of a porting search)."""
        if self._write(lambda: self.store._add_cell(
                self.run_id, "cell" if position is not None else "trial", position, key,
                result, spec, None)):
            self.stored += 1
        self._stored(result, position, False)

    def reuse_port(self, key: str) -> dict[str, Any] | None:
        """With ``resume``: a stored porting result with this key, else None."""
        if not self.resume or self.failed:
            return None
        mine = self.store.db.execute("SELECT result FROM ports WHERE run_id = ? AND key = ?",
                                     (self.run_id, key)).fetchone()
        if mine:
            return json.loads(mine[0])  # type: ignore[no-any-return]
        hit = self.store.find_port(key)
        if hit is None:
            return None
        self._write(lambda: self.store._add_port(self.run_id, key, hit[1], hit[0]))
        return hit[1]

    def add_port(self, key: str, result: PortResult) -> None:
        """Commit a finished porting search."""
        self._write(lambda: self.store._add_port(self.run_id, key, result.to_dict(), None))

    def _stored(self, result: RunResult, position: int | None, reused: bool) -> None:
        if self.on_stored is not None:
            self.on_stored(result, position, reused)

    def _write(self, write: Callable[[], object]) -> bool:
        """Run a write; a failing store is reported once and the run goes on unstored
        (what was computed is still returned and printed)."""
        if self.failed:
            return False
        try:
            write()
            return True
        except (StoreError, ValueError, TypeError, KeyError) as e:  # the store, or bad data
            self.failed = str(e) if isinstance(e, StoreError) else \
                f"store {self.store.path}: cannot store a result ({type(e).__name__}: {e})"
            return False
