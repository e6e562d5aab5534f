"""The unit of work: owns one transaction, rolls back unless `commit()` is called."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from domain.clock import Clock, utc_now
from domain.db.engine import describe_db_error
from domain.errors import DatabaseUnavailable
from domain.runs.repository import RunRepository


class UnitOfWork:
    """`with uow:` opens a connection and a transaction; leaving without commit() rolls back.

    `read_only=True` (for reads that need no snapshot across their statements: the status API)
    runs each statement in autocommit instead. Connection failures surface as
    DatabaseUnavailable with the database named (no password).
    """

    runs: RunRepository
    conn: Connection

    def __init__(self, engine: Engine, clock: Clock = utc_now, *, read_only: bool = False) -> None:
        self.engine = engine
        self.clock = clock
        self.read_only = read_only
        self._after_commit: list[Callable[[], None]] = []

    def __enter__(self) -> UnitOfWork:
        try:
            self.conn = self.engine.connect()
            if self.read_only:
                # Each statement on its own (autocommit): no BEGIN and no ROLLBACK round trip
                # around what only reads. Statements see what was committed when each began.
                if self.conn.dialect.name == "sqlite":
                    # pysqlite already runs without implicit transactions (domain.db.engine); the
                    # begin hook skips its BEGIN IMMEDIATE for this flag. (SQLAlchemy's
                    # AUTOCOMMIT would hand the connection back with pysqlite's own implicit
                    # transactions switched on.)
                    self.conn.execution_options(conveyor_read_only=True)
                else:
                    self.conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                self.conn.begin()
        except (OperationalError, DBAPIError) as exc:
            raise DatabaseUnavailable(describe_db_error(self._url, exc)) from None
        self.runs = RunRepository(self.conn)
        self._after_commit = []
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.conn.in_transaction():
                self.conn.rollback()
        finally:
            self.conn.close()
        if isinstance(exc, OperationalError):
            raise DatabaseUnavailable(describe_db_error(self._url, exc)) from None

    def commit(self) -> None:
        self.conn.commit()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def rollback(self) -> None:
        self.conn.rollback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed (e.g. publish to the broker)."""
        self._after_commit.append(callback)

    @property
    def _url(self) -> str:
        return self.engine.url.render_as_string(hide_password=False)
