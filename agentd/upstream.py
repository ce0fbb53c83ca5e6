"""OpenBao/Vault HTTP client: the API calls, failover and error mapping (``transport.py`` below it).

Theory of operation: ``Upstream.request()`` sends one API call (``path`` without ``/v1/``) through
a ``transport.Transport`` (h11 on trio, keep-alive connections per address). Each request tries
the configured addresses in its own stable order: rendezvous (highest random weight) hashing of
the host id (``order_seed``) and the request's path (``spread_addresses``), so a fleet's reads
spread evenly over every node, secret by secret rather than host by host, and each secret of a
host keeps going to the same node. Addresses marked down come last in every order. A
connection-level failure (connect error, timeout, reset, protocol error), a 5xx (which includes
a sealed node's 503), a standby code (472, 473) or a redirect marks the address down and fails
the *same* request over to the next address, each address at most once per request. Anything
else is the answer (4xx are never failed over) and marks its address up. Every attempt holds one
slot of a ``trio.CapacityLimiter(max_concurrency)``, so a host never has more requests in flight
than that.

Health (``run()``, a service the daemon starts): an address marked down is probed with
``GET sys/health?standbyok=true&perfstandbyok=true`` (unauthenticated; 200 from an active node
or a standby, 5xx when sealed), each address on its own full-jitter backoff (``backoff_min`` ..
``backoff_max``), and not while every address is down or the outage gate is closed (then the
requests themselves find out; an answer after every address was down clears every mark). A
200 marks it up, and the requests whose order puts it first return to it: after a failover, the
fleet's spread comes back by itself. Without ``run()`` a down address comes back only when a
request that reached it last gets an answer.

Failures are translated here, once, into agentd's tree (``_transport_error`` and
``_status_error``): transport errors, 5xx, 429 (with its Retry-After), 472/473 -> TransientError;
401/403 -> AuthError; 404 in OpenBao's own JSON -> UpstreamNotFound (any other 404: transient,
failover); other 4xx and malformed replies -> PermanentError.
Messages carry method, path, status and the upstream's own ``errors`` strings (capped), never a
request body, a header, a token or secret data.

Outage gate (``outage_gate=True``, what the daemon uses; decision 9): once every address has
failed (connection failures, timeouts, 5xx, sealed, standby: the mark that leaves no address up,
whichever requests' attempts failed), the host stops sending for a full-jitter backoff window
(``backoff_min`` .. ``backoff_max``, growing with each failed probe); requests in the window
fail at once with a TransientError whose ``retry_after`` is the time left, and when it ends a
single request goes out as the probe (others keep failing fast meanwhile). A
request that entered before the gate closed is stopped as well when it would next send (it
waited for a slot, or would fail over from an address that held it): on a hung cluster nothing
more goes in than the attempts already on their way. A probe that gets any answer from a node
opens the gate; a failed one lengthens the window. So however many secrets a host has, an
outage costs the upstream about one request per window from it, not one per secret.

Recovery ramp (decision 9): a failure streak starts at the first failed attempt and ends at the
next answer; one that lasted at least ``backoff_min``, or closed the outage gate, ends in a
*recovery*
(``statistics().recoveries``). Requests that were held over it (they entered before the recovery
and had not yet sent their attempt: queued for a slot, or failing over from a hung address)
would all go out the moment the upstream answers again. A caller that says how far such a
request may be spread (``spread_recovery``: the refresher, per secret) has it wait a random
phase within that window first, from the moment it would have gone (at or after the recovery),
without holding a slot; the ``Hold`` it gets
back says whether it was held. Requests without a window (logins, renewals, admin refreshes)
and those entered after the recovery are never held. ``recovered`` (a cell of the last
recovery's time) lets callers sleeping in their own backoff wake up for it.

The client ignores the environment: a host's ``HTTP_PROXY`` must never see the ``X-Vault-Token``
header, so there is no proxy support at all. ``aclose()`` closes the connection pool.
"""

from __future__ import annotations

import contextvars
import email.utils
import hashlib
import json as jsonlib
import logging
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from agentd import fsafe, jsonnum
from agentd.backoff import Backoff
from agentd.cell import Cell
from agentd.config import UpstreamConfig
from agentd.errors import (
    AuthError,
    PermanentError,
    TransientError,
    UnsafePath,
    UpstreamError,
    UpstreamNotFound,
)
from agentd.readmodel import COUNTER, metric
from agentd.transport import ReplyTooLarge, Response, Transport, TransportError

log = logging.getLogger("agentd.upstream")

MAX_ERROR_TEXT = 300          # characters of the upstream's "errors" kept in a message
HEALTH_PATH = "sys/health?standbyok=true&perfstandbyok=true"   # 200: active or standby
MAX_ORDERS = 4096             # per-path address orders kept (the catalog's paths, and a few)
STANDBY_STATUSES = frozenset({472, 473})
_NOT_JSON: Any = object()      # marker: the body was not JSON


@dataclass(frozen=True)
class SecretValue:
    """One value read from the upstream. ``repr()`` never shows ``data``."""

    data: Mapping[str, Any] = field(repr=False)
    version: int | None                # KV v2 version; None when the upstream has none (kv1)
    expires_at: float | None = None    # unix time when the value itself expires (leases)
    lease_id: str | None = None
    lease_duration: float | None = None
    renewable: bool = False


@dataclass(frozen=True)
class UpstreamStatistics:
    """The upstream client's counters; each ``metric`` field is a series (``readmodel``); the
    labelled ones (up by address, errors by kind) and the latency are made in ``metrics``."""

    address: str                 # the first address up in this host's own order
    up: bool                     # the last attempt reached a working server
    requests: int = metric("Requests sent to the upstream", COUNTER,
                           name="agentd_upstream_requests")
    errors: int = 0              # calls that raised (by kind: errors_by_kind)
    last_error: str | None = None
    latency_ms_last: float | None = None
    in_flight: int = metric("Upstream requests in flight", name="agentd_upstream_in_flight",
                            default=0)
    in_flight_peak: int = metric("The most upstream requests in flight at once (at most "
                                 "max_concurrency)", name="agentd_upstream_in_flight_peak",
                                 default=0)
    gated: int = metric("Requests (or failovers) the outage gate stopped before sending", COUNTER,
                        name="agentd_upstream_gated", default=0)
    down: tuple[str, ...] = ()   # addresses marked down (tried last; probed by run())
    recoveries: int = metric("Failure streaks (of at least backoff_min) that ended in an answer",
                             COUNTER, name="agentd_upstream_recoveries", default=0)
    held: int = metric("Requests held over an outage that waited a random phase after the "
                       "recovery", COUNTER, name="agentd_upstream_recovery_held", default=0)
    health_probes: int = metric("sys/health probes sent to addresses marked down", COUNTER,
                                name="agentd_upstream_health_probes", default=0)
    errors_by_kind: Mapping[str, int] = field(default_factory=dict)   # see _error_kind


def _error_kind(exc: UpstreamError) -> str:
    """transient | auth | not_found | permanent: the label of the upstream error metric."""
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, UpstreamNotFound):
        return "not_found"
    return "permanent"


class _Failover(TransientError):
    """A TransientError after which the same request may go to the next address."""


def spread_addresses(addresses: tuple[str, ...], seed: str | None,
                     key: str = "") -> tuple[str, ...]:
    """``addresses`` in the order of rendezvous hashing on ``seed`` (the host id) and ``key``
    (a request's path; decision 9): each address's weight is a hash of the three, highest
    first. So a fleet spreads evenly over the nodes, fails over to different nodes, and adding or
    removing a node moves only the keys that had it first. None keeps the configured order."""
    if seed is None or len(addresses) < 2:
        return addresses

    def weight(address: str) -> bytes:
        return hashlib.sha256(f"agentd-addresses\0{seed}\0{key}\0{address}".encode()).digest()

    return tuple(sorted(addresses, key=weight, reverse=True))


@dataclass
class Hold:
    """How far a caller lets its request be spread after a recovery (``spread_recovery``)."""

    spread: float                # seconds; 0: never held (urgent)
    rng: random.Random = field(repr=False)
    held: bool = False           # the request waited a phase after a recovery
    # the answer came after a failover: its time is the fleet's (a node's timeout), not the
    # caller's, so the caller's next step takes a new phase (decision 9)
    failed_over: bool = False


_HOLD: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("agentd_hold", default=None)


@contextmanager
def spread_recovery(spread: float, rng: random.Random) -> Iterator[Hold]:
    """Within this block, a request of this task that is held over an outage waits a random
    phase in ``[0, spread)`` after the recovery before it is sent (the recovery ramp above)."""
    hold = Hold(spread=max(0.0, spread), rng=rng)
    token = _HOLD.set(hold)
    try:
        yield hold
    finally:
        _HOLD.reset(token)


@dataclass
class _Down:
    """An address marked down: when its next health probe is due, on its own backoff."""

    backoff: Backoff
    next_probe: float            # trio clock
    probing: bool = False


def _no_token() -> str | None:
    return None


def _errors_text(body: Any) -> str:
    """The upstream's ``errors`` strings, joined and capped (they never hold secrets)."""
    if not isinstance(body, dict):
        return ""
    errors = body.get("errors")
    if not isinstance(errors, list):
        return ""
    text = "; ".join(str(e) for e in errors if e)
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return text


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _decode_body(response: Response) -> Any:
    """The JSON body, {} when empty; raises ValueError when it is not JSON (or nested more
    than ``jsonnum.MAX_DEPTH`` deep). A number keeps
    its text where Python's value would lose it (``1e-7``: decision 14, ``jsonnum``)."""
    if response.status_code == 204 or not response.content:
        return {}
    return jsonnum.loads(response.content)


def _transport_error(exc: TransportError, method: str, path: str, address: str) -> _Failover:
    """Translate a transport failure (the request may not have reached the upstream)."""
    return _Failover(f"{method} {path}: {address}: {exc}")


def _openbao_answer(body: Any) -> bool:
    """Whether a reply body is OpenBao's own: a JSON object with its ``errors`` list, or with
    ``data`` (a KV v2 read of a deleted version answers 404 with the version's metadata).

    A 404 is evidence that a secret is gone (decision 5) only when OpenBao says so: the same
    status from a proxy, a load balancer or a misrouted URL in front of it (an HTML page, an
    empty body) says nothing about the secret, and is a transient error that fails over.
    """
    return isinstance(body, dict) and (isinstance(body.get("errors"), list) or "data" in body)


def _status_error(method: str, path: str, response: Response, body: Any) -> UpstreamError:
    """Translate an HTTP error status into agentd's tree."""
    status = response.status_code
    detail = _errors_text(body)
    message = f"{method} {path}: HTTP {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return AuthError(message, status=status)
    if status == 404 and not _openbao_answer(body):
        return _Failover(f"{message} (not OpenBao's answer: a proxy in front of it?)",
                         status=status)
    if status == 404:
        return UpstreamNotFound(message, status=status)
    if status == 429:
        return TransientError(
            message, status=status, retry_after=_retry_after(response.headers.get("retry-after"))
        )
    if status >= 500 or status in STANDBY_STATUSES or 300 <= status < 400:
        return _Failover(
            message, status=status, retry_after=_retry_after(response.headers.get("retry-after"))
        )
    return PermanentError(message, status=status)


def _plain(exc: UpstreamError) -> UpstreamError:
    """Callers see TransientError, never the private _Failover marker class."""
    if isinstance(exc, _Failover):
        plain = TransientError(str(exc), status=exc.status, retry_after=exc.retry_after)
        plain.__cause__ = exc.__cause__
        return plain
    return exc


def tls_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """Verifying TLS (system CAs, or only ``ca_file``), TLS 1.2 at least; with ``cert`` auth the
    client certificate too. There is deliberately no way to turn verification off.

    Raises:
        PermanentError: a CA, certificate or key file cannot be loaded.
    """
    try:
        # Read through fsafe: whoever could swap the CA file could make agentd trust their own
        # server, and hand it the agent's token.
        cadata = fsafe.read_text(cfg.ca_file) if cfg.ca_file is not None else None
        context = ssl.create_default_context(cadata=cadata)
    except UnsafePath as exc:
        raise PermanentError(f"cannot load upstream ca_file {exc}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"cannot load upstream ca_file {cfg.ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_client_cert(context, cfg)
    return context


def load_client_cert(context: ssl.SSLContext, cfg: UpstreamConfig) -> None:
    """(Re)load the ``cert`` auth method's client certificate and key into ``context``; new
    connections present it (a renewed certificate is picked up at the next login)."""
    auth = cfg.auth
    if auth.method != "cert" or auth.cert_file is None or auth.key_file is None:
        return
    try:
        # Both checked (and the key as a credential) before ssl reads them by path: every
        # directory above them is one only root or the agent can change, so they cannot be
        # swapped between the check and the load.
        fsafe.read_file(auth.cert_file, follow=True)
        fsafe.read_file(auth.key_file, secret=True, follow=True)
        context.load_cert_chain(str(auth.cert_file), str(auth.key_file))
    except UnsafePath as exc:
        raise PermanentError(f"cannot load the client certificate or key: {exc}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(
            f"cannot load the client certificate {auth.cert_file} / key {auth.key_file}: "
            f"{type(exc).__name__}"
        ) from None


class Upstream:
    """A client for one OpenBao/Vault cluster (one or more addresses).

    Lifetime: create it, use it from any trio task, ``await aclose()`` at the end. ``token_source``
    is how authentication plugs in: the Authenticator sets it; by default it returns None (no
    token header).

    Raises (from every request): TransientError, AuthError, PermanentError, UpstreamNotFound.
    """

    def __init__(
        self, cfg: UpstreamConfig, *, order_seed: str | None = None, outage_gate: bool = False
    ) -> None:
        if not cfg.addresses:
            raise ValueError("upstream needs at least one address")
        self._cfg = cfg
        self._seed = order_seed
        self._addresses = tuple(a.rstrip("/") for a in cfg.addresses)
        self._host_order = spread_addresses(self._addresses, order_seed)
        self._orders: dict[str, tuple[str, ...]] = {}
        self._down: dict[str, _Down] = {}
        self._health_rng = random.Random(f"agentd-health:{order_seed}")
        self._health_wake = trio.Event()
        self._health_probes = 0
        self._streak_since: float | None = None   # trio clock: first failure with no answer since
        # trio time of the last recovery; its generation counts them (see the recovery ramp)
        self.recovered: Cell[float] = Cell(-math.inf)
        self._held = 0
        self.token_source: Callable[[], str | None] = _no_token
        self._gate: Backoff | None = None
        if outage_gate:
            self._gate = Backoff(cfg.backoff_min, cfg.backoff_max,
                                 rng=random.Random(f"agentd-gate:{order_seed}"))
        self._gate_until = -math.inf     # trio clock; the gate is open before this
        self._probing = False
        self._gated = 0
        headers = [("X-Vault-Request", "true")]
        if cfg.namespace:
            headers.append(("X-Vault-Namespace", cfg.namespace))
        self._transport = Transport(
            ssl_context=tls_context(cfg), timeout=cfg.timeout, server_name=cfg.tls_server_name,
            max_idle=cfg.max_concurrency, headers=headers,
        )
        self._limiter = trio.CapacityLimiter(cfg.max_concurrency)
        self._up = True
        self._requests = 0
        self._errors = 0
        self._errors_by_kind: Counter[str] = Counter()
        self._last_error: str | None = None
        self._latency_ms: float | None = None
        self._in_flight = 0
        self._in_flight_peak = 0

    # --- public API -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        token: str | None = None,
        authenticated: bool = True,
        check: Callable[[int, Any], None] | None = None,
    ) -> dict[str, Any]:
        """Call ``/v1/<path>`` and return the decoded JSON object ({} for 204 or an empty body).

        ``token`` overrides ``token_source()``; ``authenticated=False`` sends no token at all.
        ``check(status, body)`` sees the final reply of any status before it is mapped (``body``
        is not a dict when the reply was no JSON object) and may raise an UpstreamError, which
        counts as this call's error: a kind's reply format (``kinds.kv``).
        """
        self._requests += 1
        entered = trio.current_time()
        try:
            response, body = await self._exchange(method, path, json, token, authenticated,
                                                  entered)
            if check is not None:
                check(response.status_code, body)
            return self._result(method, path, response, body)
        except UpstreamError as exc:
            self._count_error(exc)
            raise _plain(exc) from exc.__cause__

    async def renew_client_identity(self) -> None:
        """Re-read the cert auth method's certificate and key for new connections, so the next
        request (the cert login) presents them: a pooled connection would present the
        certificate of its own handshake, so idle ones are closed.

        Raises:
            PermanentError: the certificate or key cannot be loaded.
        """
        self._transport.set_ssl_context(tls_context(self._cfg))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._transport.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe the addresses marked down until cancelled (see "Health" above); a probe that
        gets a 200 marks its address up. Never raises for an upstream failure."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._health_wake = trio.Event()
                due = min((d.next_probe for d in self._down.values() if not d.probing),
                          default=math.inf)
                with trio.move_on_at(due):
                    await self._health_wake.wait()
                now = trio.current_time()
                for address, down in list(self._down.items()):
                    if not down.probing and down.next_probe <= now:
                        down.probing = True
                        nursery.start_soon(self._probe, address, down)

    @property
    def recoveries(self) -> int:
        """Failure streaks that ended in a recovery so far (cheap; see the recovery ramp)."""
        return self.recovered.generation

    def statistics(self) -> UpstreamStatistics:
        first = [a for a in self._host_order if a not in self._down]
        return UpstreamStatistics(
            address=(first or self._host_order)[0],
            up=self._up,
            down=tuple(a for a in self._host_order if a in self._down),
            health_probes=self._health_probes,
            recoveries=self.recovered.generation,
            held=self._held,
            requests=self._requests,
            errors=self._errors,
            errors_by_kind=dict(self._errors_by_kind),
            last_error=self._last_error,
            latency_ms_last=self._latency_ms,
            in_flight=self._in_flight,
            in_flight_peak=self._in_flight_peak,
            gated=self._gated,
        )

    # --- internals --------------------------------------------------------------------------

    def _order(self, path: str) -> list[str]:
        """The addresses for a request to ``path``: its rendezvous order, those up first."""
        key = path.split("?", 1)[0].strip("/")
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) >= MAX_ORDERS:
                self._orders.clear()
            order = self._orders[key] = spread_addresses(self._addresses, self._seed, key)
        if not self._down:
            return list(order)
        return ([a for a in order if a not in self._down]
                + [a for a in order if a in self._down])

    def _mark_down(self, address: str, exc: _Failover) -> None:
        if address in self._down:
            return
        backoff = Backoff(self._cfg.backoff_min, self._cfg.backoff_max, rng=self._health_rng)
        self._down[address] = _Down(backoff, trio.current_time() + backoff.next_delay())
        self._health_wake.set()
        log.warning("upstream address marked down; its requests go to the others until it "
                    "answers again", extra={"address": address, "error": str(exc)})
        if (self._gate is not None and not self._gate_closed
                and len(self._down) == len(self._addresses)):
            # every address failed, in this request's attempts or in several requests' (a hung
            # cluster holds each attempt for a whole timeout): the outage gate closes now
            self._close_gate(exc)

    @property
    def _gate_closed(self) -> bool:
        """True from the moment every address failed until an answer (a failed probe keeps it)."""
        return self._gate is not None and self._gate.failures > 0

    def _close_gate(self, exc: _Failover) -> None:
        """Stop sending for a backoff window, one longer than the last (each failed probe)."""
        assert self._gate is not None
        delay = self._gate.next_delay(at_least=exc.retry_after or 0.0)
        self._gate_until = trio.current_time() + delay
        if self._gate.failures == 1:
            log.warning("upstream unreachable on every address; backing off",
                        extra={"retry_in": round(delay, 2)})

    def _mark_up(self, address: str) -> None:
        if address not in self._down:
            return
        if len(self._down) == len(self._addresses):
            # every address was down: the outage was the cluster's, and it is over. Every
            # request goes back to its own first address (one still failing is marked again)
            # rather than all to the one that answered first.
            self._down.clear()
            log.info("upstream answers again; every address back in its order",
                     extra={"address": address})
        else:
            del self._down[address]
            log.info("upstream address answers again; its requests return to it",
                     extra={"address": address})
        self._health_wake.set()

    async def _probe(self, address: str, down: _Down) -> None:
        """One health probe of a down address; skipped while every address is down or the
        outage gate is closed (requests themselves find out when the cluster is back)."""
        healthy = False
        try:
            if len(self._down) < len(self._addresses) and not self._gate_closed:
                self._health_probes += 1
                async with self._limiter:
                    response = await self._transport.request(
                        address, "GET", f"/v1/{HEALTH_PATH}", [], None)
                healthy = response.status_code == 200
        except (TransportError, ValueError):
            pass
        finally:
            down.probing = False
        if healthy:
            self._mark_up(address)
        elif self._down.get(address) is down:
            down.next_probe = trio.current_time() + down.backoff.next_delay()
            self._health_wake.set()

    def _count_error(self, exc: UpstreamError) -> None:
        self._errors += 1
        self._errors_by_kind[_error_kind(exc)] += 1
        self._last_error = str(exc)

    def _result(
        self, method: str, path: str, response: Response, body: Any
    ) -> dict[str, Any]:
        if response.status_code >= 300:
            raise _status_error(method, path, response, body)
        if body is _NOT_JSON:
            raise PermanentError(
                f"{method} {path}: HTTP {response.status_code}: reply is not JSON",
                status=response.status_code,
            )
        if not isinstance(body, dict):
            raise PermanentError(
                f"{method} {path}: HTTP {response.status_code}: reply is not a JSON object",
                status=response.status_code,
            )
        return body

    async def _exchange(
        self, method: str, path: str, json: Any, token: str | None, authenticated: bool,
        entered: float,
    ) -> tuple[Response, Any]:
        """Send to each address in the request's order until one gives a non-failover answer."""
        headers: list[tuple[str, str]] = []
        if authenticated:
            value = token if token is not None else self.token_source()
            if value:
                headers.append(("X-Vault-Token", value))
        probe = self._pass_gate(method, path)
        try:
            response, body = await self._try_addresses(method, path, json, headers, entered,
                                                       probe)
        except _Failover as exc:
            # the gate closed when the last address was marked down; a failed probe extends it
            if self._gate is not None and (probe or not self._gate_closed):
                self._close_gate(exc)
            raise
        else:
            if self._gate is not None and self._gate_closed:
                log.info("upstream reachable again")
                self._gate.reset()
                self._gate_until = -math.inf
            return response, body
        finally:
            if probe:
                self._probing = False

    def _pass_gate(self, method: str, path: str) -> bool:
        """Raise at once while the outage gate is closed; True when this request is the probe."""
        if not self._gate_closed:
            return False
        if self._gate_until > trio.current_time() or self._probing:
            raise self._gated_error(method, path)
        self._probing = True
        return True

    def _gated_error(self, method: str, path: str) -> TransientError:
        """The error of a request (or a failover attempt) the closed outage gate stops."""
        self._gated += 1
        left = max(self._gate_until - trio.current_time(), 0.0)
        return TransientError(
            f"{method} {path}: upstream unreachable; next attempt in {left:.1f} s",
            retry_after=left)

    async def _try_addresses(
        self, method: str, path: str, json: Any, headers: list[tuple[str, str]], entered: float,
        probe: bool,
    ) -> tuple[Response, Any]:
        last: _Failover | None = None
        for address in self._order(path):
            try:
                response, body = await self._attempt(address, method, path, json, headers,
                                                     entered, probe)
            except _Failover as exc:
                self._up = False
                last = exc
                if self._streak_since is None:
                    self._streak_since = trio.current_time()
                self._mark_down(address, exc)
                log.warning(
                    "upstream attempt failed",
                    extra={"address": address, "method": method, "path": path, "error": str(exc)},
                )
                continue
            self._mark_up(address)
            self._up = True
            self._answered()
            if last is not None and (hold := _HOLD.get()) is not None:
                hold.failed_over = True
            return response, body
        assert last is not None
        raise last

    def _answered(self) -> None:
        """An answer: the failure streak, if any, ends; one that lasted ``backoff_min`` or closed
        the outage gate is a recovery."""
        if self._streak_since is None:
            return
        now = trio.current_time()
        if now - self._streak_since >= self._cfg.backoff_min or self._gate_closed:
            self.recovered.set(now)
            log.info("upstream answers again after a failure streak; requests held over it "
                     "are spread", extra={"streak_s": round(now - self._streak_since, 2)})
        self._streak_since = None

    def _phase(self, entered: float) -> float | None:
        """When a request that entered at ``entered`` may be sent, if it was held over a
        recovery and its caller gave it a window (``spread_recovery``); else None.

        The phase is drawn from the moment the request would go, not from the recovery: a
        request held in a hung attempt that times out seconds after the recovery (its
        connection still waiting on a resumed server's backlog) is spread like the ones queued
        at the recovery, rather than going out with every other such request at once."""
        hold = _HOLD.get()
        recovered_at = self.recovered.value
        if hold is None or hold.held or hold.spread <= 0 or entered >= recovered_at:
            return None
        hold.held = True
        self._held += 1
        return trio.current_time() + hold.rng.uniform(0.0, hold.spread)

    async def _acquire(self, entered: float) -> None:
        """Take a slot; a request held over a recovery gives it back and waits its phase."""
        while True:
            await self._limiter.acquire()
            until = self._phase(entered)
            if until is None or until <= trio.current_time():
                return
            self._limiter.release()
            await trio.sleep_until(until)

    async def _attempt(
        self, address: str, method: str, path: str, json: Any, headers: list[tuple[str, str]],
        entered: float, probe: bool,
    ) -> tuple[Response, Any]:
        target = f"/v1/{path.lstrip('/')}"
        body = None
        if json is not None:
            body = jsonlib.dumps(json, separators=(",", ":"), allow_nan=False).encode()
            headers = [*headers, ("Content-Type", "application/json")]
        await self._acquire(entered)
        try:
            if not probe and self._gate_closed:
                # the gate closed while this request waited for its slot or failed over from
                # an address that held it: nothing more goes into an unreachable cluster
                raise self._gated_error(method, path)
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
            started = time.perf_counter()
            try:
                response = await self._transport.request(address, method, target, headers, body)
            except ReplyTooLarge as exc:
                raise PermanentError(f"{method} {path}: {address}: {exc}") from exc
            except TransportError as exc:
                raise _transport_error(exc, method, path, address) from exc
            except ValueError as exc:
                raise PermanentError(f"{method} {path}: invalid URL for {address}") from exc
            finally:
                self._in_flight -= 1
            self._latency_ms = (time.perf_counter() - started) * 1000.0
        finally:
            self._limiter.release()
        try:
            body = _decode_body(response)
        except ValueError:
            body = _NOT_JSON
        if response.status_code >= 500 or response.status_code in STANDBY_STATUSES or (
            300 <= response.status_code < 400
        ) or (response.status_code == 404 and not _openbao_answer(body)):
            raise _status_error(method, path, response, body)
        return response, body

