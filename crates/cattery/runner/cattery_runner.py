#!/usr/bin/env python3
"""Cattery runner: serves the Pipecat Cloud agent-instance contract for an unchanged ``bot.py``.

The Cattery server embeds this file, writes it to its data directory and starts it as
``<python> cattery_runner.py`` with the bot directory as working directory. It does in-process
what the Pipecat Cloud base image (``dailyco/pipecat-base``, ``app.py``) does inside an agent
container:

* ``POST /bot``       start an HTTP-initiated session and block until ``bot()`` returns
* ``WS   /ws``        start a WebSocket session (``WebSocketSessionArguments``)
* ``POST /api/offer`` SmallWebRTC signalling (``PATCH`` for trickle ICE), when aiortc is installed
* ``POST /whatsapp``  WhatsApp call events, when SmallWebRTC and pipecat's ``WhatsAppClient`` are
                      importable and ``WHATSAPP_TOKEN``, ``WHATSAPP_PHONE_NUMBER_ID`` and
                      ``WHATSAPP_APP_SECRET`` are set
* ``GET  /readyz``    the bot's optional ``readyz()``; ``GET /livez`` always ok
* any route the bot adds to ``pipecatcloud_system.app`` (the Session API)

Environment:

``PORT``                     listen port (default 8080), always on ``CATTERY_HOST`` (default 127.0.0.1)
``CATTERY_BOT_DIR``          directory holding ``bot.py`` (default: the working directory)
``CATTERY_SESSION_ID``       session id used when a request has no ``x-daily-session-id`` header,
                             and as the log tag outside a request (default ``NONE``)
``PIPECAT_LOG_LEVEL``        log level (default DEBUG; ``NONE`` silences the log sink)
``CATTERY_SHUTDOWN_TIMEOUT`` seconds a running ``bot()`` gets to unwind after SIGTERM (default 10)
``CATTERY_WEBRTC_TIMEOUT``   seconds ``/bot`` waits for a SmallWebRTC offer (default 120)
``ICE_CONFIG_URL``           ICE server source for SmallWebRTC (``{"iceConfig":{"iceServers":[..]}}``)
``CATTERY_ICE_SERVERS``      comma-separated ICE URLs used instead; set but empty = no ICE servers
``ESP32_ENABLED``/``ESP32_HOST`` as in the base image

Only the standard library, FastAPI and uvicorn are required; pipecat, pipecatcloud, loguru and
aiortc are used when they are importable.
"""

import asyncio
import base64
import binascii
import contextlib
import contextvars
import gc
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import types
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_SPAWNED_AT = time.monotonic()

# Log lines must reach the platform as they are written, whatever PYTHONUNBUFFERED says.
os.environ.setdefault("PYTHONUNBUFFERED", "1")
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.reconfigure(line_buffering=True, write_through=True)
    except (AttributeError, ValueError):
        pass

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request, WebSocket  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.websockets import WebSocketState  # noqa: E402

try:
    from loguru import logger as _loguru
except ImportError:  # a bot environment without pipecat: stdlib logging only
    _loguru = None


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default


BOT_DIR = os.path.abspath(os.environ.get("CATTERY_BOT_DIR") or os.getcwd())
DEFAULT_STUN = "stun:stun.l.google.com:19302"


def _load_settings() -> None:
    """Per-instance settings from the environment (again in each child of the fork server)."""
    global HOST, PORT, ENV_SESSION_ID, LOG_LEVEL, SHUTDOWN_TIMEOUT, WEBRTC_TIMEOUT, _DEFAULT_TAG
    HOST = os.environ.get("CATTERY_HOST", "127.0.0.1")
    PORT = int(os.environ.get("PORT", "8080"))
    ENV_SESSION_ID = os.environ.get("CATTERY_SESSION_ID") or None
    LOG_LEVEL = (os.environ.get("PIPECAT_LOG_LEVEL") or "DEBUG").strip().upper()
    SHUTDOWN_TIMEOUT = _env_float("CATTERY_SHUTDOWN_TIMEOUT", 10.0)
    WEBRTC_TIMEOUT = _env_float("CATTERY_WEBRTC_TIMEOUT", 120.0)
    _DEFAULT_TAG = ENV_SESSION_ID or "NONE"


HOST = PORT = ENV_SESSION_ID = LOG_LEVEL = SHUTDOWN_TIMEOUT = WEBRTC_TIMEOUT = _DEFAULT_TAG = None
_load_settings()

# ---------------------------------------------------------------------------------------------
# Logging: `<time> | <LEVEL> | <module>:<func>:<line> | <session_id or NONE> - <message>`
# ---------------------------------------------------------------------------------------------

# The session of the code that is logging. Set per request (from x-daily-session-id) and
# inherited by every task bot() creates, since asyncio tasks copy the current context.
_SESSION: contextvars.ContextVar = contextvars.ContextVar("cattery_session_id", default=None)
LOG_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | "
    "{level: <8} | "
    "{name}:{function}:{line} | "
    "{extra[session_id]} - {message}"
)


def _session_tag() -> str:
    return _SESSION.get() or _DEFAULT_TAG


def _loguru_patcher(record) -> None:
    extra = record["extra"]
    current = extra.get("session_id")
    if not current or current == "NONE":
        extra["session_id"] = _session_tag()


def _install_loguru_sink() -> None:
    """Replace every loguru sink with ours (as the base image does after importing bot.py).

    The new sink gets id 0, the id of loguru's pre-configured handler, so a bot.py that does the
    usual ``logger.remove(0)`` at import time keeps working.
    """
    _loguru.remove()
    with contextlib.suppress(Exception):
        core = _loguru._core  # noqa: SLF001 - only to hand out id 0 again
        with core.lock:
            if not core.handlers:
                core.handlers_count = 0
    _loguru.configure(patcher=_loguru_patcher)
    if LOG_LEVEL != "NONE":
        _loguru.add(
            sys.stderr,
            format=LOG_FORMAT,
            level=LOG_LEVEL if LOG_LEVEL in _LOGURU_LEVELS else "DEBUG",
            colorize=False,
            diagnose=False,  # never print local variables (tokens, keys) in tracebacks
            enqueue=False,
        )


_LOGURU_LEVELS = {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}


class _InterceptHandler(logging.Handler):
    """Route stdlib logging (uvicorn, asyncio, aiortc, ...) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = _loguru.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        _loguru.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = _session_tag()
        return True


class _HealthAccessFilter(logging.Filter):
    """Drop uvicorn access lines for the health probes, as the base image does."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3:
            path = str(args[2]).split("?", 1)[0]
            if path in ("/readyz", "/livez"):
                return False
        return True


def _configure_stdlib_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if _loguru is not None:
        handler: logging.Handler = _InterceptHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d | %(levelname)-8s | %(name)s:%(funcName)s:%(lineno)d"
                " | %(session_id)s - %(message)s",
                datefmt="%Y-%m-%d %H:%M:%S",
            )
        )
        handler.addFilter(_SessionFilter())
    root.addHandler(handler)
    logging.captureWarnings(True)  # DeprecationWarning & co. in the same format
    if LOG_LEVEL == "NONE":
        root.setLevel(logging.CRITICAL + 1)
    else:
        # Library DEBUG output (aioice, asyncio, websockets) would drown the bot's own lines.
        stricter = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
        root.setLevel(stricter.get(LOG_LEVEL, logging.INFO))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.filters = [f for f in access.filters if not isinstance(f, _HealthAccessFilter)]
    access.addFilter(_HealthAccessFilter())


if _loguru is not None:
    log: Any = _loguru
else:
    log = logging.getLogger("cattery_runner")


def _log_exception(message: str, exc: BaseException) -> None:
    if _loguru is not None:
        _loguru.opt(exception=exc, depth=1).error(message)
    else:
        log.error(message, exc_info=(type(exc), exc, exc.__traceback__))


def _configure_logging() -> None:
    if _loguru is not None:
        _install_loguru_sink()
    _configure_stdlib_logging()


# ---------------------------------------------------------------------------------------------
# The `pipecatcloud_system` module bot.py imports its Session API app from
# ---------------------------------------------------------------------------------------------

app = FastAPI()


def add_lifespan_to_app(new_lifespan) -> None:
    """Chain a lifespan context manager onto the app's (same helper as the base image's)."""
    existing = getattr(app.router, "lifespan_context", None)
    if existing is not None:

        @contextlib.asynccontextmanager
        async def combined_lifespan(a):
            async with existing(a):
                async with new_lifespan(a):
                    yield

        app.router.lifespan_context = combined_lifespan
    else:
        app.router.lifespan_context = new_lifespan


_WHATSAPP_CLIENT = None


def get_whatsapp_client():
    """The WhatsApp client once ``/whatsapp`` is served (inside the app's lifespan), else None."""
    return _WHATSAPP_CLIENT


_system = types.ModuleType("pipecatcloud_system")
_system.__doc__ = "Cattery's stand-in for the Pipecat Cloud base image's pipecatcloud_system module."
_system.app = app
_system.add_lifespan_to_app = add_lifespan_to_app
_system.get_whatsapp_client = get_whatsapp_client
_system.WHATSAPP_AVAILABLE = False
_system.whatsapp_client = None
sys.modules["pipecatcloud_system"] = _system


# ---------------------------------------------------------------------------------------------
# Session arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class _FallbackArgs:
    """Used only when neither pipecatcloud nor pipecat is importable. Same field names."""

    body: Any = None
    session_id: Optional[str] = None
    call_data: Any = None
    file_storage: Any = None
    cli_args: Any = None
    handle_sigint: bool = False
    handle_sigterm: bool = False
    pipeline_idle_timeout_secs: Optional[float] = 300


@dataclass
class _FallbackPipecatArgs(_FallbackArgs):
    pass


@dataclass
class _FallbackDailyArgs(_FallbackArgs):
    room_url: str = ""
    token: Optional[str] = None


@dataclass
class _FallbackWebSocketArgs(_FallbackArgs):
    websocket: Any = None
    transport_type: Optional[str] = None


@dataclass
class _FallbackWebRTCArgs(_FallbackArgs):
    webrtc_connection: Any = None


def _load_session_classes() -> dict:
    """The classes bot() receives: pipecatcloud.agent's, else pipecat runner types, else ours."""
    try:
        from pipecatcloud.agent import (
            DailySessionArguments,
            PipecatSessionArguments,
            SmallWebRTCSessionArguments,
            WebSocketSessionArguments,
        )

        return {
            "source": "pipecatcloud.agent",
            "pipecat": PipecatSessionArguments,
            "daily": DailySessionArguments,
            "websocket": WebSocketSessionArguments,
            "webrtc": SmallWebRTCSessionArguments,
        }
    except Exception as exc:  # ImportError, or an old pipecatcloud without some class
        reason = f"{type(exc).__name__}: {exc}"
    try:
        from pipecat.runner.types import (
            DailyRunnerArguments,
            RunnerArguments,
            SmallWebRTCRunnerArguments,
            WebSocketRunnerArguments,
        )

        @dataclass
        class PipecatSessionArguments(RunnerArguments):
            pass

        @dataclass
        class DailySessionArguments(DailyRunnerArguments):
            pass

        @dataclass
        class WebSocketSessionArguments(WebSocketRunnerArguments):
            pass

        @dataclass
        class SmallWebRTCSessionArguments(SmallWebRTCRunnerArguments):
            pass

        log.info(f"pipecatcloud.agent not importable ({reason}); using pipecat runner types")
        return {
            "source": "pipecat.runner.types",
            "pipecat": PipecatSessionArguments,
            "daily": DailySessionArguments,
            "websocket": WebSocketSessionArguments,
            "webrtc": SmallWebRTCSessionArguments,
        }
    except Exception as exc:
        log.info(
            f"pipecatcloud.agent ({reason}) and pipecat.runner.types ({type(exc).__name__}) "
            "not importable; using plain session-argument objects"
        )
    return {
        "source": "cattery",
        "pipecat": _FallbackPipecatArgs,
        "daily": _FallbackDailyArgs,
        "websocket": _FallbackWebSocketArgs,
        "webrtc": _FallbackWebRTCArgs,
    }


_ARGS: dict = {}


def _make_args(kind: str, **kwargs):
    cls = _ARGS[kind]
    try:
        return cls(**kwargs)
    except TypeError:
        # An older pipecatcloud without some keyword (e.g. session_id): set what it lacks.
        session_id = kwargs.pop("session_id", None)
        obj = cls(**kwargs)
        with contextlib.suppress(Exception):
            obj.session_id = session_id
        return obj


# ---------------------------------------------------------------------------------------------
# Running bot()
# ---------------------------------------------------------------------------------------------

_BOT: Optional[Callable] = None
_READYZ: Optional[Callable] = None


@dataclass
class Outcome:
    status: str  # "ok" | "error" | "timeout"
    error: Optional[str] = None
    reason: Optional[str] = None  # why a session was cancelled by the runner
    code: str = "BOT_ERROR"


class _SessionRun:
    """One running bot() task, cancellable by the runner (budget, SIGTERM)."""

    def __init__(self, task: asyncio.Task, session_id: Optional[str]):
        self.task = task
        self.session_id = session_id
        self.cancel_reason: Optional[str] = None
        # The platform's /bot request went away (a control-plane restart): nobody will read the
        # answer, so the runner exits when bot() ends and the platform sees the process exit.
        self.orphaned = False

    def cancel(self, reason: str) -> bool:
        if self.task.done():
            return False
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.task.cancel()
        return True


_ACTIVE: "set[_SessionRun]" = set()
_BACKGROUND: "set[asyncio.Task]" = set()
_SHUTTING_DOWN = False


def parse_budget(raw: Optional[str]) -> Optional[float]:
    """X-PCC-Max-Session-Seconds: a positive finite number, else not enforced."""
    if raw is None:
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


async def _call_bot(args) -> Any:
    result = _BOT(args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call on_disconnect when the client closes the (already read) request's connection."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                on_disconnect()
                return


async def _run_session(
    args,
    budget: Optional[float],
    request: Optional[Request] = None,
    on_run: Optional[Callable[["_SessionRun"], None]] = None,
) -> Outcome:
    """Run bot(args) to its end, enforcing the session budget; never raises for bot errors.

    Only the runner's own cancellation (budget, SIGTERM, the platform closing the /bot request
    given as ``request``) is absorbed. If the calling task is itself cancelled (uvicorn tearing
    the request down), bot() is cancelled too, given a moment to unwind, and the cancellation
    propagates.
    """
    session_id = getattr(args, "session_id", None)
    _SESSION.set(session_id)
    metadata = json.dumps({"session_id": session_id, "args": type(args).__name__})
    log.info(f"Starting bot session with metadata: {metadata}")
    if budget is not None:
        log.debug(f"Session budget (X-PCC-Max-Session-Seconds): {budget:g} s")
    if _ACTIVE:
        log.warning(f"{len(_ACTIVE)} session(s) already running in this process")
    started = time.monotonic()
    task = asyncio.ensure_future(_call_bot(args))
    run = _SessionRun(task, session_id)
    _ACTIVE.add(run)
    if on_run is not None:
        on_run(run)
    if _SHUTTING_DOWN:
        run.cancel("runner is shutting down")
    watcher = None
    if request is not None:
        watcher = asyncio.ensure_future(_watch_disconnect(request, lambda: _closed_by_client(run)))
    try:
        try:
            done, _ = await asyncio.wait({task}, timeout=budget)
            if not done:
                log.warning(
                    f"Max session duration of {budget:g} s reached (X-PCC-Max-Session-Seconds);"
                    " cancelling bot()"
                )
                run.cancel("max session duration reached")
                await asyncio.wait({task})
        except asyncio.CancelledError:
            run.cancel("request cancelled")
            with contextlib.suppress(BaseException):
                await asyncio.wait({task}, timeout=min(SHUTDOWN_TIMEOUT, 5.0) or 0.1)
            log.warning("bot() session torn down with the runner")
            raise
    finally:
        _ACTIVE.discard(run)
        if watcher is not None:
            watcher.cancel()
    elapsed = time.monotonic() - started
    if task.cancelled():
        if run.cancel_reason:
            log.info(f"Stopping bot session ({run.cancel_reason}) after {elapsed:.1f} s")
            return Outcome("ok", reason=run.cancel_reason)
        log.error(f"bot() was cancelled after {elapsed:.1f} s")
        return Outcome("error", error="bot() was cancelled")
    exc = task.exception()
    if exc is not None:
        _log_exception(f"Exception running bot(): {type(exc).__name__}: {exc}", exc)
        log.info(f"Stopping bot session (error) after {elapsed:.1f} s")
        return Outcome("error", error=f"{type(exc).__name__}: {exc}")
    if run.cancel_reason:
        log.info(f"Stopping bot session ({run.cancel_reason}) after {elapsed:.1f} s")
        return Outcome("ok", reason=run.cancel_reason)
    log.info(f"Stopping bot session after {elapsed:.1f} s")
    return Outcome("ok")


def _closed_by_client(run: "_SessionRun") -> None:
    """The platform's /bot request went away while bot() runs (the control plane restarted).

    The session goes on: a restarted Cattery re-adopts this process. Nobody will read the /bot
    answer any more, so the end of bot() is reported by exiting the process instead (code 0
    for a normal end, 1 for an error), which the platform watches.
    """
    if run.task.done():
        return
    run.orphaned = True
    log.info("The /bot request was closed by the platform; the session goes on and the runner exits when bot() ends")
    run.task.add_done_callback(lambda t: _exit_soon(0 if _task_ok(t) else 1))


def _task_ok(task: "asyncio.Task") -> bool:
    return task.cancelled() or task.exception() is None


def _exit_soon(code: int) -> None:
    log.info(f"No platform request is waiting for this session's end; exiting with code {code}")
    # A restarted platform is no longer this process's parent: it reads the code from here.
    status_file = os.environ.get("CATTERY_EXIT_STATUS_FILE")
    if status_file:
        with contextlib.suppress(OSError):
            with open(status_file, "w") as f:
                f.write(f"{code}\n")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    asyncio.get_running_loop().call_later(0.2, os._exit, code)


CLOSED_REASON = "the /bot request was closed"


def _outcome_response(outcome: Outcome) -> JSONResponse:
    if outcome.status == "ok":
        return JSONResponse({}, status_code=200)
    return JSONResponse({"error": outcome.error or "bot() failed", "code": outcome.code}, status_code=500)


def _cancel_all_sessions(reason: str) -> None:
    global _SHUTTING_DOWN
    _SHUTTING_DOWN = True
    for run in list(_ACTIVE):
        if run.cancel(reason):
            token = _SESSION.set(run.session_id)
            try:
                log.info(f"Cancelling bot() ({reason})")
            finally:
                _SESSION.reset(token)
    pending = _WEBRTC.pending
    if pending is not None and not pending.connected.done():
        pending.connected.cancel()
        if not pending.finished.done():
            pending.finished.set_result(Outcome("ok", reason=reason))


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def _header_session_id(headers) -> Optional[str]:
    return headers.get("x-daily-session-id") or ENV_SESSION_ID


def _split_start_envelope(body, marker: Optional[str]):
    """The base image's start envelope (X-Pcc-Start-Envelope: 1): ``{"body", "flow_config"}``.

    Only the marker decides; a body shaped like an envelope without it is the session body.
    Returns (body, flow_config) or raises ValueError for a malformed envelope.
    """
    if marker is None:
        return body, None
    if marker.strip() != "1":
        raise ValueError(f"unknown start envelope version {marker!r}")
    if not isinstance(body, dict) or "body" not in body or "flow_config" not in body:
        raise ValueError("a start envelope needs both body and flow_config")
    flow = body["flow_config"]
    if not isinstance(flow, str) or not flow:
        raise ValueError("flow_config must be non-empty text")
    return body["body"], flow


def _attach_flow_config(args, flow: Optional[str]):
    """Assigned, not passed: older pipecat RunnerArguments have no flow_config field."""
    if flow is not None:
        with contextlib.suppress(Exception):
            args.flow_config = flow


async def handle_bot(request: Request, body: dict):
    headers = request.headers
    session_id = _header_session_id(headers)
    _SESSION.set(session_id)
    try:
        body, flow = _split_start_envelope(body, headers.get("x-pcc-start-envelope"))
    except ValueError as exc:
        return JSONResponse({"error": str(exc), "code": "GENERIC_BAD_REQUEST"}, status_code=400)
    budget = parse_budget(headers.get("x-pcc-max-session-seconds"))
    transport = (headers.get("x-daily-transport-type") or "").strip().lower()
    room_url = headers.get("x-daily-room-url")
    room_token = headers.get("x-daily-room-token")
    log.debug(f"Transport type: {transport or None}")

    if transport == "webrtc":
        if _WEBRTC.available:
            return await _wait_for_webrtc(request, session_id, body, budget, flow)
        log.warning(
            "x-daily-transport-type: webrtc, but SmallWebRTC is not available in this environment"
            " (needs pipecat-ai[webrtc]); running bot() with PipecatSessionArguments"
        )
    try:
        if room_url and room_token:
            args = _make_args("daily", room_url=room_url, token=room_token, body=body, session_id=session_id)
        else:
            args = _make_args("pipecat", body=body, session_id=session_id)
        _attach_flow_config(args, flow)
    except Exception as exc:  # pragma: no cover - only with an incompatible pipecatcloud
        _log_exception("Could not build the session arguments", exc)
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}", "code": "RUNNER_ERROR"}, status_code=500)
    return _outcome_response(await _run_session(args, budget, request=request))


def _decode_ws_body(raw: Optional[str]):
    if not raw:
        return None
    text = raw.strip().replace(" ", "+")  # a '+' that was decoded as a space in the query
    text += "=" * (-len(text) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return json.loads(decode(text).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValueError):
            continue
    log.error("Failed to decode the ?body= parameter (expected base64 of JSON); body is None")
    return None


async def handle_websocket(ws: WebSocket):
    session_id = _header_session_id(ws.headers)
    _SESSION.set(session_id)
    await ws.accept()
    body = _decode_ws_body(ws.query_params.get("body"))
    budget = parse_budget(ws.headers.get("x-pcc-max-session-seconds"))
    args = _make_args("websocket", websocket=ws, body=body, session_id=session_id)
    outcome = await _run_session(args, budget)
    if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await ws.close(code=1000 if outcome.status == "ok" else 1011)
    # The instance serves one session: once it is over the process exits (code 0, or 1 if
    # bot() raised) and writes the code to $CATTERY_EXIT_STATUS_FILE, so a server that is not
    # this process's parent (it re-adopted the instance in an upgrade) records how it ended.
    if not _SHUTTING_DOWN:
        _exit_soon(0 if outcome.status == "ok" else 1)


async def _call_readyz():
    try:
        result = _READYZ()
        if inspect.isawaitable(result):
            result = await result
        return result
    except Exception as exc:
        log.warning(f"Health check function raised exception: {exc}")
        return {"ready": False, "error": str(exc)}


# The last /readyz answer, as (status, body): a change is logged (the access lines of /readyz
# are not), so a start that times out on "not ready" has the bot's reason in its logs.
_LAST_READYZ: Optional[tuple] = None


def _readyz_answer(response: JSONResponse) -> JSONResponse:
    global _LAST_READYZ
    seen = (response.status_code, bytes(response.body))
    if seen != _LAST_READYZ:
        text = seen[1].decode("utf-8", "replace")
        if seen[0] == 200:
            if _LAST_READYZ is not None:
                log.info(f"/readyz answers 200 (ready): {text}")
        else:
            log.warning(f"/readyz answers {seen[0]} (not ready, no session is sent here until it answers 200): {text}")
        _LAST_READYZ = seen
    return response


async def handle_readyz():
    if _READYZ is None:
        return JSONResponse({"status": "ok"}, status_code=200)
    result = await _call_readyz()
    if isinstance(result, bool):
        if result:
            return _readyz_answer(JSONResponse({"status": "ok"}, status_code=200))
        return _readyz_answer(JSONResponse({"status": "not ready"}, status_code=503))
    if isinstance(result, dict):
        try:
            return _readyz_answer(JSONResponse(result, status_code=200 if result.get("ready", False) else 503))
        except (TypeError, ValueError) as exc:  # not JSON-serialisable
            return _readyz_answer(JSONResponse({"ready": False, "error": f"readyz() result: {exc}"}, status_code=503))
    log.warning(f"readyz() returned unexpected type: {type(result)}")
    return _readyz_answer(JSONResponse({"status": "error", "error": "invalid readyz return type"}, status_code=503))


async def handle_livez():
    return JSONResponse({"status": "ok"}, status_code=200)


# ---------------------------------------------------------------------------------------------
# SmallWebRTC
# ---------------------------------------------------------------------------------------------


@dataclass
class _PendingWebRTC:
    session_id: Optional[str]
    body: Any
    budget: Optional[float]
    connected: asyncio.Future
    finished: asyncio.Future
    run: Optional["_SessionRun"] = None
    closed: bool = False  # the /bot request went away
    flow_config: Optional[str] = None


@dataclass
class _WebRTCState:
    available: bool = False
    module: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: Optional[_PendingWebRTC] = None


_WEBRTC = _WebRTCState()


def _webrtc_available() -> bool:
    try:
        return (
            importlib.util.find_spec("aiortc") is not None
            and importlib.util.find_spec("pipecat.transports.smallwebrtc.request_handler") is not None
        )
    except (ImportError, ValueError):
        return False


def _load_webrtc_sync():
    """Import the SmallWebRTC pieces once (slow: aiortc, av), off the event loop."""
    with _WEBRTC.lock:
        if _WEBRTC.module is not None:
            return _WEBRTC.module
        from pipecat.transports.smallwebrtc import request_handler as rh
        from pipecat.transports.smallwebrtc.connection import IceServer

        esp32 = os.environ.get("ESP32_ENABLED", "False").lower() == "true"
        handler = rh.SmallWebRTCRequestHandler(
            connection_mode=rh.ConnectionMode.SINGLE,
            esp32_mode=esp32,
            host=os.environ.get("ESP32_HOST"),
        )
        _WEBRTC.module = types.SimpleNamespace(
            handler=handler,
            IceServer=IceServer,
            SmallWebRTCRequest=rh.SmallWebRTCRequest,
            PatchRequest=getattr(rh, "SmallWebRTCPatchRequest", None),
            IceCandidate=getattr(rh, "IceCandidate", None),
        )
        return _WEBRTC.module


async def _load_webrtc():
    if _WEBRTC.module is not None:
        return _WEBRTC.module
    return await asyncio.to_thread(_load_webrtc_sync)


def _fetch_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-set URL
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        return json.loads(resp.read().decode("utf-8"))


async def _ice_servers(mod) -> list:
    explicit = os.environ.get("CATTERY_ICE_SERVERS")
    if explicit is not None:
        return [mod.IceServer(urls=u.strip()) for u in explicit.split(",") if u.strip()]
    url = os.environ.get("ICE_CONFIG_URL")
    if url:
        try:
            data = await asyncio.to_thread(_fetch_json, url, 10.0)
            servers = (data.get("iceConfig") or {}).get("iceServers") or []
            return [
                mod.IceServer(
                    urls=s.get("urls", []),
                    username=s.get("username", ""),
                    credential=s.get("credential", ""),
                )
                for s in servers
            ]
        except Exception as exc:
            log.error(f"Failed to fetch ICE configuration from {url}: {exc}")
    return [mod.IceServer(urls=DEFAULT_STUN)]


async def _wait_for_webrtc(
    request: Request, session_id: Optional[str], body: dict, budget: Optional[float], flow: Optional[str] = None
):
    """/bot with x-daily-transport-type: webrtc: wait for the offer, then for that bot() to end."""
    if _WEBRTC.pending is not None and not _WEBRTC.pending.finished.done():
        return JSONResponse(
            {"error": "already waiting for a WebRTC connection", "code": "SESSION_BUSY"}, status_code=409
        )
    loop = asyncio.get_running_loop()
    pending = _PendingWebRTC(session_id, body, budget, loop.create_future(), loop.create_future(), flow_config=flow)
    _WEBRTC.pending = pending
    log.info("Will wait for the webrtc_connection to be set!")

    def on_closed():
        pending.closed = True
        if pending.run is not None:
            _closed_by_client(pending.run)
        elif not pending.finished.done():
            log.info("The /bot request was closed by the platform; no longer waiting for an offer")
            pending.finished.set_result(Outcome("ok", reason=CLOSED_REASON))
            _exit_soon(0)

    watcher = asyncio.ensure_future(_watch_disconnect(request, on_closed))
    try:
        with contextlib.suppress(Exception):
            await _load_webrtc()  # warm the import while the client prepares its offer
        done, _ = await asyncio.wait(
            {pending.connected, pending.finished}, timeout=WEBRTC_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            log.error(f"Timeout waiting for WebRTC connection: no offer within {WEBRTC_TIMEOUT:g} seconds")
            return JSONResponse(
                {"error": f"WebRTC connection not received within {WEBRTC_TIMEOUT:g} seconds", "code": "WEBRTC_TIMEOUT"},
                status_code=500,
            )
        await asyncio.wait({pending.finished})
        return _outcome_response(pending.finished.result())
    finally:
        watcher.cancel()
        if _WEBRTC.pending is pending:
            _WEBRTC.pending = None
        if not pending.connected.done():
            pending.connected.cancel()


def _start_webrtc_session(connection, request_data, header_session_id: Optional[str]) -> None:
    pending = _WEBRTC.pending
    if pending is not None and pending.connected.done():
        pending = None  # that /bot already has its connection (renegotiations never get here)
    if pending is not None:
        pending.connected.set_result(True)
        log.info("Received the webrtc_connection, cancelling the timeout")
    session_id = header_session_id or (pending.session_id if pending else None) or ENV_SESSION_ID
    body = request_data if request_data else (pending.body if pending else None)
    budget = pending.budget if pending else None
    args = _make_args("webrtc", webrtc_connection=connection, body=body, session_id=session_id)
    _attach_flow_config(args, pending.flow_config if pending else None)

    def remember(run: _SessionRun) -> None:
        if pending is not None:
            pending.run = run
            if pending.closed:
                _closed_by_client(run)

    async def run():
        _SESSION.set(session_id)
        outcome = Outcome("ok", reason="cancelled")
        try:
            outcome = await _run_session(args, budget, on_run=remember)
        finally:
            if pending is not None and not pending.finished.done():
                pending.finished.set_result(outcome)

    task = asyncio.get_running_loop().create_task(run())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def handle_offer(request: Request):
    mod = await _load_webrtc()
    try:
        data = await request.json()
    except Exception:
        return JSONResponse({"error": "body must be JSON", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
    if not isinstance(data, dict) or "sdp" not in data or "type" not in data:
        return JSONResponse({"error": "expected {sdp, type, pc_id?, restart_pc?, request_data?}", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
    known = {"sdp", "type", "pc_id", "restart_pc", "request_data", "requestData"}
    try:
        offer = mod.SmallWebRTCRequest.from_dict({k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        return JSONResponse({"error": str(exc), "code": "GENERIC_BAD_REQUEST"}, status_code=400)
    header_session_id = request.headers.get("x-daily-session-id")
    pending = _WEBRTC.pending
    _SESSION.set(header_session_id or (pending.session_id if pending else None) or ENV_SESSION_ID)

    servers = await _ice_servers(mod)
    if hasattr(mod.handler, "update_ice_servers"):
        mod.handler.update_ice_servers(servers)
    else:
        mod.handler._ice_servers = servers  # noqa: SLF001 - older pipecat

    async def on_connection(connection):
        _start_webrtc_session(connection, offer.request_data, header_session_id)

    answer = await mod.handler.handle_web_request(request=offer, webrtc_connection_callback=on_connection)
    return JSONResponse(answer)


async def handle_offer_patch(request: Request):
    mod = await _load_webrtc()
    if mod.PatchRequest is None or not hasattr(mod.handler, "handle_patch_request"):
        return JSONResponse({"error": "trickle ICE needs pipecat-ai >= 0.0.91", "code": "NOT_SUPPORTED"}, status_code=501)
    try:
        data = await request.json()
        candidates = [
            mod.IceCandidate(
                candidate=c.get("candidate", ""),
                sdp_mid=c.get("sdp_mid", c.get("sdpMid")),
                sdp_mline_index=c.get("sdp_mline_index", c.get("sdpMLineIndex")),
            )
            for c in data.get("candidates") or []
        ]
        patch = mod.PatchRequest(pc_id=data["pc_id"], candidates=candidates)
    except Exception as exc:
        return JSONResponse({"error": f"invalid patch request: {exc}", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
    log.debug(f"Received patch request: {patch}")
    await mod.handler.handle_patch_request(patch)
    return {"status": "success"}


# ---------------------------------------------------------------------------------------------
# WhatsApp calling (the base image's /whatsapp): Meta's call events, forwarded by the platform
# ---------------------------------------------------------------------------------------------

WHATSAPP_ENV = ("WHATSAPP_TOKEN", "WHATSAPP_PHONE_NUMBER_ID", "WHATSAPP_APP_SECRET")


def _whatsapp_signature_ok(secret: str, raw: bytes, header: Optional[str]) -> bool:
    import hashlib
    import hmac

    if not header or not header.startswith("sha256="):
        return False
    want = hmac.new(secret.encode("utf-8"), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, header[len("sha256="):].strip().lower())


def _setup_whatsapp() -> None:
    """Serve ``POST /whatsapp`` as the base image does: only with SmallWebRTC, pipecat's
    ``WhatsAppClient`` (one that checks the app secret) and the three ``WHATSAPP_*`` secrets."""
    global _WHATSAPP_CLIENT
    missing = [k for k in WHATSAPP_ENV if not os.environ.get(k)]
    if missing:
        log.debug(f"WhatsApp disabled: {', '.join(missing)} not set")
        return
    if not _WEBRTC.available:
        log.warning("WhatsApp disabled: it needs SmallWebRTC (pipecat-ai[webrtc])")
        return
    try:
        from pipecat.transports.whatsapp.api import WhatsAppWebhookRequest
        from pipecat.transports.whatsapp.client import WhatsAppClient
    except Exception as exc:  # noqa: BLE001 - an old or broken pipecat
        log.warning(f"WhatsApp disabled: pipecat's WhatsApp client cannot be imported ({exc})")
        return
    if "whatsapp_secret" not in inspect.signature(WhatsAppClient).parameters:
        log.warning("WhatsApp disabled: it needs pipecat-ai >= 0.0.89")
        return
    token, phone_number_id, secret = (os.environ[k] for k in WHATSAPP_ENV)

    @contextlib.asynccontextmanager
    async def whatsapp_lifespan(_app):
        global _WHATSAPP_CLIENT
        import aiohttp

        async with aiohttp.ClientSession() as session:
            _WHATSAPP_CLIENT = WhatsAppClient(
                whatsapp_token=token, phone_number_id=phone_number_id, whatsapp_secret=secret, session=session
            )
            try:
                yield
            finally:
                client, _WHATSAPP_CLIENT = _WHATSAPP_CLIENT, None
                with contextlib.suppress(Exception):
                    await client.terminate_all_calls()

    add_lifespan_to_app(whatsapp_lifespan)

    async def handle_whatsapp(request: Request):
        raw = await request.body()
        try:
            body = WhatsAppWebhookRequest.model_validate_json(raw)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"error": f"invalid WhatsApp webhook: {exc}", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
        if body.object != "whatsapp_business_account":
            return JSONResponse({"error": "Invalid object type", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
        signature = request.headers.get("x-hub-signature-256")
        if not _whatsapp_signature_ok(secret, raw, signature):
            return JSONResponse(
                {"error": "x-hub-signature-256 does not match WHATSAPP_APP_SECRET", "code": "INVALID_SIGNATURE"},
                status_code=403,
            )
        client = _WHATSAPP_CLIENT
        if client is None:
            return JSONResponse({"error": "the WhatsApp client is not running", "code": "NOT_READY"}, status_code=503)
        mod = await _load_webrtc()
        servers = await _ice_servers(mod)
        if hasattr(client, "update_ice_servers"):
            client.update_ice_servers(servers)
        else:
            client._ice_servers = servers  # noqa: SLF001 - older pipecat
        header_session_id = request.headers.get("x-daily-session-id")

        async def on_connection(connection, call=None):  # (connection, call) on pipecat >= 1.4
            _start_webrtc_session(connection, None, header_session_id)

        try:
            result = await client.handle_webhook_request(
                body, on_connection, raw_body=raw, sha256_signature=signature
            )
        except ValueError as exc:
            log.warning(f"Invalid webhook request format: {exc}")
            return JSONResponse({"error": f"Invalid request: {exc}", "code": "GENERIC_BAD_REQUEST"}, status_code=400)
        except Exception as exc:  # noqa: BLE001
            log.error(f"Internal error processing webhook: {exc}")
            return JSONResponse(
                {"error": "Internal server error processing webhook", "code": "500"}, status_code=500
            )
        log.debug(f"Webhook processed successfully: {result}")
        return {"status": "success", "message": "Webhook processed successfully"}

    app.add_api_route("/whatsapp", handle_whatsapp, methods=["POST"])
    _system.WHATSAPP_AVAILABLE = True
    log.info("WhatsApp route enabled.")


# ---------------------------------------------------------------------------------------------
# ASGI wrapper: every request logs under the session named by its x-daily-session-id header
# ---------------------------------------------------------------------------------------------


class _SessionContext:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            session_id = None
            for key, value in scope.get("headers") or []:
                if key == b"x-daily-session-id":
                    session_id = value.decode("latin-1")
                    break
            token = _SESSION.set(session_id or ENV_SESSION_ID)
            try:
                await self.inner(scope, receive, send)
            finally:
                _SESSION.reset(token)
        else:
            await self.inner(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

_LOOP: Optional[asyncio.AbstractEventLoop] = None


def _force_exit() -> None:
    sys.stderr.write("cattery-runner: shutdown did not finish in time; exiting\n")
    sys.stderr.flush()
    os._exit(1)


class _Server(uvicorn.Server):
    """uvicorn, plus: SIGTERM cancels running sessions at once and the exit is bounded."""

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            if _LOOP is not None:
                with contextlib.suppress(RuntimeError):
                    _LOOP.call_soon_threadsafe(_cancel_all_sessions, f"runner received {signal.Signals(sig).name}")
            timer = threading.Timer(SHUTDOWN_TIMEOUT + 5.0, _force_exit)
            timer.daemon = True
            timer.start()

    @contextlib.contextmanager
    def capture_signals(self):
        # As uvicorn's, but the signal is not re-raised after shutdown: the exit code is 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def serve(self, sockets=None) -> None:
        global _LOOP
        _LOOP = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info(f"Runner ready on http://{HOST}:{PORT} ({time.monotonic() - _SPAWNED_AT:.2f} s after spawn)")


def _import_bot():
    if BOT_DIR not in sys.path:
        sys.path.insert(0, BOT_DIR)
    script_dir = os.path.dirname(os.path.abspath(__file__))
    if script_dir != BOT_DIR and script_dir in sys.path:
        sys.path.remove(script_dir)  # the data dir is not the bot's import root
    return importlib.import_module("bot")


def _prepare() -> Optional[int]:
    """Import bot.py and register the routes; an exit code when that fails."""
    global _BOT, _READYZ, _ARGS
    _configure_logging()
    log.info(f"Cattery runner starting (python {sys.version.split()[0]}, bot dir {BOT_DIR})")
    try:
        bot_module = _import_bot()
    except BaseException as exc:  # SyntaxError, ImportError, SystemExit from module code, ...
        _configure_logging()
        _log_exception(f"Failed to import bot.py from {BOT_DIR}: {type(exc).__name__}: {exc}", exc)
        return 3
    bot_fn = getattr(bot_module, "bot", None)
    _configure_logging()  # as the base image: the bot's own sinks are replaced by the session format
    if not callable(bot_fn):
        log.error(f"{getattr(bot_module, '__file__', 'bot.py')} defines no bot() function")
        return 3
    _BOT = bot_fn
    readyz = getattr(bot_module, "readyz", None)
    _READYZ = readyz if callable(readyz) else None
    # pipecat's import banner goes through our sink, before pipecatcloud's import replaces it.
    with contextlib.suppress(Exception):
        importlib.import_module("pipecat")
    _ARGS = _load_session_classes()
    _configure_logging()  # importing pipecatcloud resets loguru's sinks
    log.info(
        f"bot.py imported in {time.monotonic() - _SPAWNED_AT:.2f} s since spawn"
        f" (session arguments: {_ARGS['source']}, readyz: {'custom' if _READYZ else 'default'})"
    )

    # Routes are added after bot.py's own, as in the base image.
    app.add_api_route("/bot", handle_bot, methods=["POST"])
    app.add_api_websocket_route("/ws", handle_websocket)
    app.add_api_route("/readyz", handle_readyz, methods=["GET"])
    app.add_api_route("/livez", handle_livez, methods=["GET"])
    _WEBRTC.available = _webrtc_available()
    if _WEBRTC.available:
        app.add_api_route("/api/offer", handle_offer, methods=["POST"])
        app.add_api_route("/api/offer", handle_offer_patch, methods=["PATCH"])
    else:
        log.debug("SmallWebRTC not available (pipecat-ai[webrtc] not installed): /api/offer disabled")
    _setup_whatsapp()
    return None


def _uvicorn_config() -> "uvicorn.Config":
    return uvicorn.Config(
        _SessionContext(app),
        host=HOST,
        port=PORT,
        log_config=None,
        access_log=True,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
        server_header=False,
    )


def _serve() -> int:
    server = _Server(_uvicorn_config())
    _configure_stdlib_logging()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # uvicorn exits 3 on a bind error; 3 is ours for a broken bot.py
        if exc.code not in (0, None):
            server.started = False
    if not server.started:
        log.error("Runner failed to start")
        return 1
    log.info("Runner stopped")
    return 0


def main() -> int:
    code = _prepare()
    if code is not None:
        return code
    return _serve()


# ---------------------------------------------------------------------------------------------
# Fork server (``cattery_runner.py --zygote``): import once, fork one child per instance
# ---------------------------------------------------------------------------------------------
#
# Protocol on the SOCK_SEQPACKET socket the server passes as stdin, one message each:
#   zygote -> server  ``ready`` | ``unsafe <reason>`` | ``failed <code>``   (once, after import)
#   server -> zygote  JSON ``{"id", "env", "cwd"}`` with three descriptors: stdout, stderr, go
#   zygote -> server  ``pid <id> <pid>`` | ``err <id> <message>``
#   zygote -> server  ``exit <pid> <code or -> <signal or ->`` when a child ends
# A child blocks reading ``go`` until the server has moved it into its instance's cgroups and
# written one byte; end of file there means "never run": it exits 127 without touching the bot.


def fork_unsafe_reason() -> Optional[str]:
    """Why forking this interpreter would be unsafe now, or None.

    A thread alive after the import (a bot or library that starts one at import time) does not
    exist in a forked child, and any lock it held stays locked there forever.
    """
    threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        names = ", ".join(sorted(t.name for t in threads))
        return f"{len(threads) + 1} threads alive after importing bot.py ({names})"
    return None


def _zygote_prewarm() -> None:
    """Import what every child would import on its first request (uvicorn's protocols, SmallWebRTC)."""
    with contextlib.suppress(Exception):
        _uvicorn_config().load()
    if _WEBRTC.available:
        with contextlib.suppress(Exception):
            importlib.import_module("pipecat.transports.smallwebrtc.request_handler")
            importlib.import_module("pipecat.transports.smallwebrtc.connection")


def _zygote_child(env: dict, cwd: str, out_fd: int, err_fd: int, go_fd: int) -> int:
    """In a fresh fork: wait for the server's go, then become one instance of the bot."""
    global _SPAWNED_AT
    os.setsid()
    got = b""
    with contextlib.suppress(OSError):
        got = os.read(go_fd, 1)
    if got != b"1":
        os._exit(127)
    os.close(go_fd)
    _SPAWNED_AT = time.monotonic()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (devnull, out_fd, err_fd):
        os.close(fd)
    os.umask(0o022)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _load_settings()
    _configure_logging()
    log.info(f"Cattery runner forked from the fork server (python {sys.version.split()[0]}, bot dir {BOT_DIR})")
    return _serve()


def zygote_main() -> int:
    import selectors
    import socket

    code = _prepare()
    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if code is not None:
        ctl.send(f"failed {code}".encode())
        return code
    unsafe = fork_unsafe_reason()
    if unsafe is None:
        _zygote_prewarm()
        unsafe = fork_unsafe_reason()
    if unsafe is not None:
        log.warning(f"Not forking instances of this bot: {unsafe}")
        ctl.send(f"unsafe {unsafe}".encode())
        return 0
    # Everything imported so far is shared with the children copy-on-write; a collection in a
    # child must not touch (and so copy) it: move it out of the collector's generations.
    gc.collect()
    gc.freeze()
    idle = _env_float("CATTERY_ZYGOTE_IDLE_SECONDS", 600.0)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)

    def child(own: "socket.socket") -> None:
        """A spare: forked ahead of a request (so the fork is off the start's path), it waits
        for its request on ``own``; then the go pipe, then it becomes the instance."""
        code = 1
        try:
            sel.close()
            ctl.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            data, fds, _flags, _addr = socket.recv_fds(own, 1 << 20, 3)
            own.close()
            if not data or len(fds) != 3:
                os._exit(0)  # the fork server went away before using this spare
            req = json.loads(data)
            code = _zygote_child(req["env"], req["cwd"], fds[0], fds[1], fds[2])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                _log_exception(f"Runner failed: {type(exc).__name__}: {exc}", exc)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def fork_spare():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            child(theirs)
        theirs.close()
        return pid, ours

    spare = fork_spare()
    log.info(f"Fork server ready ({time.monotonic() - _SPAWNED_AT:.2f} s after spawn)")
    ctl.send(b"ready")
    last = time.monotonic()

    def reap() -> None:
        nonlocal spare
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if spare is not None and pid == spare[0]:
                spare[1].close()
                spare = None  # a spare died unused (killed from outside): not an instance
                continue
            if os.WIFEXITED(status):
                msg = f"exit {pid} {os.WEXITSTATUS(status)} -"
            elif os.WIFSIGNALED(status):
                msg = f"exit {pid} - {os.WTERMSIG(status)}"
            else:
                continue
            with contextlib.suppress(OSError):
                ctl.send(msg.encode())

    while True:
        events = sel.select(timeout=max(1.0, idle / 4))
        reap()
        if not events and idle > 0 and time.monotonic() - last > idle:
            log.info(f"Fork server idle for {idle:g} s; exiting")
            return 0
        for key, _ in events:
            if key.fileobj == wake_r:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 3)
            except OSError:
                return 0
            if not data:
                return 0  # the server went away; running children are not ours to end
            last = time.monotonic()
            req_id = "?"
            try:
                req = json.loads(data)
                req_id = str(req["id"])
                if len(fds) != 3:
                    raise ValueError(f"expected 3 descriptors, got {len(fds)}")
                if spare is None:
                    spare = fork_spare()
                pid, sock = spare
                spare = None
                socket.send_fds(sock, [data], fds)
                sock.close()
            except Exception as exc:  # noqa: BLE001 - reported to the server
                with contextlib.suppress(OSError):
                    ctl.send(f"err {req_id} {type(exc).__name__}: {exc}".encode())
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(OSError):
                ctl.send(f"pid {req_id} {pid}".encode())
            with contextlib.suppress(OSError):
                spare = fork_spare()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        sys.exit(zygote_main())
    sys.exit(main())
