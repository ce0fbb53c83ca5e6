"""Prometheus metrics: a collector that reads the running agent at scrape time, and two outlets.

Theory of operation: nothing in the other components counts for metrics' sake. ``AgentCollector``
reads what they already keep (``upstream.statistics()``, ``auth.statistics()``, ``cache.info()``,
the refresher's per-secret state, ``server.statistics()`` and its request/decision counters,
``audit.statistics()``, the reload counts) each time it is collected, so a scrape always shows the
state of that moment and costs nothing between scrapes. It runs on the trio thread (the HTTP
handler and the textfile writer both call it from trio), so it reads without locks.

Outlets, both optional (``[metrics]``):

- ``listen = "HOST:PORT"``: a small HTTP/1.1 server (h11 on trio, one request per connection)
  answering ``GET /metrics`` (exposition format), ``/live`` (200 while the loop runs) and
  ``/ready`` (200 once the agent is ready, else 503);
- ``textfile = PATH``: the same exposition rewritten every ``textfile_interval`` for
  node_exporter's textfile collector: written to a temp file in the same directory, fsynced and
  renamed over PATH, so a reader never sees half a file.

Names and versions of secrets appear as labels and values; secret values never do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agentd import __version__
from agentd.cache import stale_deadline
from agentd.readmodel import COUNTER, metric_fields
from agentd.render.files import replace_file

if TYPE_CHECKING:
    from agentd.audit import Audit
    from agentd.auth import Authenticator
    from agentd.cache import Cache
    from agentd.config import Config
    from agentd.creds import CredentialsServer
    from agentd.refresh import Refresher
    from agentd.render import Renderer
    from agentd.server import Server
    from agentd.snapshot import Snapshot
    from agentd.upstream import Upstream


class Observed(Protocol):
    """The components the metrics read, each through its ``statistics()`` or state (the agent
    provides them; nothing here knows the agent)."""

    config: Config
    ready: trio.Event
    started_at: float
    reloads: int
    reload_failures: int
    upstream: Upstream
    auth: Authenticator
    cache: Cache
    refresher: Refresher
    server: Server
    credentials: CredentialsServer
    audit: Audit
    snapshot: Snapshot
    renderer: Renderer

log = logging.getLogger("agentd.metrics")

# The classic text format that generate_latest() writes (understood by every Prometheus).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
AUTH_STATES = ("logging_in", "ok", "failing")
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 16384


class AgentCollector:
    """A prometheus_client collector over the components an agent provides (``Observed``)."""

    def __init__(self, agent: Observed) -> None:
        self._agent = agent

    def describe(self) -> list[Metric]:
        return []   # no fixed set: the registry must not call collect() at registration

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        now = time.time()
        yield _gauge("agentd_info", "agentd build information", 1,
                     {"version": __version__})
        yield _gauge("agentd_ready", "1 once the agent is ready (READY=1 sent)",
                     int(agent.ready.is_set()))
        yield _gauge("agentd_start_time_seconds", "When the agent started (unix seconds)",
                     agent.started_at)

        up = agent.upstream.statistics()
        yield _gauge("agentd_upstream_up", "1 when the last upstream request got an answer",
                     int(up.up), {"address": up.address})
        yield from _from_statistics("upstream", up)
        errors = CounterMetricFamily(
            "agentd_upstream_errors", "Upstream requests that failed, by kind "
            "(transient, auth, not_found, permanent)", labels=["kind"])
        for kind in ("transient", "auth", "not_found", "permanent"):
            errors.add_metric([kind], up.errors_by_kind.get(kind, 0))
        yield errors
        yield _gauge("agentd_upstream_latency_seconds",
                     "Latency of the last upstream request", (up.latency_ms_last or 0) / 1000)

        auth = agent.auth.statistics()
        state = GaugeMetricFamily("agentd_auth_state", "1 for the authenticator's current state",
                                  labels=["method", "state"])
        states = (*AUTH_STATES, auth.state) if auth.state not in AUTH_STATES else AUTH_STATES
        for name in states:
            state.add_metric([auth.method, name], int(name == auth.state))
        yield state
        if auth.expires_at is not None:
            yield _gauge("agentd_auth_token_expiry_timestamp_seconds",
                         "When the agent's token expires (unix seconds)", auth.expires_at)
            yield _gauge("agentd_auth_token_ttl_seconds", "Seconds left on the agent's token",
                         max(0.0, auth.expires_at - now))
        yield from _from_statistics("auth", auth)

        if agent.config.metrics.detailed:
            yield from self._secrets(now)
        else:
            yield from self._secret_totals()

        server = agent.server.statistics()
        requests = CounterMetricFamily("agentd_requests", "Requests on the socket, by op",
                                       labels=["op"])
        for op, count in sorted(agent.server.requests_by_op.items()):
            requests.add_metric([op], count)
        yield requests
        decisions = CounterMetricFamily(
            "agentd_decisions", "Access decisions on the socket, by op and decision "
            "(allow, deny, not_found, unavailable, ...)", labels=["op", "decision"])
        for (op, decision), count in sorted(agent.server.decisions.items()):
            decisions.add_metric([op, decision], count)
        yield decisions
        if agent.config.metrics.detailed:
            denials = CounterMetricFamily(
                "agentd_denials", "Denied requests by op and by the policies that matched the "
                'peer ("none": no policy matched it)', labels=["op", "policy"])
            for (op, policy), count in sorted(agent.server.denials.items()):
                denials.add_metric([op, policy], count)
            yield denials
        yield from self._templates()
        # The components' typed statistics: each field declared with readmodel.metric is a series
        yield from _from_statistics("server", server)
        yield from _from_statistics("cache", agent.cache.statistics())
        yield from _from_statistics("credentials", agent.credentials.statistics())
        yield from _from_statistics("audit", agent.audit.statistics())
        snapshot = getattr(agent, "snapshot", None)    # the on-disk cache snapshot
        if snapshot is not None:
            yield from _from_statistics("snapshot", snapshot.statistics())
        reloads = CounterMetricFamily("agentd_config_reloads", "Config reloads by result",
                                      labels=["result"])
        reloads.add_metric(["applied"], agent.reloads)
        reloads.add_metric(["refused"], agent.reload_failures)
        yield reloads

    def _templates(self) -> Iterator[Metric]:
        """Per template or bundle (labelled by its destination): render and command results."""
        targets = self._agent.renderer.statistics()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for target, stats in targets.items():
            for name, kind, doc, value in metric_fields("template", stats):
                if name not in families:
                    families[name] = (CounterMetricFamily if kind == COUNTER
                                      else GaugeMetricFamily)(name, doc, labels=["target"])
                families[name].add_metric([target], value)
        yield from families.values()
        ok = GaugeMetricFamily("agentd_template_ok", "1 when the last render of the target "
                               "succeeded", labels=["target"])
        for target, stats in targets.items():
            ok.add_metric([target], int(stats.ok))
        yield ok

    def _secret_totals(self) -> Iterator[Metric]:
        """Counts only (no names): what an unprivileged reader of the metrics may see."""
        agent = self._agent
        states = agent.refresher.states
        infos = [agent.cache.info(name) for name in agent.config.secrets]
        yield _gauge("agentd_secrets", "Declared secrets", len(agent.config.secrets))
        yield _gauge("agentd_secrets_cached", "Declared secrets with a cached value",
                     sum(info is not None for info in infos))
        yield _gauge("agentd_secrets_stale", "Secrets served stale (refreshes failing)",
                     sum(info is not None and info.stale for info in infos))
        yield _gauge("agentd_secrets_revoked", "Secrets revoked or deleted upstream",
                     sum(state.revoked for state in states.values()))

    def _secrets(self, now: float) -> Iterator[Metric]:
        agent = self._agent
        labels = ["name", "kind"]
        version = GaugeMetricFamily("agentd_secret_version", "Version of the cached value",
                                    labels=labels)
        fetched = GaugeMetricFamily("agentd_secret_fetched_timestamp_seconds",
                                    "When the cached value was fetched (unix seconds)",
                                    labels=labels)
        age = GaugeMetricFamily("agentd_secret_age_seconds", "Age of the cached value",
                                labels=labels)
        stale = GaugeMetricFamily("agentd_secret_stale",
                                  "1 while the value is served stale (refreshes failing)",
                                  labels=labels)
        cached = GaugeMetricFamily("agentd_secret_cached", "1 when a value is cached",
                                   labels=labels)
        revoked = GaugeMetricFamily("agentd_secret_revoked",
                                    "1 when revoked or deleted upstream", labels=labels)
        failures = GaugeMetricFamily("agentd_secret_refresh_failures",
                                     "Consecutive failed refreshes", labels=labels)
        expiry = GaugeMetricFamily("agentd_secret_expiry_timestamp_seconds",
                                   "When the value expires (lease or certificate)",
                                   labels=labels)
        deadline = GaugeMetricFamily("agentd_secret_stale_deadline_timestamp_seconds",
                                     "When a stale value stops being served (max_stale)",
                                     labels=labels)
        next_refresh = GaugeMetricFamily("agentd_secret_next_refresh_timestamp_seconds",
                                         "When the next refresh is scheduled (unix seconds)",
                                         labels=labels)
        anomalies = CounterMetricFamily(
            "agentd_secret_anomalies", "Anomaly signals: rotation faster than "
            "expect_rotation_every, reuse of a recent previous value", labels=[*labels, "anomaly"])
        states = agent.refresher.states
        offset = _trio_to_unix(now)
        for name, secret in sorted(agent.config.secrets.items()):
            key = [name, secret.kind]
            info = agent.cache.info(name)
            state = states.get(name)
            cached.add_metric(key, int(info is not None))
            if info is not None:
                version.add_metric(key, info.version)
                fetched.add_metric(key, info.fetched_at)
                age.add_metric(key, max(0.0, now - info.fetched_at))
                stale.add_metric(key, int(info.stale))
                # when it would stop being served if it went stale now (or has)
                deadline.add_metric(key, stale_deadline(
                    info.fetched_at, info.expires_at, True, agent.config.max_stale_for(name)))
                if info.expires_at is not None:
                    expiry.add_metric(key, info.expires_at)
            for anomaly, count in agent.refresher.kinds.status(secret)["anomalies"].items():
                anomalies.add_metric([*key, anomaly], count)
            if state is not None:
                revoked.add_metric(key, int(state.revoked))
                failures.add_metric(key, state.failures)
                if state.next_attempt is not None and offset is not None:
                    next_refresh.add_metric(key, state.next_attempt + offset)
        yield from (version, fetched, age, stale, cached, revoked, failures, expiry, deadline,
                    next_refresh, anomalies)


def _from_statistics(component: str, stats: object) -> Iterator[Metric]:
    """The series a component's statistics declare (``readmodel.metric`` fields)."""
    for name, kind, doc, value in metric_fields(component, stats):
        yield _counter(name, doc, value) if kind == COUNTER else _gauge(name, doc, value)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    metric = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    metric.add_metric(list((labels or {}).values()), value)
    return metric


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


def _trio_to_unix(now: float) -> float | None:
    """Offset that turns a trio clock reading into unix time (None outside trio)."""
    try:
        return now - trio.current_time()
    except RuntimeError:
        return None


def registry_for(agent: Observed) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))


# --- textfile ---------------------------------------------------------------------------------

def write_textfile(path: Path, data: bytes, *, mode: int = 0o640,
                   gid: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (``files.replace_file``), with ``mode`` and
    group ``gid`` (default the agent's) set before it is visible; 0640 by default: give
    node_exporter's group with ``textfile_group`` rather than the world.

    Raises:
        OSError: the directory is missing or not writable, the disk is full; no temp file stays.
    """
    replace_file(path, data, mode=mode, gid=gid)


async def run_textfile(agent: Observed, path: Path, interval: float, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Rewrite the textfile every ``interval`` until cancelled; failures are logged, not raised."""
    registry = registry_for(agent)
    started = False
    while True:
        data = exposition(registry)
        try:
            cfg = agent.config.metrics
            await trio.to_thread.run_sync(functools.partial(
                write_textfile, path, data, mode=cfg.textfile_mode, gid=cfg.textfile_group))
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EROFS:
                hint = (f"; under ProtectSystem=strict add ReadWritePaths={path.parent} with "
                        "`systemctl edit agentd.service`")
            log.error("metrics textfile not written%s", hint,
                      extra={"path": str(path), "error": str(exc)})
        if not started:
            task_status.started()
            started = True
        await trio.sleep(interval)


# --- HTTP endpoint ----------------------------------------------------------------------------

async def serve_http(agent: Observed, host: str, port: int, *,
                     task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Serve /metrics, /live and /ready on ``host:port`` until cancelled.

    ``task_status.started()`` gets the bound address (port 0 picks a free port).
    """
    registry = registry_for(agent)
    listeners = await trio.open_tcp_listeners(port, host=host)
    address = listeners[0].socket.getsockname()
    log.info("metrics endpoint listening", extra={"address": f"{address[0]}:{address[1]}"})
    task_status.started((address[0], address[1]))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, agent, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            log.debug("metrics request failed", extra={"error": str(exc)})
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, agent: Observed, registry: CollectorRegistry) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    request: h11.Request | None = None
    while request is None:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.ConnectionClosed):
            return
    target = request.target.decode("ascii", "replace").split("?", 1)[0]
    status, content_type, body = _route(request.method, target, agent, registry)
    headers = [("content-type", content_type), ("content-length", str(len(body))),
               ("connection", "close")]
    out = conn.send(h11.Response(status_code=status, headers=headers))
    if request.method != b"HEAD":
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
    out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(out)


def _route(method: bytes, target: str, agent: Observed,
           registry: CollectorRegistry) -> tuple[int, str, bytes]:
    text = "text/plain; charset=utf-8"
    if method not in (b"GET", b"HEAD"):
        return 405, text, b"method not allowed\n"
    if target == "/metrics":
        return 200, CONTENT_TYPE, exposition(registry)
    if target == "/live":
        return 200, text, b"ok\n"
    if target == "/ready":
        if agent.ready.is_set():
            return 200, text, b"ready\n"
        return 503, text, b"not ready\n"
    return 404, text, b"not found: /metrics, /live, /ready\n"


async def run(agent: Observed, *,
              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the outlets configured in ``[metrics]`` (none: returns at once, after started())."""
    config = agent.config.metrics
    async with trio.open_nursery() as nursery:
        if config.listen is not None:
            await nursery.start(serve_http, agent, *config.listen)
        if config.textfile is not None:
            await nursery.start(run_textfile, agent, config.textfile, config.textfile_interval)
        task_status.started()
