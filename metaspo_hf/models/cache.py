"""A persistent response cache in front of any engine, so that a resumed run replays finished work.

Every completion is stored in SQLite under the SHA-256 of (model id, chat as canonical JSON,
generation settings, sample index). The sample index is k for the k-th identical chat of one call,
the same rule the engines use to give sampled copies different draws, so a replay returns the
very text the uninterrupted run got, copy by copy.

Log-likelihoods (``loglikelihood``) are stored the same way in their own table, under the SHA-256 of
(model id, "loglik", chat as canonical JSON, continuation): they are deterministic, so there is no
sample index and no generation setting in the key.

The file also keeps running totals of the wrapped engine's counters, committed together with the
rows they produced, so that a run resumed after a crash reports the generation costs an
uninterrupted run would have (``total_stats``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from ..errors import MetaspoError
from .base import Chat, Engine, EngineStats, GenerationSettings, LoglikRequest, chat_key, sample_indices
from .parallel import SINGLE, Processes

# SQLite allows at least 999 bound parameters per statement on every build still in use.
_LOOKUP_CHUNK = 500

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS loglikelihoods (key TEXT PRIMARY KEY, value REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS totals (model_id TEXT, name TEXT, value REAL NOT NULL, PRIMARY KEY (model_id, name))",
)


class CachedEngine:
    """Wraps ``engine``; answers repeated requests from ``path`` and sends only misses to the engine.

    Each ``generate`` call does one lookup, at most one call to the wrapped engine, and one
    committed transaction; a process killed mid-call loses only that call.

    With several processes (``parallel.py``) only the main one opens the file: it looks up each call and
    shares what it found, every process then sends the same misses to its engine (which shares out the
    work), and the main process stores the results.
    """

    def __init__(self, engine: Engine, path: str | Path, model_id: str | None = None,
                 processes: Processes = SINGLE):
        self.engine = engine
        self.path = Path(path)
        # The engine's own name identifies the loaded model when the caller has no better id.
        self.model_id = model_id if model_id is not None else engine.name
        self.name = engine.name
        self.processes = processes
        self._session = EngineStats()
        self._db = None
        if not processes.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30)
            # WAL survives a kill mid-transaction and lets readers (status) in during a write;
            # synchronous=FULL costs one fsync per engine call, negligible next to generation.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._db:
                for statement in _SCHEMA:
                    self._db.execute(statement)
        except sqlite3.DatabaseError as error:
            raise MetaspoError(
                f"response cache {self.path} cannot be opened: {error}",
                hint="delete the file to start the cache afresh (finished generations will be redone)",
            ) from error

    @property
    def stats(self) -> EngineStats:
        """This process's counters: the wrapped engine's work done for this cache, plus cache hits."""
        return EngineStats(**self._session.as_dict())

    @property
    def total_stats(self) -> EngineStats:
        """The counters of every committed call for this model id in this file, across processes:
        after a crash and resume, the generation counts equal an uninterrupted run's (the call in
        flight at the crash is counted once, when it is redone); ``cache_hits`` includes replays."""
        totals = EngineStats()
        rows = self._db.execute("SELECT name, value FROM totals WHERE model_id = ?", (self.model_id,))
        for name, value in rows:
            if hasattr(totals, name):
                setattr(totals, name, type(getattr(totals, name))(value))
        return totals

    def generate(
        self, chats: Sequence[Chat], settings: GenerationSettings, desc: str | None = None
    ) -> list[str]:
        chats = list(chats)
        if not chats:
            return []
        settings_key = settings.key()
        groups = [chat_key(chat) for chat in chats]  # canonical chat JSON per position
        indices = sample_indices(chats)  # sample index k per position
        keys = [self._key(group, settings_key, k) for group, k in zip(groups, indices, strict=True)]
        stored = self.processes.share(self._lookup(keys) if self._db else None)

        # The wrapped engine numbers identical chats by their order in the call it receives, so a
        # missing copy k is requested together with copies 0..k-1 of its chat (a subsequence of
        # the original call): copy k then gets sample index k, as it did in the original call.
        highest_missing: dict[str, int] = {}
        for group, k, key in zip(groups, indices, keys, strict=True):
            if key not in stored:
                highest_missing[group] = k
        request = [
            i
            for i, (group, k) in enumerate(zip(groups, indices, strict=True))
            if k <= highest_missing.get(group, -1)
        ]
        spent = EngineStats(cache_hits=len(chats) - len(request))
        fresh: list[str] = []
        if request:
            before = self.engine.stats.as_dict()
            fresh = self.engine.generate([chats[i] for i in request], settings, desc=desc)
            after = self.engine.stats.as_dict()
            spent.add(EngineStats(**{name: after[name] - before[name] for name in after}))

        self._store("responses", [(keys[i], text) for i, text in zip(request, fresh, strict=True)], spent)
        self._session.add(spent)
        for i, text in zip(request, fresh, strict=True):
            # A copy that was already stored keeps its stored text, so replays never change.
            stored.setdefault(keys[i], text)
        return [stored[key] for key in keys]

    def loglikelihood(self, requests: Sequence[LoglikRequest], desc: str | None = None) -> list[float]:
        """The wrapped engine's log-likelihoods, each computed once per file: one lookup, at most one call
        to the engine (for the distinct missing requests) and one committed transaction, as ``generate``.
        ``cache_hits`` counts the requests answered from the file."""
        requests = list(requests)
        if not requests:
            return []
        keys = [self._loglik_key(chat, continuation) for chat, continuation in requests]
        stored = self.processes.share(self._lookup(keys, table="loglikelihoods", column="value") if self._db else None)
        missing: dict[str, int] = {}  # key -> first position asking for it
        for i, key in enumerate(keys):
            if key not in stored:
                missing.setdefault(key, i)
        spent = EngineStats(cache_hits=sum(key in stored for key in keys))
        fresh: list[float] = []
        if missing:
            before = self.engine.stats.as_dict()
            fresh = self.engine.loglikelihood([requests[i] for i in missing.values()], desc=desc)
            after = self.engine.stats.as_dict()
            spent.add(EngineStats(**{name: after[name] - before[name] for name in after}))
        self._store("loglikelihoods", [(key, float(value)) for key, value in zip(missing, fresh, strict=True)], spent)
        self._session.add(spent)
        stored.update(zip(missing, map(float, fresh), strict=True))
        return [stored[key] for key in keys]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def __enter__(self) -> CachedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _store(self, table: str, rows: list[tuple], spent: EngineStats) -> None:
        """One transaction: this call's rows and counters, or nothing (the main process's file only)."""
        if self._db is None:
            return
        column = "response" if table == "responses" else "value"
        with self._db:
            self._db.executemany(f"INSERT OR IGNORE INTO {table} (key, {column}) VALUES (?, ?)", rows)
            self._add_totals(spent)

    def _add_totals(self, spent: EngineStats) -> None:
        self._db.executemany(
            "INSERT INTO totals (model_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (model_id, name) DO UPDATE SET value = value + excluded.value",
            [(self.model_id, name, value) for name, value in spent.as_dict().items() if value],
        )

    def _loglik_key(self, chat: Chat, continuation: str) -> str:
        record = json.dumps([self.model_id, "loglik", chat_key(chat), continuation], ensure_ascii=False)
        return hashlib.sha256(record.encode()).hexdigest()

    def _key(self, group: str, settings_key: dict, k: int) -> str:
        record = json.dumps([self.model_id, group, settings_key, k], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(record.encode()).hexdigest()

    def _lookup(self, keys: list[str], table: str = "responses", column: str = "response") -> dict:
        # Generation keys of one call are distinct (copies of one chat differ by their sample index);
        # repeated log-likelihood keys are looked up once.
        keys = list(dict.fromkeys(keys))
        found: dict = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(f"SELECT key, {column} FROM {table} WHERE key IN ({marks})", chunk)
            )
        return found


def count_responses(path: str | Path) -> int:
    """How many completions the cache file at ``path`` holds (0 when there is none yet)."""
    path = Path(path)
    if not path.exists():
        return 0
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

