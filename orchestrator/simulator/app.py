"""A local, faithful server of the Dotdigital Insight data bulk import API, with fault injection.

The simulator is a test oracle: it imports nothing from the client, the engine or the record rules.
It serves ``PUT /insightData/v3/import``, ``GET /insightData/v3/import/{importId}`` and
``GET /v2/account-info`` like the real API (Basic auth, body rules, 5 active imports per account,
per-record failures, records applied when an import finishes), plus an inspection surface under
``/_simulator/`` (no auth, never faulted, not counted): ``GET stats``, ``GET collections``,
``GET collections/{name}``, ``GET|POST faults`` and ``POST contacts``.

Faults are counters: each matching request consumes one. A request first waits out a slow fault,
then may be answered by a rate-limit fault, then by a server-error fault, before auth is checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import gc
import hashlib
import hmac
import random
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

from orchestrator.logs import get_logger

from .rules import (
    BodyError,
    KnownFieldNames,
    RecordFailure,
    analyse_records,
    default_contact_exists,
    validate_body,
)

__all__ = [
    "STATE_KEY",
    "Faults",
    "ImportStats",
    "Simulator",
    "SimulatorConfig",
    "SimulatorState",
    "SimulatorStats",
    "make_app",
    "serve",
]

logger = get_logger("orchestrator.simulator")

NOT_STARTED = "NotStarted"
PROCESSING = "Processing"
FINISHED = "Finished"
FAILED = "Failed"

_IMPORT_PATH = re.compile(r"/insightData/v3/import/([^/]+)")


def _call_kind(method: str, path: str) -> str:
    if path == "/insightData/v3/import" and method == "PUT":
        return "PUT import"
    if method == "GET" and _IMPORT_PATH.fullmatch(path):
        return "GET import"
    if method == "GET" and path == "/v2/account-info":
        return "GET account-info"
    return "other"


_REGION_IN_HOST = re.compile(r"(?:^|[^a-z0-9])(r\d+)-api", re.IGNORECASE)
_SERVER_ERRORS = (
    (500, "internalServerError", "The server had an internal error; retry later."),
    (502, "badGateway", "The gateway received an invalid response; retry later."),
    (503, "serviceUnavailable", "The service is temporarily unavailable; retry later."),
)
# Parsing and checking a body this large would stall the loop, so it goes to a worker thread.
_THREAD_BODY_BYTES = 256 * 1024
_THREAD_RECORDS = 2_000
# A fraction of the processing time an import spends as NotStarted, as if queued.
_QUEUED_FRACTION = 0.1
_RATE_LIMIT = 35
_ACCOUNT_ID = 424242


@dataclass(slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulated account behaves; mutable so a test can change it while the server runs.

    Args:
        username: the API user accepted by Basic auth.
        password: its password.
        integration_token: when set, every call must carry it in ``x-ddg-integration-token``.
        records_per_second: processing speed of one import.
        min_processing_s: floor on the processing time of one import, in seconds.
        jitter: +/- fraction applied at random to each processing time (0 <= jitter < 1).
        max_active_imports: imports that may be active at once on the account.
        max_body_bytes: largest request body accepted; larger answers 413.
        region: the region this account lives in; a Host naming another region answers 403.
        api_endpoint: the ``ApiEndpoint`` account-info answers (the account's own API root);
            the simulator's own URL when unset.
        seed: random seed for processing jitter and import ids, for deterministic runs.
        keep_bodies: keep every accepted body as received in ``SimulatorStats.bodies`` (the
            stored records are parsed, so numbers beyond double precision read back rounded;
            the bodies show exactly what was sent).
    """

    username: str = "apiuser-demo@apiconnector.com"
    password: str = field(default="demo-password", repr=False)
    integration_token: str | None = field(default=None, repr=False)
    records_per_second: float = 20_000.0
    min_processing_s: float = 0.0
    jitter: float = 0.2
    max_active_imports: int = 5
    max_body_bytes: int = 50_000_000
    region: str = "r1"
    api_endpoint: str | None = None
    seed: int | None = None
    keep_bodies: bool = False

    def __post_init__(self) -> None:
        if self.records_per_second <= 0:
            raise ValueError(f"records_per_second must be > 0, got {self.records_per_second!r}")
        if self.min_processing_s < 0:
            raise ValueError(f"min_processing_s must be >= 0, got {self.min_processing_s!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_active_imports < 1:
            raise ValueError(f"max_active_imports must be >= 1, got {self.max_active_imports!r}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes!r}")


@dataclass(slots=True, kw_only=True)
class Faults:
    """Faults to inject, as counters of the next N matching requests; mutable at runtime.

    Args:
        server_errors: the next N requests answer 500, 502, 503 in turn, with an error body.
        resets_after_accept: the next N PUTs that are accepted start their import, then the
            connection is dropped without a response (a lost response).
        slow_responses: the next N requests wait ``slow_delay_s`` before being handled.
        slow_delay_s: the delay of a slow response, in seconds.
        failed_imports: the next N accepted imports end ``Failed`` with nothing applied.
        rate_limit_calls: the next N requests answer 429 ``rateLimitExceeded`` with
            ``X-RateLimit-*`` and ``Retry-After`` headers.
        rate_limit_reset_s: the seconds sent in ``X-RateLimit-Reset`` and ``Retry-After``.
        foreign_active_imports: slots held by another integration on the same account.
        reject_status_calls: the next N status GETs answer 404 ``insightData:importNotFound``.
    """

    server_errors: int = 0
    resets_after_accept: int = 0
    slow_responses: int = 0
    slow_delay_s: float = 0.0
    failed_imports: int = 0
    rate_limit_calls: int = 0
    rate_limit_reset_s: float = 1.0
    foreign_active_imports: int = 0
    reject_status_calls: int = 0


@dataclass(slots=True)
class ImportStats:
    """What the simulator knows about one accepted import (times are ``time.monotonic()``).

    Args:
        import_id: the id answered in the 202.
        collection: the collection name.
        scope: ``account`` or ``contact``.
        records: records in the body.
        body_bytes: size of the body as received.
        accepted_at: when the 202 was decided.
        planned_finish_at: when processing is due to end.
        finished_at: when the import reached a terminal status, if it has.
        status: the current status word.
        polls: arrival times of every status GET for this import.
        imported: records applied, once finished.
        rejected: records failed, once finished.
        lost_response: whether the 202 was dropped by a fault.
        body_sha256: the SHA-256 of the body as received (hex): the same body sent twice shows
            as two imports with one digest.
    """

    import_id: str
    collection: str
    scope: str
    records: int
    body_bytes: int
    accepted_at: float
    planned_finish_at: float
    finished_at: float | None = None
    status: str = NOT_STARTED
    polls: list[float] = field(default_factory=list)
    imported: int | None = None
    rejected: int | None = None
    lost_response: bool = False
    body_sha256: str = ""


@dataclass(slots=True)
class SimulatorStats:
    """Counters of everything the simulator answered (the ``/_simulator/`` endpoints excluded).

    Args:
        imports: every accepted import by id, in acceptance order.
        max_active_seen: the most imports of ours active at once.
        max_active_seen_with_foreign: the same, counting ``foreign_active_imports`` too.
        rejected_too_many_active: PUTs answered 429 ``insightData:tooManyActiveImports``.
        rejected_too_large: PUTs answered 413.
        status_counts: answers by HTTP status code (lost responses not included).
        requests: requests received.
        calls: requests received by kind: ``"PUT import"``, ``"GET import"``, ``"GET account-info"``
            or ``"other"``.
        lost_responses: responses dropped by the ``resets_after_accept`` fault.
        bodies: every accepted body as received, by import id (``keep_bodies`` only; not in
            ``to_dict``).
    """

    imports: dict[str, ImportStats] = field(default_factory=dict)
    max_active_seen: int = 0
    max_active_seen_with_foreign: int = 0
    rejected_too_many_active: int = 0
    rejected_too_large: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    lost_responses: int = 0
    bodies: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as JSON-friendly data (status codes become string keys)."""
        return {
            "imports": [asdict(stats) for stats in self.imports.values()],
            "max_active_seen": self.max_active_seen,
            "max_active_seen_with_foreign": self.max_active_seen_with_foreign,
            "rejected_too_many_active": self.rejected_too_many_active,
            "rejected_too_large": self.rejected_too_large,
            "status_counts": {str(code): n for code, n in sorted(self.status_counts.items())},
            "requests": self.requests,
            "calls": dict(self.calls),
            "lost_responses": self.lost_responses,
        }


@dataclass(slots=True)
class _Import:
    stats: ImportStats
    collection_type: str
    records: list[dict[str, Any]] | None
    fail: bool
    contact_exists: Callable[[str], bool]
    answer: bytes | None = None


class SimulatorState:
    """Everything one simulated account holds; shared by the app's handlers and the tests.

    Args:
        config: the account's behaviour.
        faults: the faults to inject.
    """

    def __init__(self, config: SimulatorConfig, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.base_url: str | None = None
        self.collections: dict[str, dict[Any, dict[str, Any]]] = {}
        self.collection_info: dict[str, dict[str, str]] = {}
        self.stats = SimulatorStats()
        self.imports: dict[str, _Import] = {}
        self.active: set[str] = set()
        self.contacts: frozenset[str] | None = None
        self.rng = random.Random(config.seed)
        self.field_names = KnownFieldNames()  # valid names seen, so the deep check is a lookup
        self._server_error_turn = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def set_contacts(self, values: Iterable[str] | None) -> None:
        """Make exactly these contact values known, or restore the default rule with ``None``.

        Args:
            values: contact identity values (emails, ids, ...) that exist; ``None`` means every
                contact exists except values ending in ``.invalid``.
        """
        self.contacts = None if values is None else frozenset(values)

    def contact_checker(self) -> Callable[[str], bool]:
        """Return the contact rule as it stands now (imports keep the rule of their acceptance)."""
        if self.contacts is None:
            return default_contact_exists
        return self.contacts.__contains__

    def next_server_error(self) -> tuple[int, str, str]:
        """Return the next 5xx to answer, rotating through 500, 502 and 503."""
        answer = _SERVER_ERRORS[self._server_error_turn % len(_SERVER_ERRORS)]
        self._server_error_turn += 1
        return answer

    def new_import_id(self) -> str:
        """Return a fresh uuid4 string, reproducible when the config has a seed."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def accept(
        self,
        *,
        name: str,
        scope: str,
        collection_type: str,
        records: list[dict[str, Any]],
        body_bytes: int,
    ) -> ImportStats:
        """Create an import, take its slot and start its processing timer.

        Args:
            name: the collection name.
            scope: the collection scope.
            collection_type: the collection type.
            records: the validated records.
            body_bytes: the size of the body.
        """
        config, faults = self.config, self.faults
        now = time.monotonic()
        duration = max(config.min_processing_s, len(records) / config.records_per_second)
        duration *= 1 + self.rng.uniform(-config.jitter, config.jitter)
        stats = ImportStats(
            import_id=self.new_import_id(),
            collection=name,
            scope=scope,
            records=len(records),
            body_bytes=body_bytes,
            accepted_at=now,
            planned_finish_at=now + duration,
        )
        fail = faults.failed_imports > 0
        if fail:
            faults.failed_imports -= 1
        entry = _Import(stats, collection_type, records, fail, self.contact_checker())
        self.imports[stats.import_id] = entry
        self.stats.imports[stats.import_id] = stats
        self.active.add(stats.import_id)
        self.stats.max_active_seen = max(self.stats.max_active_seen, len(self.active))
        self.stats.max_active_seen_with_foreign = max(
            self.stats.max_active_seen_with_foreign,
            len(self.active) + faults.foreign_active_imports,
        )
        task = asyncio.get_running_loop().create_task(self._process(entry, duration))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stats

    async def _process(self, entry: _Import, duration: float) -> None:
        stats = entry.stats
        try:
            records = entry.records
            assert records is not None
            contact_scope = stats.scope == "contact"
            work = functools.partial(
                _analyse,
                records,
                contact_scope=contact_scope,
                exists=entry.contact_exists,
                known=self.field_names,
            )
            result: tuple[dict[Any, dict[str, Any]], list[dict[str, Any]]] = ({}, [])
            pending: asyncio.Future[Any] | None = None
            if entry.fail:
                pass  # a failed import applies nothing, so there is nothing to analyse
            elif len(records) >= _THREAD_RECORDS:
                pending = asyncio.get_running_loop().run_in_executor(None, work)
            else:
                result = work()
            try:
                await asyncio.sleep(duration * _QUEUED_FRACTION)
                stats.status = PROCESSING
                if pending is not None:
                    result = await pending
            finally:
                if pending is not None:
                    pending.cancel()
            upserts, failures = result
            await asyncio.sleep(max(0.0, stats.planned_finish_at - time.monotonic()))
            if entry.fail:
                self._finish(entry, FAILED)
                return
            # The upsert happens at the finish, so a later-finishing import overwrites.
            self.collections.setdefault(stats.collection, {}).update(upserts)
            self.collection_info[stats.collection] = {
                "collectionScope": stats.scope,
                "collectionType": entry.collection_type,
            }
            stats.imported = len(upserts)
            stats.rejected = len(failures)
            self._finish(
                entry,
                FINISHED,
                summary={
                    "totalRecords": stats.records,
                    "totalImported": stats.imported,
                    "totalRejected": stats.rejected,
                },
                failures=failures,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("simulator.import_crashed", import_id=stats.import_id)
            self._finish(entry, FAILED)

    def _finish(self, entry: _Import, status: str, **extra: Any) -> None:
        stats = entry.stats
        stats.status = status
        stats.finished_at = time.monotonic()
        entry.records = None
        entry.answer = orjson.dumps(
            {
                "importId": stats.import_id,
                "status": status,
                "collectionName": stats.collection,
                **extra,
            }
        )
        self.active.discard(stats.import_id)

    def status_body(self, import_id: str) -> bytes | None:
        """Return the status answer of an import, or ``None`` when the id is unknown.

        Args:
            import_id: the import id in canonical form.
        """
        entry = self.imports.get(import_id)
        if entry is None:
            return None
        if entry.answer is not None:
            return entry.answer
        stats = entry.stats
        return orjson.dumps(
            {"importId": import_id, "status": stats.status, "collectionName": stats.collection}
        )

    async def aclose(self) -> None:
        """Cancel the processing timers; imports still running stay unfinished."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


STATE_KEY = web.AppKey("simulator_state", SimulatorState)
_LOST = web.RequestKey("simulator_lost_response", bool)


def _analyse(
    records: list[dict[str, Any]],
    *,
    contact_scope: bool,
    exists: Callable[[str], bool],
    known: KnownFieldNames,
) -> tuple[dict[Any, dict[str, Any]], list[dict[str, Any]]]:
    with _collector_paused():
        analysis = analyse_records(
            records, contact_scope=contact_scope, contact_exists=exists, known=known
        )
        return analysis.upserts, [
            _failure_entry(records[failure.index], failure, contact_scope)
            for failure in analysis.failures
        ]


def _failure_entry(
    record: dict[str, Any], failure: RecordFailure, contact_scope: bool
) -> dict[str, Any]:
    owner: dict[str, Any] = {"ownerType": "contact" if contact_scope else "account"}
    if contact_scope:
        owner["contactIdentity"] = record["contactIdentity"]
    return {
        "collectionOwner": owner,
        "failureReason": failure.reason,
        "details": [failure.detail],
        "key": record["key"],
        "json": record["json"],
    }


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers,
    )


def _error(
    status: int,
    code: str,
    description: str,
    *,
    details: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    payload: dict[str, Any] = {"errorCode": code, "description": description}
    if details:
        payload["details"] = [{"item": item, "description": text} for item, text in details]
    return _json(status, payload, headers)


def _canonical_id(raw: str) -> str | None:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/_simulator/"):
        return await handler(request)
    state = request.app[STATE_KEY]
    state.stats.requests += 1
    kind = _call_kind(request.method, request.path)
    state.stats.calls[kind] = state.stats.calls.get(kind, 0) + 1
    if request.method == "GET" and (match := _IMPORT_PATH.fullmatch(request.path)):
        entry = state.imports.get(_canonical_id(match.group(1)) or "")
        if entry is not None:
            entry.stats.polls.append(time.monotonic())
    try:
        response = await _guarded(request, handler, state)
    except web.HTTPException as exc:  # no such route or method
        response = _error(exc.status, "notFound" if exc.status == 404 else "badRequest", exc.reason)
    if request.get(_LOST):
        state.stats.lost_responses += 1
    else:
        counts = state.stats.status_counts
        counts[response.status] = counts.get(response.status, 0) + 1
    return response


async def _guarded(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    state: SimulatorState,
) -> web.StreamResponse:
    faults, config = state.faults, state.config
    if faults.slow_responses > 0:
        faults.slow_responses -= 1
        await asyncio.sleep(faults.slow_delay_s)
    if faults.rate_limit_calls > 0:
        faults.rate_limit_calls -= 1
        reset = f"{faults.rate_limit_reset_s:g}"
        return _error(
            429,
            "rateLimitExceeded",
            f"The call rate limit of the account is exceeded; retry after {reset} s.",
            headers={
                "X-RateLimit-Limit": str(_RATE_LIMIT),
                "X-RateLimit-Reset": reset,
                "X-RateLimit-Scope": "account",
                "Retry-After": reset,
            },
        )
    if faults.server_errors > 0:
        faults.server_errors -= 1
        return _error(*state.next_server_error())
    if not _authenticated(request, config):
        return _error(
            401,
            "unauthorized",
            "Authorization has been denied: check the API user's email and password.",
            headers={"WWW-Authenticate": 'Basic realm="Dotdigital API"'},
        )
    token = config.integration_token
    if token is not None and not hmac.compare_digest(
        request.headers.get("x-ddg-integration-token", "").encode(), token.encode()
    ):
        return _error(401, "unauthorized", "A valid x-ddg-integration-token header is required.")
    # account-info is the region lookup itself, so it answers on every region's host.
    if request.path != "/v2/account-info":
        region_match = _REGION_IN_HOST.search(request.host)
        if region_match is not None and region_match.group(1).lower() != config.region.lower():
            return _error(
                403,
                "forbidden",
                f"This account lives in region {config.region}, not "
                f"{region_match.group(1)}: call https://{config.region}-api.dotdigital.com "
                "(wrong region?).",
            )
    return await handler(request)


def _authenticated(request: web.Request, config: SimulatorConfig) -> bool:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    login, colon, password = decoded.partition(":")
    user_ok = hmac.compare_digest(login.encode(), config.username.encode())
    password_ok = hmac.compare_digest(password.encode(), config.password.encode())
    return bool(colon) and user_ok and password_ok


def _too_large(state: SimulatorState, size: str) -> web.Response:
    state.stats.rejected_too_large += 1
    limit = state.config.max_body_bytes
    # aiohttp drains the unread rest of the body afterwards, so the client gets this answer.
    return _error(
        413,
        "requestEntityTooLarge",
        f"The request body is {size} bytes; at most {limit} bytes are accepted.",
    )


class _CollectorPause:
    """Pauses the cyclic garbage collector while bodies are parsed and analysed, in the
    simulator's own process only (``serve`` sets ``own_process``): a simulator running inside
    another program (its tests, say) leaves that program's collector alone.

    A body of 50 MB becomes hundreds of thousands of dicts and lists, and every few hundred of
    them the collector walks the young objects, and now and then every object the simulator
    keeps (the collections' records). What is parsed holds no cycles, so nothing is left for
    the collector to find. Nested pauses (several bodies in threads at once) count, and the
    collector is turned back on by the last one only if it was on before the first.

    Paused, the collector only walks the same objects later, so the last pause also moves
    every object alive into the collector's permanent generation (``gc.freeze()``): the parsed
    records are never walked, and the simulator's CPU per body halves (six 25 MB bodies parsed
    and kept: 3.5 s against 6.3 s). They are still freed as usual when nothing refers to them;
    only a cycle that became garbage during a parse (the HTTP server's, a few objects per
    request) stays in memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pauses = 0
        self._was_enabled = False
        self.own_process = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.own_process:
            yield
            return
        with self._lock:
            if self._pauses == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._pauses += 1
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                if self._pauses == 0 and self._was_enabled:
                    gc.freeze()
                    gc.enable()


_collector_paused = _CollectorPause()


def _parse(body: bytes | bytearray) -> tuple[str, str, str, list[dict[str, Any]]]:
    with _collector_paused():
        return _parse_body(body)


def _parse_body(body: bytes | bytearray) -> tuple[str, str, str, list[dict[str, Any]]]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError([("body", f"The body is not valid JSON: {exc}")]) from None
    return validate_body(parsed)


def _sha256(body: bytes | bytearray) -> str:
    return hashlib.sha256(body).hexdigest()


async def _put_import(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    limit = state.config.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        return _too_large(state, str(declared))
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return _too_large(state, f"more than {limit}")
    size = len(body)
    try:
        if size > _THREAD_BODY_BYTES:
            parsed = await asyncio.to_thread(_parse, body)
        else:
            parsed = _parse(body)
    except BodyError as exc:
        return _error(
            400, "insightData:badJson", "The request body is not valid.", details=exc.details
        )
    kept = bytes(body) if state.config.keep_bodies else None
    if size > _THREAD_BODY_BYTES:
        digest = await asyncio.to_thread(_sha256, body)
    else:
        digest = _sha256(body)
    del body
    name, scope, collection_type, records = parsed
    # No await from here to the accept, so the slot check and the slot taking are atomic.
    config, faults = state.config, state.faults
    if len(state.active) + faults.foreign_active_imports >= config.max_active_imports:
        state.stats.rejected_too_many_active += 1
        return _error(
            429,
            "insightData:tooManyActiveImports",
            f"The account already has {config.max_active_imports} active imports; "
            "wait for one to finish.",
        )
    stats = state.accept(
        name=name, scope=scope, collection_type=collection_type, records=records, body_bytes=size
    )
    stats.body_sha256 = digest
    if kept is not None:
        state.stats.bodies[stats.import_id] = kept
    response = _json(202, {"importId": stats.import_id})
    if faults.resets_after_accept > 0:
        faults.resets_after_accept -= 1
        stats.lost_response = True
        request[_LOST] = True
        # Writing the response to a closed transport fails quietly inside aiohttp: nothing is sent.
        if request.transport is not None:
            request.transport.close()
    return response


async def _get_import(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    import_id = _canonical_id(request.match_info["import_id"])
    if import_id is None:
        return _error(400, "insightData:invalidId", "The import id is not a valid GUID.")
    not_found = _error(404, "insightData:importNotFound", "No import has this id.")
    if state.faults.reject_status_calls > 0:
        state.faults.reject_status_calls -= 1
        return not_found
    body = state.status_body(import_id)
    if body is None:
        return not_found
    return web.Response(status=200, body=body, content_type="application/json")


async def _account_info(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    base_url = state.config.api_endpoint or state.base_url or f"{request.scheme}://{request.host}"
    return _json(
        200,
        {
            "id": _ACCOUNT_ID,
            "properties": [
                {"name": "Name", "type": "String", "value": "Simulated account"},
                {"name": "MainEmail", "type": "String", "value": state.config.username},
                {"name": "ApiEndpoint", "type": "String", "value": base_url},
            ],
        },
    )


async def _admin_stats(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    payload = state.stats.to_dict()
    payload["active"] = len(state.active)
    payload["foreign_active_imports"] = state.faults.foreign_active_imports
    return _json(200, payload)


async def _admin_collections(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    return _json(
        200,
        [
            {"collectionName": name, "count": len(records), **state.collection_info[name]}
            for name, records in state.collections.items()
        ],
    )


async def _admin_collection(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    name = request.match_info["name"]
    records = state.collections.get(name)
    if records is None:
        return _error(404, "notFound", f"No collection named {name!r} holds records.")
    return _json(
        200,
        {
            "collectionName": name,
            **state.collection_info[name],
            "count": len(records),
            "records": list(records.values()),
        },
    )


_FAULT_TYPES: dict[str, type[int] | type[float]] = {
    f.name: float if f.name.endswith("_s") else int for f in fields(Faults)
}


async def _admin_faults(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        try:
            changes = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "badJson", "Send a JSON object of fault fields.")
        problem = _fault_problem(changes)
        if problem is not None:
            return _error(400, "badJson", problem)
        for name, value in changes.items():
            setattr(state.faults, name, _FAULT_TYPES[name](value))
    return _json(200, asdict(state.faults))


def _fault_problem(changes: Any) -> str | None:
    if not isinstance(changes, dict):
        return "Send a JSON object of fault fields."
    for name, value in changes.items():
        kind = _FAULT_TYPES.get(name)
        if kind is None:
            return f"Unknown fault {name!r}; known: {', '.join(sorted(_FAULT_TYPES))}."
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or value < 0 or (kind is int and not float(value).is_integer()):
            what = "integer" if kind is int else "number"
            return f"Fault {name!r} must be a non-negative {what}, got {value!r}."
    return None


async def _admin_contacts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        payload = None
    contacts = payload.get("contacts", ...) if isinstance(payload, dict) else ...
    if contacts is None:
        state.set_contacts(None)
    elif isinstance(contacts, list) and all(isinstance(v, str) for v in contacts):
        state.set_contacts(contacts)
    else:
        return _error(
            400, "badJson", 'Send {"contacts": [values...]} or {"contacts": null} for the default.'
        )
    return _json(200, {"contacts": None if contacts is None else len(state.contacts or ())})


def make_app(state: SimulatorState) -> web.Application:
    """Build the aiohttp application serving the simulated API for one account.

    Args:
        state: the account the app serves; tests keep a reference to inspect and change it.
    """
    # Bodies are read by hand so the 413 is ours; aiohttp's own cap only guards the admin routes.
    app = web.Application(middlewares=[_middleware], client_max_size=16 * 1024 * 1024)
    app[STATE_KEY] = state
    app.router.add_put("/insightData/v3/import", _put_import)
    app.router.add_get("/insightData/v3/import/{import_id}", _get_import)
    app.router.add_get("/v2/account-info", _account_info)
    app.router.add_get("/_simulator/stats", _admin_stats)
    app.router.add_get("/_simulator/collections", _admin_collections)
    app.router.add_get("/_simulator/collections/{name}", _admin_collection)
    app.router.add_route("GET", "/_simulator/faults", _admin_faults)
    app.router.add_route("POST", "/_simulator/faults", _admin_faults)
    app.router.add_post("/_simulator/contacts", _admin_contacts)

    async def cleanup(app: web.Application) -> None:
        await state.aclose()

    app.on_cleanup.append(cleanup)
    return app


class Simulator:
    """The simulated API running on a local port: ``async with Simulator(config) as sim:``.

    Args:
        config: the account's behaviour; defaults to :class:`SimulatorConfig()`.
        faults: faults to inject; defaults to none.
        host: the interface to listen on.
        port: the port to listen on; 0 picks a free one (see :attr:`base_url`).
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.state = SimulatorState(config or SimulatorConfig(), faults or Faults())
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"Simulator(base_url={self.state.base_url!r}, config={self.config!r})"

    @property
    def config(self) -> SimulatorConfig:
        """The account's behaviour; change its fields to change the running server."""
        return self.state.config

    @config.setter
    def config(self, value: SimulatorConfig) -> None:
        self.state.config = value

    @property
    def faults(self) -> Faults:
        """The faults to inject; change its fields (or assign a new one) at any time."""
        return self.state.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.state.faults = value

    @property
    def collections(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """Stored records per collection: key -> record, or (identifier, value, key) -> record."""
        return self.state.collections

    @property
    def stats(self) -> SimulatorStats:
        """Counters and per-import records of everything answered so far."""
        return self.state.stats

    @property
    def base_url(self) -> str:
        """The root URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self.state.base_url is None:
            raise RuntimeError("The simulator is not running: use `async with Simulator(...)`.")
        return self.state.base_url

    def set_contacts(self, values: Iterable[str] | None) -> None:
        """Make exactly these contact values known, or restore the default rule with ``None``.

        Args:
            values: contact identity values that exist; ``None`` means every contact exists
                except values ending in ``.invalid``.
        """
        self.state.set_contacts(values)

    async def start(self) -> None:
        """Bind the port and start serving."""
        if self._runner is not None:
            raise RuntimeError("The simulator is already running.")
        runner = web.AppRunner(make_app(self.state), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        self.port = port
        self.state.base_url = f"http://{_url_host(self.host)}:{port}"

    async def close(self) -> None:
        """Stop serving and cancel the processing timers; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # the URL must name a reachable address
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve(
    config: SimulatorConfig | None = None,
    faults: Faults | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_started: Callable[[Simulator], object] | None = None,
) -> None:
    """Run the simulator until cancelled (the ``insight-import simulator`` command).

    Args:
        config: the account's behaviour; defaults to :class:`SimulatorConfig()`.
        faults: faults to inject from the start; more can be set with ``POST /_simulator/faults``.
        host: the interface to listen on.
        port: the port to listen on; 0 picks a free one.
        on_started: called with the running :class:`Simulator` once the port is bound.
    """
    _collector_paused.own_process = True  # this process is the simulator's own: see _CollectorPause
    try:
        async with Simulator(config, faults=faults, host=host, port=port) as sim:
            logger.info("simulator.started", base_url=sim.base_url)
            if on_started is not None:
                on_started(sim)
            try:
                await asyncio.Event().wait()
            finally:
                logger.info("simulator.stopped", imports=len(sim.stats.imports))
    finally:
        _collector_paused.own_process = False
