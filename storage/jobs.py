"""The job repository. Status changes go through `JobStore.transition`, which refuses illegal ones.

Methods that write run as writers (`storage.database.for_writes`): on SQLite they take the write
lock at BEGIN, so they take turns; reads take no lock and never hold a writer up.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Session, col, select

from storage.batches import BatchConflict, ChangedJob, image_changes
from storage.database import Store
from storage.job_status import IllegalTransition, JobStatus, check_transition
from storage.models import GenerationJob, IdempotencyKey, utcnow

UNFINISHED = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
# Ids per IN list: far below the bound-parameter limits of SQLite (32,766) and PostgreSQL (65,535).
IN_LIST_CHUNK = 500

T = TypeVar("T")


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID | str) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = str(job_id)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.job_id,)


class IdempotencyMismatch(Exception):
    """An idempotency key came back with a different request than the one it was first used for."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for a different request")
        self.key = key

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses Ray actor boundaries: rebuild from the fields, not from the message.
        return type(self), (self.key,)


@dataclass(frozen=True)
class IdempotencyClaim:
    """A submission's idempotency key, per owner, and the sha256 hex of the request it came with."""

    owner: str
    key: str
    request_hash: str
    batch_id: str | None


@dataclass(frozen=True)
class Submission:
    """What `JobStore.submit` answered: the request's jobs as stored, in its order, and `found`, the
    ids of those stored before it (all of them for a repeated key; a batch's items submitted again)."""

    jobs: list[GenerationJob]
    batch_id: str | None
    found: frozenset[uuid.UUID] = frozenset()

    @property
    def new(self) -> list[GenerationJob]:
        """The jobs this request stored."""
        return [job for job in self.jobs if job.id not in self.found]

    @property
    def created(self) -> bool:
        return bool(self.new)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """Timestamps in UTC: SQLite hands back naive ones (written in UTC), PostgreSQL the session's zone."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), IN_LIST_CHUNK):
        yield items[start : start + IN_LIST_CHUNK]


def _statuses(from_status: JobStatus | Collection[JobStatus]) -> frozenset[JobStatus]:
    # A JobStatus is a str, hence a Collection itself: test for it first.
    return frozenset({from_status}) if isinstance(from_status, JobStatus) else frozenset(from_status)


def _shared_batch_id(jobs: Sequence[GenerationJob]) -> str | None:
    batch_ids = {job.batch_id for job in jobs}
    return batch_ids.pop() if len(batch_ids) == 1 else None


def _by_ids(session: Session, query: Any, job_ids: Collection[uuid.UUID | str]) -> list[Any]:
    """`query`'s rows for `job_ids`, one IN list per chunk of ids."""
    ids = sorted({_uuid(job_id) for job_id in job_ids})
    return [row for chunk in _chunks(ids) for row in session.exec(query.where(col(GenerationJob.id).in_(chunk)))]


def _found(session: Session, jobs: Sequence[GenerationJob]) -> dict[uuid.UUID, GenerationJob]:
    """Those of `jobs` whose id is stored already, as stored, by id; BatchConflict naming those
    stored asking for another image."""
    found = {job.id: job for job in _by_ids(session, select(GenerationJob), [job.id for job in jobs])}
    changed = [ChangedJob(job.id, changes) for job in jobs if job.id in found and (changes := image_changes(found[job.id], job))]
    if changed:
        raise BatchConflict(changed)
    return found


def _owned_by(owner: str | None) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clauses that keep `owner`'s jobs, for `query.where(*...)`; None: everyone's, no clause."""
    return () if owner is None else (col(GenerationJob.owner) == owner,)


_STATUS_VIEW = select(GenerationJob.id, GenerationJob.status, GenerationJob.updated_at)


def _hold_statement(dialect: str) -> sa.Update:
    # The JSON functions edit the stored document in place: no read, so no lost update.
    jobs = GenerationJob.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table models; its stubs do not say so
    document = sa.bindparam("document", type_=sa.String)
    if dialect == "postgresql":
        degraded = sa.func.jsonb_set(jobs.c.metadata, sa.literal_column("'{degraded}'"), sa.cast(document, JSONB))
    else:
        degraded = sa.func.json_set(jobs.c.metadata, sa.literal_column("'$.degraded'"), sa.func.json(document))
    return (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.status == JobStatus.PENDING.value)
        .values({jobs.c.metadata: degraded, jobs.c.updated_at: sa.bindparam("now", type_=jobs.c.updated_at.type)})
    )


class JobStore(Store):
    def add_all(self, jobs: Sequence[GenerationJob]) -> list[GenerationJob]:
        """Insert jobs in one transaction: all of them or none."""
        with self._write_session() as session:
            session.add_all(jobs)
            session.commit()
        return list(jobs)

    def submit(self, jobs: Sequence[GenerationJob], idempotency: IdempotencyClaim | None = None) -> Submission:
        """Insert `jobs` in one transaction, all or none; with a claim, once per (owner, key).

        A job whose id is stored already (a batch's item submitted again) is not inserted: it is
        answered as stored if it asks for the same image, and BatchConflict names it if not; then
        nothing is stored.

        A claim whose key is stored already returns the jobs stored with it (as they are now, in
        their submission order; any deleted since are left out), all of them `found`, if it comes
        with the same request hash, and raises IdempotencyMismatch if not. `batch_id` is the
        claim's (the stored one's on a repeat); without a claim, the batch all the jobs share.
        """
        try:
            return self._submit(jobs, idempotency)
        except sa.exc.IntegrityError:
            # On PostgreSQL a concurrent submission can store the key, or the same batch items,
            # between our look-ups and our inserts (SQLite's writers take turns); it has committed
            # now, so looking again finds what it stored. Any other violation fails again.
            return self._submit(jobs, idempotency)

    def stored_already(self, jobs: Sequence[GenerationJob]) -> frozenset[uuid.UUID]:
        """The ids of those of `jobs` stored already, which `submit` would not insert, without
        writing; BatchConflict as `submit` raises it. Lets a batch submitted again ask room and
        quota for its new items alone."""
        with self._session() as session:
            return frozenset(_found(session, jobs))

    def replay(self, claim: IdempotencyClaim) -> Submission | None:
        """What `submit` would answer for a claim whose key is stored already, without writing; None
        for a key not stored yet. Lets a replay skip the room and quota checks of a new submission."""
        with self._session() as session:
            stored = session.get(IdempotencyKey, (claim.owner, claim.key))
            return None if stored is None else self._repeat(session, stored, claim)

    def _submit(self, jobs: Sequence[GenerationJob], claim: IdempotencyClaim | None) -> Submission:
        with self._write_session() as session:
            if claim is not None and (stored := session.get(IdempotencyKey, (claim.owner, claim.key))) is not None:
                return self._repeat(session, stored, claim)
            found = _found(session, jobs)
            if claim is not None:
                job_ids = [str(job.id) for job in jobs]
                key = IdempotencyKey(
                    owner=claim.owner, key=claim.key, request_hash=claim.request_hash, job_ids=job_ids, batch_id=claim.batch_id
                )
                # The key goes in first, so a concurrent claimant stops at it before writing any job.
                session.add(key)
                session.flush()
            session.add_all([job for job in jobs if job.id not in found])
            session.commit()
        batch_id = _shared_batch_id(jobs) if claim is None else claim.batch_id
        return Submission([found.get(job.id, job) for job in jobs], batch_id, frozenset(found))

    def _repeat(self, session: Session, stored: IdempotencyKey, claim: IdempotencyClaim) -> Submission:
        if stored.request_hash != claim.request_hash:
            raise IdempotencyMismatch(claim.key)
        found = {str(job.id): job for job in _by_ids(session, select(GenerationJob), stored.job_ids)}
        jobs = [found[job_id] for job_id in stored.job_ids if job_id in found]
        return Submission(jobs, stored.batch_id, frozenset(job.id for job in jobs))

    def delete_idempotency_keys(self, older_than: datetime) -> int:
        """Forget the keys stored before `older_than`; a request repeated later creates new jobs."""
        statement = sa.delete(IdempotencyKey).where(col(IdempotencyKey.created_at) < as_utc(older_than))
        with self._writer.begin() as connection:
            return connection.execute(statement).rowcount

    def get(self, job_id: uuid.UUID | str, *, owner: str | None = None) -> GenerationJob:
        """The job; with `owner`, only if it is theirs: another owner's job is JobNotFound, as a missing one."""
        with self._session() as session:
            job = session.get(GenerationJob, _uuid(job_id))
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(job_id)
        return job

    def get_many(self, job_ids: Collection[str]) -> list[GenerationJob]:
        """The jobs among `job_ids` that exist, in dispatch order (priority, arrival, id)."""
        with self._session() as session:
            jobs: list[GenerationJob] = _by_ids(session, select(GenerationJob), job_ids)
        return sorted(jobs, key=lambda job: (job.priority, job.created_at, job.id))

    def statuses(self, job_ids: Collection[str]) -> dict[str, tuple[str, datetime]]:
        """id -> (status, updated_at in UTC) for those of `job_ids` that exist."""
        with self._session() as session:
            rows = _by_ids(session, _STATUS_VIEW, job_ids)
        return {str(job_id): (status, as_utc(updated_at)) for job_id, status, updated_at in rows}

    def unfinished_view(self) -> dict[str, tuple[str, datetime]]:
        """id -> (status, updated_at in UTC) of the pending and running jobs, reading nothing else."""
        with self._session() as session:
            rows = session.exec(_STATUS_VIEW.where(col(GenerationJob.status).in_(UNFINISHED))).all()
        return {str(job_id): (status, as_utc(updated_at)) for job_id, status, updated_at in rows}

    def for_batch(self, batch_id: str, *, owner: str | None = None) -> list[GenerationJob]:
        query = select(GenerationJob).where(GenerationJob.batch_id == batch_id, *_owned_by(owner))
        with self._session() as session:
            return list(session.exec(query))

    def unfinished(self) -> list[GenerationJob]:
        """Pending and running jobs in dispatch order, to rebuild the router's queue."""
        query = (
            select(GenerationJob)
            .where(col(GenerationJob.status).in_(UNFINISHED))
            .order_by(col(GenerationJob.priority), col(GenerationJob.created_at), col(GenerationJob.id))
        )
        with self._session() as session:
            return list(session.exec(query))

    def transition(
        self,
        job_id: uuid.UUID | str,
        target: JobStatus,
        *,
        metadata_patch: dict[str, Any] | None = None,
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        count_attempt: bool = False,
        from_status: JobStatus | Collection[JobStatus] | None = None,
        **changes: Any,
    ) -> GenerationJob:
        """Move a job to `target`, setting `changes` (and counting an attempt) in one transaction.

        With `from_status` (a status or several), only a job in it moves (IllegalTransition
        otherwise): the caller's belief about the job is checked, not just the state machine. The
        row is locked (FOR UPDATE; BEGIN IMMEDIATE on SQLite), so two writers cannot both move a
        job out of the same status, and `edit_metadata` reads and writes in the same lock.
        """
        with self._write_session() as session:
            job = self._locked(session, job_id)
            current = JobStatus(job.status)
            if from_status is not None and current not in _statuses(from_status):
                raise IllegalTransition(str(job.id), current, target)
            check_transition(str(job.id), current, target)
            job.status = target.value
            if count_attempt:
                job.attempts += 1
            return self._save(session, job, changes, metadata_patch, edit_metadata)

    def annotate(
        self,
        job_id: uuid.UUID | str,
        *,
        while_status: JobStatus,
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        **changes: Any,
    ) -> GenerationJob | None:
        """Change a job without changing its status, if it still has `while_status`; else None."""
        with self._write_session() as session:
            job = self._locked(session, job_id)
            if job.status != while_status.value:
                return None
            return self._save(session, job, changes, None, edit_metadata)

    @staticmethod
    def _locked(session: Session, job_id: uuid.UUID | str) -> GenerationJob:
        job = session.exec(select(GenerationJob).where(GenerationJob.id == _uuid(job_id)).with_for_update()).first()
        if job is None:
            raise JobNotFound(job_id)
        return job

    @staticmethod
    def _save(
        session: Session,
        job: GenerationJob,
        changes: dict[str, Any],
        metadata_patch: dict[str, Any] | None,
        edit_metadata: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> GenerationJob:
        for name, value in changes.items():
            setattr(job, name, value)
        # Always a new dict: SQLAlchemy does not see changes made inside the old one.
        meta = {**job.meta, **(metadata_patch or {})}
        job.meta = edit_metadata(meta) if edit_metadata else meta
        job.updated_at = utcnow()
        session.add(job)
        session.commit()
        return job

    def hold_many(self, holds: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Set `metadata.degraded` to each (job id, document) on jobs still pending, nothing else.

        One UPDATE executed with a parameter set per hold, in one transaction; the rest of each
        job's metadata is left as it is in the row. Returns the rows changed, as the driver sums
        them over the parameter sets (sqlite3 and psycopg 3 both do): jobs no longer pending, or
        gone, count 0; an id given twice counts twice.
        """
        if not holds:
            return 0
        now = utcnow()
        params = [{"job_id": _uuid(job_id), "document": json.dumps(document), "now": now} for job_id, document in holds]
        with self._writer.begin() as connection:
            return connection.execute(_hold_statement(connection.dialect.name), params).rowcount

    def count_by_status(self, *, owner: str | None = None) -> dict[str, int]:
        query = select(GenerationJob.status, sa.func.count()).where(*_owned_by(owner)).group_by(GenerationJob.status)
        with self._session() as session:
            return dict(session.exec(query).all())

    def list(
        self,
        *,
        status: JobStatus | None = None,
        lane: str | None = None,
        batch_id: str | None = None,
        owner: str | None = None,
        after: uuid.UUID | None = None,
        limit: int = 50,
    ) -> list[GenerationJob]:
        """The newest jobs first; each filter given narrows the list (`owner`: that user's jobs only).

        `after`: the next page, the jobs that come after that one (the last of the page before)
        in the listing's order; none when it is not one of `owner`'s jobs.
        """
        query = select(GenerationJob).where(*_owned_by(owner))
        if after is not None:
            # Keyset paging: read from where that job stands in the index, not through the pages before.
            anchor = select(GenerationJob.created_at).where(GenerationJob.id == after, *_owned_by(owner)).scalar_subquery()
            query = query.where(
                col(GenerationJob.created_at) <= anchor,
                sa.or_(col(GenerationJob.created_at) < anchor, col(GenerationJob.id) > after),
            )
        if status is not None:
            query = query.where(GenerationJob.status == status.value)
        if lane is not None:
            query = query.where(GenerationJob.lane == lane)
        if batch_id is not None:
            query = query.where(GenerationJob.batch_id == batch_id)
        query = query.order_by(col(GenerationJob.created_at).desc(), col(GenerationJob.id)).limit(limit)
        with self._session() as session:
            return list(session.exec(query))
