"""The aiohttp client of the Insight data bulk import API: calls, auth, regions, retries, errors.

One :class:`InsightClient` wraps one reused ``aiohttp.ClientSession``. Each call is retried with
tenacity on 5xx answers, dropped connections and timeouts, bounded by attempts *and* total time;
a 429 rate limit waits what the API asks (``Retry-After`` / ``x-ratelimit-reset``) inside the
same budget. The rate limit is the account's, and one client is one account: once any call is
rate limited, every call of the client waits for the advertised reset before it is sent (one that
cannot wait that long within its budget raises :class:`~orchestrator.errors.RateLimitedError`
without calling). Every other error status maps to one class of :mod:`orchestrator.errors` at once.
Nothing here logs or formats credentials, request bodies or record contents.

Testing: :meth:`RetryPolicy.immediate` retries without backoff but still waits what a 429 asks
(tests send a small ``Retry-After``); a wait beyond the call's time budget still raises
:class:`~orchestrator.errors.RateLimitedError` at once. The retries are the call's own: nothing
here switches a process-wide retry mode or instrumentation, and no retry logs a line of its own.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import anyio
import orjson
import tenacity
from aiohttp import payload as aiohttp_payload
from aiohttp.abc import AbstractStreamWriter

from orchestrator.errors import (
    AccountFullError,
    ApiError,
    AuthenticationError,
    BadRequestError,
    BodyTooLargeError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransientError,
    TransportError,
)
from orchestrator.logs import get_logger
from orchestrator.settings import Duration, seconds
from orchestrator.wire import ImportStatus, SubmitReceipt, _parse_status, parse_error_body

_E = TypeVar("_E", bound=ApiError)

__all__ = [
    "REGIONS",
    "ClientSettings",
    "InsightClient",
    "RetryPolicy",
    "is_loopback_url",
    "region_of",
    "same_api_root",
]

_log = get_logger("orchestrator.client")

#: The regional API hosts; an account lives in exactly one of them.
REGIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "r1": "https://r1-api.dotdigital.com",
        "r2": "https://r2-api.dotdigital.com",
        "r3": "https://r3-api.dotdigital.com",
    }
)

IMPORT_PATH: Final = "/insightData/v3/import"
ACCOUNT_INFO_PATH: Final = "/v2/account-info"
_USER_AGENT: Final = "insight-orchestrator"
# x-ratelimit-reset is seconds-until-reset in one source and an epoch in another.
_EPOCH_THRESHOLD: Final = 10**6
# An API description is short prose; cap what goes into a message anyway.
_MAX_DESCRIPTION_CHARS: Final = 300


def _url_host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def is_loopback_url(url: str) -> bool:
    """True when ``url`` names this machine (``localhost``, 127.0.0.0/8, ``::1``): a local
    simulator, where the API's published limits do not apply.

    Args:
        url: an API root such as ``http://127.0.0.1:8787``.
    """
    host = _url_host(url)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def region_of(url: str) -> str | None:
    """The region (``r1``...) whose API host ``url`` names, or ``None`` for any other host.

    Args:
        url: an API root such as ``https://r2-api.dotdigital.com``.
    """
    host = _url_host(url)
    for region, root in REGIONS.items():
        if host == _url_host(root):
            return region
    return None


def same_api_root(a: str, b: str) -> bool:
    """True when two API roots name the same server (scheme, host and port; loopback names
    count as one host).

    Args:
        a: an API root.
        b: another one.
    """

    def key(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = "loopback" if is_loopback_url(url) else (parts.hostname or "").lower()
        try:
            port = parts.port or {"http": 80, "https": 443}.get(scheme)
        except ValueError:
            port = None
        return scheme, host, port

    return key(a) == key(b)


def _connection_cause(exc: BaseException) -> tuple[str, bool]:
    """What went wrong on the way to the server, and whether the server was never reached."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "DNS lookup failed (no such host?)", True
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused", True
        return "cannot connect", True
    if isinstance(exc, TimeoutError):
        return "timeout", False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection", False
    return "connection", False


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How one API call is retried: capped, jittered, bounded by attempts and by total time.

    Keyword-only; every duration is a float of seconds or a :class:`datetime.timedelta`, held as
    float seconds.

    Args:
        attempts: tries per call, the first one included (>= 1).
        timeout: total seconds one call may take, waits included; a rate-limit wait that would
            end past it raises :class:`~orchestrator.errors.RateLimitedError` at once.
        wait_initial: seconds of backoff before the first retry.
        wait_max: the cap on one backoff, in seconds.
        wait_jitter: at most this many random seconds added to each backoff.
    """

    attempts: int = 8
    timeout: float = 600.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_jitter: float = 1.0

    if TYPE_CHECKING:  # the dataclass's own __init__ runs; this tells type checkers about timedelta

        def __init__(
            self,
            *,
            attempts: int = ...,
            timeout: Duration = ...,
            wait_initial: Duration = ...,
            wait_max: Duration = ...,
            wait_jitter: Duration = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"attempts must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(f"attempts must be >= 1 (1 = no retry), got {self.attempts}")
        object.__setattr__(self, "timeout", seconds("timeout", self.timeout, positive=True))
        for name in ("wait_initial", "wait_max", "wait_jitter"):
            object.__setattr__(self, name, seconds(name, getattr(self, name)))

    @classmethod
    def immediate(cls, *, attempts: int = 8, timeout: Duration = 30.0) -> RetryPolicy:
        """A policy that retries without any backoff, for tests and the simulator.

        Args:
            attempts: tries per call, the first one included.
            timeout: total seconds one call may take.
        """
        return cls(
            attempts=attempts, timeout=timeout, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """Where and as whom the client calls the API; the password never shows in a repr or message.

    Keyword-only; ``request_timeout`` and ``connect_timeout`` are a float of seconds or a
    :class:`datetime.timedelta`, held as float seconds.

    Args:
        username: the API user (``apiuser-…@apiconnector.com``).
        password: the API user's password.
        base_url: an explicit API root (e.g. a simulator's); when unset, ``region`` picks the host.
        region: ``r1`` (Europe), ``r2`` (North America) or ``r3`` (Asia Pacific).
        integration_token: sent as ``x-ddg-integration-token`` on every call when set.
        request_timeout: seconds one HTTP request may take, reading the answer included.
        connect_timeout: seconds to wait for a connection.
        retry: how each call is retried.
    """

    username: str
    password: str = field(repr=False)
    base_url: str | None = None
    region: str = "r1"
    integration_token: str | None = field(default=None, repr=False)
    request_timeout: float = 120.0
    connect_timeout: float = 15.0
    retry: RetryPolicy = RetryPolicy()

    if TYPE_CHECKING:  # the dataclass's own __init__ runs; this tells type checkers about timedelta

        def __init__(
            self,
            *,
            username: str,
            password: str,
            base_url: str | None = ...,
            region: str = ...,
            integration_token: str | None = ...,
            request_timeout: Duration = ...,
            connect_timeout: Duration = ...,
            retry: RetryPolicy = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not self.username:
            raise ConfigError("username is empty: set DOTDIGITAL_API_USER to the API user's name")
        if ":" in self.username:
            raise ConfigError("username must not contain ':' (HTTP Basic auth cannot carry it)")
        if not isinstance(self.password, str) or not self.password:
            raise ConfigError(
                "password is empty: set DOTDIGITAL_API_PASSWORD to the API user's password"
            )
        if self.region not in REGIONS:
            raise ConfigError(f"region must be one of {', '.join(REGIONS)}, got {self.region!r}")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"base_url must start with https:// (or http:// for a local simulator), "
                f"got {self.base_url!r}"
            )
        for name in ("request_timeout", "connect_timeout"):
            object.__setattr__(self, name, seconds(name, getattr(self, name), positive=True))
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {type(self.retry).__name__}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> ClientSettings:
        """Build settings from ``DOTDIGITAL_API_USER``, ``DOTDIGITAL_API_PASSWORD`` and
        ``DOTDIGITAL_INTEGRATION_TOKEN``; keyword overrides win over the environment.

        Args:
            environ: where to read the variables (``os.environ`` by default).
            overrides: any other field of :class:`ClientSettings` (or a credential to use
                instead of the environment's).
        """
        values: dict[str, Any] = {}
        for name, var in (
            ("username", "DOTDIGITAL_API_USER"),
            ("password", "DOTDIGITAL_API_PASSWORD"),
        ):
            if name in overrides:
                continue
            value = environ.get(var, "")
            if not value:
                raise ConfigError(
                    f"{var} is not set: export the API user's credentials as "
                    "DOTDIGITAL_API_USER and DOTDIGITAL_API_PASSWORD"
                )
            values[name] = value
        if "integration_token" not in overrides:
            values["integration_token"] = environ.get("DOTDIGITAL_INTEGRATION_TOKEN") or None
        values.update(overrides)
        try:
            return cls(**values)
        except TypeError as exc:
            unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
            raise ConfigError(f"unknown client setting(s): {', '.join(unknown)}") from exc

    @property
    def api_root(self) -> str:
        """The API root every path is appended to, without a trailing slash."""
        if self.base_url is not None:
            return self.base_url.rstrip("/")
        return REGIONS[self.region]


def _rate_limit_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds the API asks to wait, from ``Retry-After`` else ``x-ratelimit-reset``."""
    retry_after = headers.get("Retry-After")
    if retry_after is not None:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    reset = headers.get("X-RateLimit-Reset")
    if reset is not None:
        try:
            value = float(reset)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        if value >= _EPOCH_THRESHOLD:
            return max(0.0, value - time.time())
        return max(0.0, value)
    return None


def _has_rate_limit_headers(headers: Mapping[str, str]) -> bool:
    return "Retry-After" in headers or any(
        name.lower().startswith("x-ratelimit-") for name in headers
    )


_WRITE_CHUNK: Final = 1 << 20


class _JsonBody(aiohttp_payload.BytesPayload):
    """The request body as the caller's bytes object, never copied.

    ``BytesPayload`` warns (``ResourceWarning``) for bodies over 1 MB, but bulk import bodies are
    up to 50 MB by design. They are written in 1 MB slices of one memoryview, each awaiting the
    transport's drain: handed over whole, asyncio (before 3.12) copies what the socket did not
    take at once into its buffer, doubling a 50 MB body in memory for the whole upload.
    """

    def __init__(
        self, value: bytes | bytearray, on_sent: Callable[[], object] | None = None
    ) -> None:
        aiohttp_payload.Payload.__init__(self, value, content_type="application/json")
        self._size = len(value)
        self._on_sent = on_sent

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for start in range(0, len(view), _WRITE_CHUNK):
            await writer.write(view[start : start + _WRITE_CHUNK])
        if self._on_sent is not None:
            self._on_sent()


@dataclass(slots=True)
class _CallState:
    attempts: int = 0
    hidden_sends: int = 0
    lost_responses: int = 0
    last_reason: str = ""
    rate_limit_wait: float | None = None
    # the last failure never reached the server (DNS, refused, TLS)
    unreachable: bool = False
    on_sent: Callable[[], object] | None = None  # told when a PUT's body is written in full


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    data: object


class InsightClient:
    """An async client of the Insight data bulk import API.

    Use it as ``async with InsightClient(settings) as client:``; it opens one
    ``aiohttp.ClientSession`` (unless given one, which it then leaves open) and reuses it for
    every call. ``calls`` counts HTTP requests made, retries included; ``lost_responses`` counts
    PUT answers lost after the body was sent, over the client's life.

    Args:
        settings: where and as whom to call the API, and how to retry.
        session: an existing session to use instead of opening one.
        trace_configs: aiohttp trace configs for the session the client opens (e.g. metrics).
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self.settings = settings
        self._trace_configs = list(trace_configs)  # for the session it opens (metrics)
        self.calls = 0
        self.lost_responses = 0
        # time.monotonic() until which the account is rate limited, as the API last advertised.
        self._rate_limited_until = -math.inf
        self._session = session
        self._owns_session = session is None
        credentials = f"{settings.username}:{settings.password}".encode()
        headers = {
            "Accept": "application/json",
            "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii"),
            "User-Agent": _USER_AGENT,
        }
        if settings.integration_token:
            headers["x-ddg-integration-token"] = settings.integration_token
        self._headers: Mapping[str, str] = MappingProxyType(headers)
        self._host = urlsplit(settings.api_root).netloc or settings.api_root

    def __repr__(self) -> str:
        return f"InsightClient(api_root={self.settings.api_root!r}, calls={self.calls})"

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client opened it; calling it twice is harmless."""
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise ConfigError("the aiohttp session given to InsightClient is closed")
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.request_timeout, connect=self.settings.connect_timeout
                ),
                raise_for_status=False,
                trace_configs=self._trace_configs or None,
            )
            # aiohttp silently re-sends an idempotent request (PUT included) once when the
            # connection drops; that hidden re-send may start a stray import we could not count,
            # so our own retry policy is the only one on sessions we own.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    async def submit_import(
        self, body: bytes | bytearray, *, on_sent: Callable[[], object] | None = None
    ) -> SubmitReceipt:
        """Start a bulk import: ``PUT /insightData/v3/import`` with ``body`` sent as given.

        A PUT whose answer was lost after the body went out is sent again (records are
        upserted by key, so that is safe) and counted in the receipt's ``lost_responses``.

        Args:
            body: the complete JSON request body, already encoded; it is never copied.
            on_sent: called each time a PUT has written the whole body, before its answer
                (the API answers once it has checked the body): e.g. to start the next upload.

        Raises:
            AccountFullError: all import slots of the account are taken (not retried here).
            BadRequestError: the API refused the body as a whole.
            BodyTooLargeError: the body is over the API's size limit.
            RateLimitedError: rate limited beyond the retry budget.
            ServerError: 5xx answers outlived the retry budget (a TransientError).
            TransportError: no answer (resets, timeouts) within the retry budget.
        """
        answer, state = await self._call("PUT", IMPORT_PATH, body=body, on_sent=on_sent)
        data = answer.data
        import_id = data.get("importId") if isinstance(data, dict) else None
        if not isinstance(import_id, str) or not import_id:
            raise ApiError(
                f"the import submit answered {answer.status} without an importId; "
                "check the base URL points at the Insight data API",
                status=answer.status,
            )
        return SubmitReceipt(
            import_id=import_id,
            attempts=state.attempts + state.hidden_sends,
            lost_responses=state.lost_responses,
        )

    async def import_status(self, import_id: str, *, retry: bool = True) -> ImportStatus:
        """Read an import's status: ``GET /insightData/v3/import/{import_id}``.

        Args:
            import_id: the id from :meth:`submit_import`.
            retry: retry 5xx answers, resets and timeouts here. A poller that keeps its own
                rhythm (the engine: polls between poll_min and poll_max apart) passes ``False``
                and simply polls again.

        Raises:
            NotFoundError: the id is unknown or no longer kept.
            BadRequestError: the id is malformed.
        """
        path = f"{IMPORT_PATH}/{quote(import_id, safe='')}"
        answer, _ = await self._call("GET", path, attempts=None if retry else 1)
        return _parse_status(import_id, answer.data)

    async def account_api_endpoint(self) -> str:
        """The account's own API root: the ``ApiEndpoint`` property of ``GET /v2/account-info``.

        Call it on any region's host to learn which region the account lives in.
        """
        return await self._account_endpoint(first_contact=False)

    async def check_access(self) -> str:
        """Check the host and the credentials with one cheap call; return the account's API root.

        One ``GET /v2/account-info`` (any region's host answers it): call it before any work, so
        a wrong password or host is found in a second rather than after reading the input. A host
        that cannot be reached (DNS, connection refused, TLS) fails at once instead of using the
        retry budget, which is for an API that was up; a 5xx or a timeout is retried, and a rate
        limit waited out, as for any call.
        Compare the answer with :func:`same_api_root`: another root means the account lives in
        another region (:func:`region_of` names it), where imports answer 403.

        Raises:
            AuthenticationError: the API user or password was refused.
            TransientError: the host cannot be reached, or is unwell.
        """
        return await self._account_endpoint(first_contact=True)

    async def _account_endpoint(self, *, first_contact: bool) -> str:
        answer, _ = await self._call("GET", ACCOUNT_INFO_PATH, first_contact=first_contact)
        data = answer.data
        properties = data.get("properties") if isinstance(data, dict) else None
        if isinstance(properties, list):
            for prop in properties:
                if isinstance(prop, dict) and prop.get("name") == "ApiEndpoint":
                    value = prop.get("value")
                    if isinstance(value, str) and value:
                        return value.rstrip("/")
        raise ApiError(
            "the account-info answer has no ApiEndpoint property; "
            "check the base URL points at the Dotdigital API",
            status=answer.status,
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | bytearray | None = None,
        attempts: int | None = None,
        first_contact: bool = False,
        on_sent: Callable[[], object] | None = None,
    ) -> tuple[_Answer, _CallState]:
        policy = self.settings.retry
        state = _CallState(on_sent=on_sent)
        clock = time.monotonic
        deadline = clock() + policy.timeout

        def backoff(exc: Exception) -> bool | float:
            if isinstance(exc, RateLimitedError):
                wait = state.rate_limit_wait
                if wait is None:
                    return True
                # Sleeping past the budget only to fail is worse than telling the caller now.
                return wait if wait <= deadline - clock() else False
            if first_contact and state.unreachable:
                return False  # the host was never reached: retrying will not make it exist
            return isinstance(exc, TransientError)

        asked_wait: float | None = None  # the wait backoff() chose for the next try, if any

        def retry_wanted(exc: BaseException) -> bool:
            nonlocal asked_wait
            decision = backoff(exc) if isinstance(exc, Exception) else False
            asked_wait = None if isinstance(decision, bool) else decision
            return decision is not False

        def wait(retry_state: tenacity.RetryCallState) -> float:
            if asked_wait is not None:
                return asked_wait
            return _jittered_backoff(policy, retry_state.attempt_number)

        # Tenacity rather than a retry library with process-wide hooks: each call owns its
        # policy, and there is no instrumentation to print lines nobody configured.
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(retry_wanted),
            stop=tenacity.stop_after_attempt(attempts if attempts is not None else policy.attempts)
            | tenacity.stop_after_delay(policy.timeout),
            wait=wait,
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # Each failed attempt was logged once, as api.call_failed (or
                    # api.rate_limited), with its reason: a retry adds no line of its own.
                    state.attempts = attempt.retry_state.attempt_number
                    await self._wait_out_rate_limit(state, deadline - clock())
                    remaining = max(deadline - clock(), 0.001)
                    return await self._once(method, path, body, state, remaining), state
        except ServerError as exc:
            raise _counted(
                ServerError(
                    _exhausted(method, self._host + path, state, policy, exc),
                    status=exc.status,
                    error_code=exc.error_code,
                    description=exc.description,
                    details=exc.details,
                ),
                state,
            ) from exc
        except TransportError as exc:
            if first_contact and state.unreachable:
                raise TransportError(
                    f"cannot reach the API at {self._host}: {state.last_reason}; check the base "
                    "URL or region, and the network"
                ) from exc
            raise TransportError(_exhausted(method, self._host + path, state, policy, exc)) from exc
        except RateLimitedError as exc:
            raise _counted(
                RateLimitedError(
                    f"{method} {path} is rate limited (after {state.attempts} attempt(s)); "
                    f"the API asks to wait {exc.retry_after:g} s, beyond the call's budget of "
                    f"{policy.timeout:g} s: lower the call rate or wait, then retry",
                    retry_after=exc.retry_after,
                    status=exc.status,
                    error_code=exc.error_code,
                    description=exc.description,
                    details=exc.details,
                ),
                state,
            ) from exc
        except ApiError as exc:  # not retried: the caller decides (account full, 4xx)
            raise _counted(exc, state) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _wait_out_rate_limit(self, state: _CallState, budget: float) -> None:
        """Hold the call until the account's rate-limit window (from any call's 429) ends."""
        wait = self._rate_limited_until - time.monotonic()
        if wait <= 0:
            return
        if wait > budget:
            state.rate_limit_wait = wait  # past the budget: the retry policy gives up at once
            raise RateLimitedError(
                f"the account is rate limited for {wait:.3g} s more", retry_after=wait, status=429
            )
        await anyio.sleep(wait)

    async def _once(
        self,
        method: str,
        path: str,
        body: bytes | bytearray | None,
        state: _CallState,
        remaining: float,
    ) -> _Answer:
        state.unreachable = False
        session = self._ensure_session()
        timeout = aiohttp.ClientTimeout(
            total=min(self.settings.request_timeout, remaining),
            connect=self.settings.connect_timeout,
        )
        # The tracker tells whether the body was fully sent, and how many times aiohttp itself
        # sent the request (a session not opened by us may re-send once on a dropped connection).
        tracker = aiohttp.UploadTracker()
        try:
            async with session.request(
                method,
                self.settings.api_root + path,
                data=_JsonBody(body, state.on_sent) if body is not None else None,
                headers=self._headers,
                timeout=timeout,
                allow_redirects=False,
                upload_tracker=tracker,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            cause, state.unreachable = _connection_cause(exc)
            reason = f"{cause} ({type(exc).__name__})"
            self._count_sends(tracker, state, body)
            if body is not None and _fully_sent(tracker):
                state.lost_responses += 1
                self.lost_responses += 1
                reason = f"lost response: {reason} after the body was sent"
            state.last_reason = reason
            _log.warning(
                "api.call_failed",
                method=method,
                path=path,
                status=0,
                error_code=None,
                attempt=state.attempts,
                reason=reason,
            )
            raise TransportError(f"{method} {self._host}{path}: {reason}") from exc
        self._count_sends(tracker, state, body)
        if 200 <= status < 300:
            try:
                return _Answer(status, orjson.loads(raw) if raw else None)
            except orjson.JSONDecodeError:
                raise ApiError(
                    f"{method} {path} answered {status} with a body that is not JSON; "
                    "check the base URL points at the Dotdigital API",
                    status=status,
                ) from None
        error = self._error_for(method, path, status, headers, raw, state, put=body is not None)
        if not isinstance(error, RateLimitedError):  # api.rate_limited has said it
            _log.warning(
                "api.call_failed",
                method=method,
                path=path,
                status=status,
                error_code=error.error_code,
                attempt=state.attempts,
            )
        raise error

    def _count_sends(
        self, tracker: aiohttp.UploadTracker, state: _CallState, body: bytes | bytearray | None
    ) -> None:
        sends = max(tracker.attempts, 1)
        self.calls += sends
        if sends > 1:
            # Hidden re-sends follow a dropped connection whose fate is unknown: count each as
            # a possibly lost response, the safe side for slot accounting.
            state.hidden_sends += sends - 1
            if body is not None:
                state.lost_responses += sends - 1
                self.lost_responses += sends - 1

    def _error_for(
        self,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        state: _CallState,
        *,
        put: bool,
    ) -> ApiError:
        code, description, details = parse_error_body(raw)
        fields: dict[str, Any] = {
            "status": status,
            "error_code": code,
            "description": description,
            "details": details,
        }
        said = f"{status}" + (f" {code}" if code else "")
        if description:
            said += f": {description[:_MAX_DESCRIPTION_CHARS].rstrip('. ')}"
        what = f"{method} {path} answered {said}"
        if status == 429:
            full = code is not None and "toomanyactiveimports" in code.lower()
            if full or (put and not _has_rate_limit_headers(headers)):
                return AccountFullError(
                    f"{what}; every import slot of the account is taken (by this run, a lost "
                    "submit or another integration): wait for an import to finish, then submit "
                    "again",
                    **fields,
                )
            wait = _rate_limit_wait(headers)
            state.rate_limit_wait = wait
            if wait is not None:
                self._rate_limited_until = max(self._rate_limited_until, time.monotonic() + wait)
            state.last_reason = "rate limited"
            _log.warning(
                "api.rate_limited",
                method=method,
                path=path,
                wait_s=wait,
                scope=headers.get("X-RateLimit-Scope"),
                limit=headers.get("X-RateLimit-Limit"),
            )
            retry_after = wait if wait is not None else self.settings.retry.wait_max
            return RateLimitedError(
                f"{what}; rate limited: wait {retry_after:g} s", retry_after=retry_after, **fields
            )
        if status >= 500:
            state.last_reason = f"server error {status}"
            return ServerError(what, **fields)
        if status == 401:
            return AuthenticationError(
                f"{what}; the API user or password was refused: check DOTDIGITAL_API_USER and "
                "DOTDIGITAL_API_PASSWORD (and DOTDIGITAL_INTEGRATION_TOKEN if set)",
                **fields,
            )
        if status == 403:
            return ForbiddenError(
                f"{what}; access denied by {self.settings.api_root}: wrong region? the account "
                "may live on another regional host: check the region / base_url settings (the "
                "ApiEndpoint of /v2/account-info names the right one)",
                **fields,
            )
        if status == 404:
            return NotFoundError(
                f"{what}; not found: the import id is unknown or no longer kept", **fields
            )
        if status == 400:
            return BadRequestError(
                f"{what}; the request was refused as a whole: see the error's details", **fields
            )
        if status == 413:
            return BodyTooLargeError(
                f"{what}; the body is over the API's size limit: split the batch and send the "
                "parts",
                **fields,
            )
        return ApiError(f"{what}; unexpected answer", **fields)


def _jittered_backoff(policy: RetryPolicy, retry_number: int) -> float:
    """The wait before retry ``retry_number`` (1-based): doubling, jittered, capped."""
    jitter = random.uniform(0.0, policy.wait_jitter) if policy.wait_jitter else 0.0
    try:
        return min(policy.wait_max, policy.wait_initial * 2.0 ** (retry_number - 1) + jitter)
    except OverflowError:
        return policy.wait_max


def _exhausted(
    method: str, path: str, state: _CallState, policy: RetryPolicy, last: Exception
) -> str:
    return (
        f"{method} {path} failed {state.attempts} time(s) within {policy.timeout:g} s, "
        f"last: {last}; the API or the network is unwell: try again later"
    )


def _counted(error: _E, state: _CallState) -> _E:
    """``error`` with the requests its call sent (retries included), as the API saw them."""
    error.calls = state.attempts + state.hidden_sends
    return error


def _fully_sent(tracker: aiohttp.UploadTracker) -> bool:
    done = tracker.upload_complete
    return done.done() and not done.cancelled() and done.exception() is None
