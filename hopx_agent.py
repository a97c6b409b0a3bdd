#!/usr/bin/env python3
"""hopx_agent: an in-sandbox execution agent that speaks the HopX VM agent API.

The promise: one file, the Python standard library only, Python 3.9 or newer.
Copy it into any VM or container image and run it::

    python3 hopx_agent.py                      # serve on 127.0.0.1:7777
    python3 hopx_agent.py --host 0.0.0.0 --port 7777 --secret-file /etc/hopx.key
    python3 hopx_agent.py token --ttl 3600     # mint a JWT with the configured secret

Remote clients start programs in the background and get an id back at once,
list them with their status and output, read new output as it arrives, kill
them, and a watchdog ends whatever outlives its timeout. Every call but
/health, /ping and /info needs an HMAC-signed JWT (``Authorization: Bearer``).

Each child leads its own process group; kill and timeout signal the whole
group (SIGTERM, a grace period, SIGKILL). A process is finished when its
leader exits, not when its pipes close. Pipes are always drained into bounded
buffers that say what they dropped.

Nothing a client was promised is lost when the agent dies or is upgraded: a
journal in a private state directory (--state-dir) keeps every record, a
restarted agent ends what its dead predecessor left running and records it,
and SIGHUP (or POST /admin/restart) execs the file on disk in place, handing
over the running processes, their output and the open connections.

The file reads top to bottom, each section leaning only on those above it
(``grep -n '^# ==' hopx_agent.py`` is its table of contents): configuration,
errors, JWT, the process model and manager with its collaborators, the HTTP
transport (which knows no endpoint by name), then one section per family of
endpoints, each ending with its route table, and the entry points.

Public names (``__all__``): AgentConfig, AgentError and its subclasses,
verify_jwt, encode_jwt, ProcessManager, create_server, serve, main.
Importing the module starts nothing: no threads, sockets, signal handlers or
logging set-up until a ProcessManager is used or serve()/main() run.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import email.utils
import errno
import functools
import grp
import hashlib
import heapq
import hmac
import http.server
import io
import itertools
import json
import logging
import math
import mimetypes
import operator
import os
import posixpath
import pwd
import re
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from typing import AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

# ============================================================================
# Version and public names
# ============================================================================

__version__ = "0.1.0"

__all__ = [
    "AgentConfig",
    "AgentError",
    "BadRequest",
    "AuthError",
    "NotFound",
    "Conflict",
    "LimitExceeded",
    "Unavailable",
    "FileError",
    "verify_jwt",
    "encode_jwt",
    "ProcessManager",
    "create_server",
    "serve",
    "main",
]

log = logging.getLogger("hopx_agent")

# ============================================================================
# Constants and configuration
# ============================================================================

DEFAULT_HOST = "127.0.0.1"            # loopback unless the operator opens it up
DEFAULT_PORT = 7777                   # the HopX VM agent's port
KILL_GRACE_S = 3.0                    # SIGTERM -> SIGKILL: time for cleanup handlers
BACKGROUND_TIMEOUT_S = 300.0          # api.md §5 default for /execute/background
MAX_BACKGROUND_TIMEOUT_S = 7 * 86400  # a week; longer jobs belong to a service manager
SYNC_TIMEOUT_S = 60.0                 # api.md §6 default for /execute
MAX_SYNC_TIMEOUT_S = 300.0            # api.md §6: at most 300, 400 above
ASYNC_TIMEOUT_S = 3600.0              # api.md §6 default for /execute/async
MAX_OUTPUT_BYTES = 4 * 1024 * 1024    # per stream, newest bytes kept (api.md §5)
RETAIN_RECORDS = 1000                 # finished records kept, oldest evicted
OUTPUT_BUDGET_BYTES = 256 * 1024 * 1024   # output held by all finished records together
RECORD_CACHE_BYTES = 32 * 1024 * 1024     # listings' cached record JSON, least recently used dropped first
LISTING_STREAM_BYTES = 16 * 1024      # output a listing carries per stream and record (the newest bytes)
LISTING_OUTPUT_BYTES = 1024 * 1024    # output one listing carries in all; records share it equally
MAX_RUNNING = 64                      # children running at once; the rest queue
QUEUE_FACTOR = 10                     # queue holds this many times max-running, then 429
QUEUE_CODE_BYTES = 64 * 1024 * 1024   # code held by queued runs (written to files when they start), then 429
EXIT_POLL_S = 0.5                     # with no thread to wait for a leader, look this often
MAX_CONNECTIONS = 256                 # open client connections; one more gets 503
MAX_BODY_BYTES = 10 * 1024 * 1024     # api.md §10: larger bodies get 413 unread
MAX_REQUEST_LINE_BYTES = 8192         # longer request lines get 414
MAX_HEADER_LINE_BYTES = 8192          # one header line; longer gets 431
MAX_HEADER_BYTES = 64 * 1024          # all header lines together; more gets 431
MAX_HEADERS = 100                     # header lines per request; more gets 431
REQUEST_DEADLINE_S = 30.0             # from a request's first byte to its last body byte
KEEPALIVE_IDLE_S = 30.0               # an idle kept-alive connection is closed after this
KEEPALIVE_LINGER_S = 0.002            # a request thread waits this long for the next request before the hub does
WRITE_TIMEOUT_S = 30.0                # a client that does not read its answer is dropped
MAX_WAIT_S = 60.0                     # api.md §5: ?wait= is capped at 60 s
MAX_TOKEN_BYTES = 8192                # api.md §2: longer tokens are refused unparsed
JWT_LEEWAY_S = 30.0                   # api.md §2: clock skew tolerated on exp/nbf/iat
JWT_ALGORITHMS = ("HS256", "HS384", "HS512")
TOKEN_TTL_S = 86400                   # lifetime of minted tokens unless --ttl says otherwise
MIN_SECRET_BYTES = 32                 # shorter HMAC keys get a warning (RFC 7518 §3.2)
READ_CHUNK_BYTES = 256 * 1024         # one os.readv() per wake-up of a reader thread (a chatty child)
READ_SMALL_BYTES = 16 * 1024          # ... until a read fills this much: an idle pooled reader keeps only this
PIPE_SIZE_BYTES = 1024 * 1024         # F_SETPIPE_SZ: fewer wake-ups for chatty children
BLOCK_BYTES = 64 * 1024               # output buffers grow in blocks of this size
DRAIN_AFTER_EXIT_S = 0.5              # after the leader exits, wait this long for pipe EOF
HEAP_TRIM_BYTES = 1024 * 1024         # freed since the last malloc_trim before another is worth it
HEAP_TRIM_INTERVAL_S = 1.0            # at most one malloc_trim a second (each walks every arena: ~1 ms)
HEAP_TRIM_DELAY_S = 0.1               # a trim waits this long: the request that freed has sent its answer
WORKER_RESERVE = 6                    # idle pooled threads kept ready: a start never waits for new ones
WORKER_IDLE_S = 2.0                   # a pooled thread beyond the reserve ends after this long idle
MAX_NAME_CHARS = 256                  # process names are labels, not payloads
ENV_ENTRY_BYTES = 128 * 1024          # Linux MAX_ARG_STRLEN: one "NAME=value" longer than this fails exec
ENV_STORE_BYTES = 256 * 1024          # the global env store in all: every later execution must still start
ENV_STORE_VARS = 1024                 # variables in the global env store
EXEC_ARGS_BYTES = 1536 * 1024         # argv + environment of one child, below ARG_MAX (2 MiB with an 8 MiB stack)
SECRET_ENV = "HOPX_AGENT_SECRET"      # never passed on to a child
PROCESS_ID_ENV = "HOPX_PROCESS_ID"    # every child carries its own record id, to find escapers
STDIN_WRITE_TIMEOUT_S = 5.0           # a child that does not read its stdin cannot hold a thread longer
ESCAPER_GONE_S = 1.0                  # after its SIGKILL, how long an escaped descendant may take to exit
IDEMPOTENCY_WAIT_S = 10.0             # a retry waits this long for the first request with its key
LANGUAGES_CACHE_S = 5.0               # /health and /info see a language installed (or removed) within this
# files (issue 12)
FILES_MAX_READ_BYTES = 10 * 1024 * 1024     # api.md §11: /files/read answers in JSON; more goes to download
FILES_MAX_LIST_ENTRIES = 10000              # api.md §11: entries in one /files/list answer
FILES_CHUNK_BYTES = 1024 * 1024             # one read or write of an upload, a tar member, a copy
FILES_MAX_SYMLINKS = 40                     # Linux's MAXSYMLINKS: more links in one lookup is a loop
FILES_MAX_PATH_BYTES = 4096                 # PATH_MAX: a longer request path is refused unwalked
FILES_TEMP_PREFIX = ".hopx-tmp-"            # named temp files (no O_TMPFILE); watchers never report them
FILES_WRITEBACK_BYTES = 8 * 1024 * 1024     # a large write starts writeback this often: the final fsync stays short
FILES_MAX_PART_HEADER_BYTES = 16 * 1024     # the headers of one multipart part
FILES_MAX_FIELD_BYTES = 64 * 1024           # one multipart form field that is not the file
FILES_MULTIPART_SLACK_BYTES = 64 * 1024     # Content-Length allowed over --max-upload-bytes for the framing
FILES_TAR_GZIP_LEVEL = 6                    # gzip's own default
WATCH_COALESCE_S = 0.05                     # changes of one path within this window are reported once
WATCH_POLL_S = 0.5                          # the polling watcher scans this often
WATCH_MAX_PENDING = 4096                    # events held for a slow client; more is an overflow
WATCH_MAX_DIRS = 8192                       # inotify watches of one watcher (the kernel's budget is per user)
WATCH_MAX_POLL_ENTRIES = 100000             # entries a polling watcher remembers; more is an overflow
# Terminals and ptys (issue 14, api.md §12; the rest is in "Terminals: pty sessions")
TERMINAL_LINGER_S = 300.0             # a detached terminal session waits this long for a reattach
MAX_TERMINALS = 32                    # terminal sessions at once, live or lingering
PTY_TERM = "xterm-256color"           # TERM of every child on a pty
MAX_PTY_SIZE = 1000                   # cols and rows: 1..1000 (struct winsize holds 16 bits)

# limits, users and the agent's own safety (issue 15, api.md §14)
AGENT_OOM_SCORE_ADJ = -1000           # the OOM killer never picks the agent (needs CAP_SYS_RESOURCE)
CHILD_OOM_SCORE_ADJ = 500             # ...and picks a runaway child first
MIB = 1024 * 1024
CPU_PERIOD_US = 100_000               # CFS period for cpu_limit; the quota is cores * period
MIN_CPU_LIMIT = 0.01                  # 1 ms of quota per 100 ms period: the kernel's floor (cfs_quota_us >= 1000)
FREEZE_WAIT_S = 1.0                   # api.md §14: v1 kill waits about 1 s for FROZEN
CGROUP_EMPTY_WAIT_S = 2.0             # killed members leave the cgroup within this (else: retried later)
GATE_EXIT_CODE = 125                  # the gate shell's exit when the agent let go without releasing it
CGROUP_RUNS_PREFIX = "hopx-runs-"     # <agent's cgroup>/hopx-runs-<pid>-<token>/<execution>
CGROUP_AGENT_LEAF = "hopx-agent"      # v2: the leaf the agent moves into (no-internal-processes rule)

# api.md §14 limits: field -> (integer only, smallest, largest, unit shown in messages).
_LIMIT_FIELDS: Dict[str, Tuple[bool, float, float, str]] = {
    "memory_limit_mb": (False, 1.0, float(1 << 20), "MiB"),            # up to 1 TiB
    "cpu_limit": (False, MIN_CPU_LIMIT, 1024.0, "cores"),
    "pids_limit": (True, 1, 4_194_304, "processes"),                   # the kernel's PID_MAX_LIMIT
    "cpu_time_limit_s": (False, 0.001, 366.0 * 86400, "seconds"),      # a year of CPU time
    "file_size_limit_mb": (False, 0.001, float(1 << 24), "MiB"),       # up to 16 TiB
}
_CGROUP_LIMITS = ("memory_limit_mb", "cpu_limit", "pids_limit")        # need a cgroup (or an rlimit stand-in)
_MECHANISMS = ("cgroup_v2", "cgroup_v1", "rlimit")

_F_SETPIPE_SZ = 1031                  # fcntl command number on Linux (not in fcntl before 3.10)

# Contexts (issue 13, api.md §13)
CONTEXT_IDLE_TIMEOUT_S = 3600.0       # idle named contexts end after this
MAX_CONTEXTS = 16                     # named contexts at once; the default one is not counted
PYTHON_KERNEL_MODES = ("off", "lazy", "prestart")   # --python-kernel: the default context


def _default_workdir() -> str:
    """api.md §1: /workspace when it exists, else the directory we started in."""
    return "/workspace" if os.path.isdir("/workspace") else os.getcwd()


class _Factory:
    """A _Plain field's default made afresh for each instance (a list, a dict)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


class _DataclassFields:
    """``__dataclass_fields__`` of a _Plain class, made on first use from a
    dataclass of the same fields: dataclasses.replace(), fields(), asdict()
    and is_dataclass() work on AgentConfig as on the dataclass it was, while
    the agent itself never imports dataclasses."""

    def __init__(self, name: str) -> None:
        self.name = name                # __dataclass_fields__ or __dataclass_params__

    def __get__(self, obj: Any, cls: type) -> Any:
        import dataclasses
        specs = []
        for name in cls._fields:
            default = cls._defaults.get(name, dataclasses.MISSING)
            if isinstance(default, _Factory):
                spec = dataclasses.field(default_factory=default.make, repr=name not in cls._hidden)
            else:
                spec = dataclasses.field(default=default, repr=name not in cls._hidden)
            specs.append((name, cls._types[name], spec))
        made = dataclasses.make_dataclass(cls.__name__, specs, frozen=cls._frozen)
        type.__setattr__(cls, "__dataclass_fields__", made.__dataclass_fields__)   # made once per class
        type.__setattr__(cls, "__dataclass_params__", made.__dataclass_params__)   # a @dataclass subclass reads it
        return getattr(cls, self.name)


class _Plain:
    """A record class, as a dataclass would make it, without making one:
    @dataclass compiles generated source for each class at import (1-2 ms
    each, ~15 ms for the agent's under load) and ``import dataclasses``
    pulls in ``inspect`` (~10 ms): a fifth of the module's start-up.

    Fields are the class's annotations in order; a class attribute is the
    default (``_Factory(list)`` for a fresh one each time). Construction by
    position or keyword, ``__post_init__``, equality, repr (but ``_hidden``
    fields) and, with ``frozen=True``, hashing and no assignment."""

    _fields: Tuple[str, ...] = ()
    _types: Dict[str, Any] = {}
    _defaults: Dict[str, Any] = {}
    _hidden: Tuple[str, ...] = ()
    _frozen = False

    def __init_subclass__(cls, frozen: Optional[bool] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        annotations = cls.__dict__.get("__annotations__", {})
        own = tuple(annotations)
        cls._types = dict(cls._types, **annotations)
        # a subclass keeps its bases' fields (and frozen-ness), as a dataclass would
        cls._fields = tuple(name for name in cls._fields if name not in own) + own
        cls._defaults = dict(cls._defaults)
        cls._defaults.update((name, cls.__dict__[name]) for name in own if name in cls.__dict__)
        for name in own:
            if isinstance(cls.__dict__.get(name), _Factory):
                delattr(cls, name)         # instances have the value; the class keeps no factory to leak
        cls.__match_args__ = cls._fields
        for name in ("__dataclass_fields__", "__dataclass_params__"):   # each class its own (not a base's)
            type.__setattr__(cls, name, _DataclassFields(name))
        if frozen is None:
            return                         # a subclass inherits frozen-ness with the methods that make it
        cls._frozen = frozen
        if frozen:
            cls.__setattr__ = _Plain._refuse      # type: ignore[assignment]
            cls.__delattr__ = _Plain._refuse      # type: ignore[assignment]
            cls.__hash__ = lambda self: hash(self._values())   # type: ignore[assignment]
        else:
            cls.__hash__ = None                    # type: ignore[assignment]  # as a dataclass with eq

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self._fields):
            raise TypeError("%s takes %d arguments" % (type(self).__name__, len(self._fields)))
        values = dict(zip(self._fields, args))
        for name, value in kwargs.items():
            if name not in self._fields or name in values:
                raise TypeError("%s got an unexpected or repeated argument %r" % (type(self).__name__, name))
            values[name] = value
        for name in self._fields:
            if name not in values:
                if name not in self._defaults:
                    raise TypeError("%s is missing argument %r" % (type(self).__name__, name))
                default = self._defaults[name]
                values[name] = default.make() if isinstance(default, _Factory) else default
            object.__setattr__(self, name, values[name])
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def _refuse(self, name: str, *value: Any) -> None:
        import dataclasses              # only on this error path: the error a frozen dataclass raises
        raise dataclasses.FrozenInstanceError("cannot assign to field %r of a frozen %s"
                                              % (name, type(self).__name__))

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def _replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (dataclasses.replace)."""
        return type(self)(**dict({name: getattr(self, name) for name in self._fields}, **changes))

    __replace__ = _replace              # copy.replace() (Python 3.13)

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self._fields if name not in self._hidden))


class AgentConfig(_Plain, frozen=True):
    """Everything the agent is configured with; filled by main() from flags and
    HOPX_AGENT_* variables, or built directly by embedders and tests. A frozen
    record (``dataclasses.replace(config, port=0)`` works, as on a dataclass)."""

    _hidden = ("secret",)                 # never in its repr

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workdir: str = _Factory(_default_workdir)   # type: ignore[assignment]
    secret: Optional[bytes] = None
    auth: bool = True
    max_running: int = MAX_RUNNING
    max_output_bytes: int = MAX_OUTPUT_BYTES
    retain: int = RETAIN_RECORDS
    output_budget: int = OUTPUT_BUDGET_BYTES
    kill_grace: float = KILL_GRACE_S
    max_connections: int = MAX_CONNECTIONS
    algorithms: Tuple[str, ...] = JWT_ALGORITHMS
    leeway: float = JWT_LEEWAY_S
    audience: Optional[str] = None
    issuer: Optional[str] = None
    request_deadline: float = REQUEST_DEADLINE_S
    log_level: str = "info"
    log_format: str = "text"
    # limits, users and the agent's own safety (issue 15, api.md §14)
    limits_mechanism: str = "auto"                 # auto, cgroup_v2, cgroup_v1 or rlimit
    default_memory_limit_mb: Optional[float] = None
    default_cpu_limit: Optional[float] = None
    default_pids_limit: Optional[int] = None
    default_cpu_time_limit_s: Optional[float] = None
    default_file_size_limit_mb: Optional[float] = None
    run_as: Optional[str] = None                   # children's user unless a request names one
    agent_oom_score_adj: Optional[int] = AGENT_OOM_SCORE_ADJ   # None: leave the agent's own alone
    child_oom_score_adj: Optional[int] = CHILD_OOM_SCORE_ADJ   # None: what the agent had at start
    # files (issue 12)
    files_roots: Optional[Tuple[str, ...]] = None     # None: the working directory and the temp directory
    max_read_bytes: int = FILES_MAX_READ_BYTES
    max_upload_bytes: Optional[int] = None            # None: no limit but the disk
    # contexts (issue 13)
    python_kernel: str = "lazy"
    max_contexts: int = MAX_CONTEXTS
    context_idle_timeout: float = CONTEXT_IDLE_TIMEOUT_S
    # Terminals (issue 14)
    terminal_linger: float = TERMINAL_LINGER_S
    max_terminals: int = MAX_TERMINALS
    # durability (issue 16): where the journal lives; None: no journal (embedders,
    # tests; main() fills in a default per port, see _default_state_dir)
    state_dir: Optional[str] = None

    @property

    def queue_limit(self) -> int:
        return self.max_running * QUEUE_FACTOR

    def limits(self) -> Dict[str, Any]:
        """The limits in force, as /info reports them."""
        return {
            "max_running": self.max_running,
            "max_queued": self.queue_limit,
            "max_output_bytes": self.max_output_bytes,
            "retain": self.retain,
            "output_budget_bytes": self.output_budget,
            "kill_grace_s": self.kill_grace,
            "max_connections": self.max_connections,
            "max_body_bytes": MAX_BODY_BYTES,
            "request_deadline_s": self.request_deadline,
            "max_background_timeout_s": MAX_BACKGROUND_TIMEOUT_S,
            "max_sync_timeout_s": MAX_SYNC_TIMEOUT_S,
            "max_wait_s": MAX_WAIT_S,
            "files_max_read_bytes": self.max_read_bytes,
            "files_max_upload_bytes": self.max_upload_bytes,
            "files_max_list_entries": FILES_MAX_LIST_ENTRIES,
            "python_kernel": self.python_kernel,
            "max_contexts": self.max_contexts,
            "context_idle_timeout_s": self.context_idle_timeout,
            "terminal_linger_s": self.terminal_linger,
            "max_terminals": self.max_terminals,
        }


def _rfc3339(ts: Optional[float]) -> Optional[str]:
    """RFC 3339 UTC with milliseconds and a Z, or None."""
    if ts is None:
        return None
    whole = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % int((ts - whole) * 1000)

# ============================================================================
# Errors
# ============================================================================


class AgentError(Exception):
    """An error with its HTTP status and api.md §3 code; endpoints raise it and
    the dispatcher turns it into the JSON error body (with ``details`` when
    there are any: the SDK reads ``details.path`` and ``details.missing_dependencies``)."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.details = details

    def to_json(self, *, request_id: str = "", path: str = "") -> Dict[str, Any]:
        body = {"error": self.message, "message": self.message, "code": self.code,
                "request_id": request_id, "path": path, "timestamp": _rfc3339(time.time())}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(AgentError):
    status, code = 400, "INVALID_REQUEST"


class AuthError(AgentError):
    status, code = 401, "INVALID_TOKEN"

    def __init__(self, message: str = "invalid token", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="hopx-agent"')


class NotFound(AgentError):
    status, code = 404, "RESOURCE_NOT_FOUND"


class Conflict(AgentError):
    status, code = 409, "CONFLICT"


class LimitExceeded(AgentError):
    status, code = 429, "RESOURCE_LIMIT_ERROR"


class Unavailable(AgentError):
    status, code = 503, "SERVICE_UNAVAILABLE"


# ============================================================================
# JWT (RFC 7519 over RFC 7515 compact JWS, HMAC only)
# ============================================================================

_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url: no padding, no +/, and canonical trailing bits, so
    that one token has exactly one spelling (RFC 7515 §2, RFC 4648 §3.5)."""
    if len(segment) % 4 == 1 or not _B64URL_RE.fullmatch(segment):
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64url_encode(raw) != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _unique_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj: Dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate key %r" % key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _strict_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: UTF-8, no NaN/Infinity, no duplicate keys."""
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object,
                      parse_constant=_reject_constant)


def _json_object(raw: bytes) -> Dict[str, Any]:
    obj = _strict_json(raw)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def _numeric_claim(claims: Dict[str, Any], name: str) -> Optional[float]:
    """A NumericDate (RFC 7519 §2): a finite number, and a bool is not one."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("invalid token: %s is not a number" % name)
    if isinstance(value, float) and not math.isfinite(value):
        raise AuthError("invalid token: %s is not finite" % name)
    return value


def encode_jwt(claims: Dict[str, Any], secret: bytes, alg: str = "HS256") -> str:
    """Sign claims as a compact JWS with an HMAC algorithm."""
    if alg not in _HASHES:
        raise ValueError("unsupported algorithm %r" % alg)
    header = _b64url_encode(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = (header + "." + payload).encode("ascii")
    signature = hmac.new(secret, signing_input, _HASHES[alg]).digest()
    return header + "." + payload + "." + _b64url_encode(signature)


def _verify_jwt(token: str, secret: bytes, algorithms: Iterable[str], leeway: float,
                audience: Optional[str], issuer: Optional[str], now: float) -> Dict[str, Any]:
    if not isinstance(token, str) or not token:
        raise AuthError("invalid token")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("invalid token: too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("invalid token: not a compact JWS")
    header = _json_object(_b64url_decode(parts[0]))
    alg = header.get("alg")
    # Pinned algorithms: the header names one, the configuration decides.
    if not isinstance(alg, str) or alg not in algorithms or alg not in _HASHES:
        raise AuthError("invalid token: algorithm not accepted")
    if "crit" in header:
        raise AuthError("invalid token: critical header parameters are not supported")
    signature = _b64url_decode(parts[2])
    expected = hmac.new(secret, (parts[0] + "." + parts[1]).encode("ascii"), _HASHES[alg]).digest()
    if not hmac.compare_digest(signature, expected):
        raise AuthError("invalid token: bad signature")
    claims = _json_object(_b64url_decode(parts[1]))
    exp = _numeric_claim(claims, "exp")
    if exp is None:
        raise AuthError("invalid token: exp is required")
    if now - leeway >= exp:  # compared, not added: exp may be an int beyond float range
        raise AuthError("token expired")
    nbf = _numeric_claim(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise AuthError("invalid token: not yet valid")
    iat = _numeric_claim(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise AuthError("invalid token: issued in the future")
    if audience is not None:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in [a for a in auds if isinstance(a, str)]:
            raise AuthError("invalid token: wrong audience")
    if issuer is not None and claims.get("iss") != issuer:
        raise AuthError("invalid token: wrong issuer")
    return claims


def verify_jwt(token: str, secret: bytes, *, algorithms: Iterable[str] = JWT_ALGORITHMS,
               leeway: float = JWT_LEEWAY_S, audience: Optional[str] = None,
               issuer: Optional[str] = None, now: Optional[float] = None) -> Dict[str, Any]:
    """Verify an HMAC-signed compact JWT and return its claims.

    A pure function: the clock is ``now`` (seconds since the epoch) when given.
    Any failure raises AuthError and nothing else; its message never echoes
    the token.
    """
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    try:
        return _verify_jwt(token, secret, tuple(algorithms), leeway, audience, issuer,
                           time.time() if now is None else now)
    except AuthError:
        raise
    except Exception:  # malformed input of any kind is one and the same answer
        raise AuthError("invalid token: malformed") from None


# ============================================================================
# Shared helpers: JSON, digits, request fields
# ============================================================================


def _json_bytes(payload: Any) -> bytes:
    # ensure_ascii keeps lone surrogates from a client's JSON encodable
    return json.dumps(payload, separators=(",", ":")).encode("ascii")


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses."""
    return text.isascii() and text.isdigit()


# -- request body fields: every family parses its JSON bodies with these -------


def _text(value: Any, field: str, *, nul_ok: bool = False) -> str:
    """A string that can reach the OS: UTF-8 encodable and without NUL bytes."""
    if not isinstance(value, str):
        raise BadRequest("field %r must be a string" % field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("field %r is not valid Unicode (unpaired surrogate)" % field) from None
    if not nul_ok and "\x00" in value:
        raise BadRequest("field %r must not contain NUL bytes" % field)
    return value


def _opt_text(body: Dict[str, Any], field: str, *, max_chars: Optional[int] = None) -> Optional[str]:
    value = body.get(field)
    if value is None:
        return None
    value = _text(value, field)
    if max_chars is not None and len(value) > max_chars:
        raise BadRequest("field %r is longer than %d characters" % (field, max_chars))
    return value


def _required_text(body: Dict[str, Any], field: str, *, nul_ok: bool = False) -> str:
    if body.get(field) is None:
        raise BadRequest("missing required field %r" % field, code="MISSING_PARAMETER")
    return _text(body[field], field, nul_ok=nul_ok)


def _number(value: Any, field: str, low: float, high: float) -> float:
    # math.isfinite() of an int beyond float range raises: test floats only, compare ints as they are
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise BadRequest("field %r must be a number" % field)
    if not low < value <= high:
        raise BadRequest("field %r must be more than %g and at most %g" % (field, low, high))
    return float(value)


def _timeout(body: Dict[str, Any], default: float, maximum: float) -> float:
    value = body.get("timeout")
    return default if value is None else _number(value, "timeout", 0, maximum)


def _idle_timeout(body: Dict[str, Any]) -> Optional[float]:
    value = body.get("idle_timeout")
    return None if value is None else _number(value, "idle_timeout", 0, MAX_BACKGROUND_TIMEOUT_S)


def _env_map(value: Any, field: str) -> Dict[str, str]:
    """Environment variables: names without "=" or NUL, each "NAME=value" short
    enough for exec (ENV_ENTRY_BYTES; 413 beyond)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("field %r must be an object of strings" % field)
    for key, item in value.items():
        _text(key, field + " key")
        if not key or "=" in key:
            raise BadRequest("%s key %r is not a valid variable name (empty, or has '=')" % (field, key[:64]))
        if not isinstance(item, str):
            raise BadRequest("%s value for %r must be a string" % (field, key[:64]))
        _text(item, "%s[%s]" % (field, key[:64]))
        size = len(key.encode("utf-8")) + len(item.encode("utf-8")) + 2
        if size > ENV_ENTRY_BYTES:
            raise AgentError("%s[%s] is %d bytes; a variable can be at most %d (what exec takes)"
                             % (field, key[:64], size, ENV_ENTRY_BYTES), status=413, code="PAYLOAD_TOO_LARGE")
    return dict(value)


def _env_bytes(env: Dict[str, str]) -> int:
    """What an environment takes in a child's exec: each "NAME=value\0" and its pointer."""
    return sum(len(k.encode("utf-8", "surrogateescape")) + len(v.encode("utf-8", "surrogateescape")) + 2 + 8
               for k, v in env.items())


def _flag(body: Dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise BadRequest("field %r must be true or false" % field)
    return value


def _pty_dimension(value: Any, field: str, default: int) -> int:
    """``cols`` or ``rows`` of a terminal: an integer from 1 to MAX_PTY_SIZE
    (digits too, as a query string has them); ``default`` when absent."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and _is_digits(value) and len(value) <= 6:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PTY_SIZE:
        raise BadRequest("field %r must be an integer from 1 to %d" % (field, MAX_PTY_SIZE))
    return value


def _pty_field(body: Dict[str, Any], allowed: bool) -> Optional[Tuple[int, int]]:
    """api.md §12: ``"pty": true`` with ``cols``/``rows`` (default 80x24), or None.
    Offered on background starts only: a run that waits has nobody to type."""
    if not _flag(body, "pty"):
        return None
    if not allowed:
        raise BadRequest("field 'pty' is offered on /execute/background, /commands/background "
                         "and /execute/async only")
    return _pty_dimension(body.get("cols"), "cols", 80), _pty_dimension(body.get("rows"), "rows", 24)


def _workdir(body: Dict[str, Any]) -> Optional[str]:
    """api.md §8: ``workdir``, else ``working_dir``."""
    value = body.get("workdir")
    return _opt_text(body, "workdir" if value is not None else "working_dir")


# ============================================================================
# Process model: output buffers, records, languages
# ============================================================================


def _incomplete_utf8_tail(tail: bytes) -> int:
    """How many bytes at the end of ``tail`` start a UTF-8 character that is
    not complete yet (0 when the data ends on a character boundary)."""
    for back in range(1, min(4, len(tail)) + 1):
        byte = tail[-back]
        if byte & 0xC0 == 0x80:          # continuation byte: keep looking back
            continue
        need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
        return back if need > back else 0
    return 0


class _OutputBuffer:
    """The newest ``cap`` bytes of one stream, in blocks, with absolute offsets.

    Offset 0 is the first byte the child ever wrote; ``total`` counts every
    byte, ``dropped`` those that fell out of the window. The window always
    starts on a character boundary, and readers of a live stream are given
    only complete characters, so UTF-8 is never split. Not thread-safe: the
    record's condition guards it.
    """

    __slots__ = ("cap", "total", "_blocks", "_held", "_cache")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        # A list, not a deque: ~600 bytes less per buffer (each retained record has two);
        # a trim shifts at most cap / BLOCK_BYTES entries.
        self._blocks: List[bytearray] = []
        self._held = 0
        self._cache: Optional[Tuple[int, str]] = None   # (end offset, text) of the last full read

    @property
    def held(self) -> int:
        return self._held

    @property
    def dropped(self) -> int:
        return self.total - self._held

    def append(self, data: Any) -> None:
        size = len(data)
        if not size:
            return
        self.total += size
        self._cache = None
        if size >= self.cap:
            self._blocks.clear()
            self._held = 0
            data = data[size - self.cap:] if self.cap else b""
        last = self._blocks[-1] if self._blocks else None
        if last is not None and len(last) + len(data) <= BLOCK_BYTES:
            last += data
        else:
            self._blocks.append(bytearray(data))
        self._held += len(data)
        if self._held > self.cap or size >= self.cap:   # the window moved: realign its start
            self._trim(self._held - self.cap)
            self._align_start()

    def _trim(self, excess: int) -> None:
        while excess > 0 and self._blocks:
            first = self._blocks[0]
            if len(first) <= excess:
                del self._blocks[0]
                excess -= len(first)
                self._held -= len(first)
            else:
                del first[:excess]       # O(1) at the front of a bytearray
                self._held -= excess
                excess = 0

    def _align_start(self) -> None:
        """Drop continuation bytes at the front left by a trim mid-character
        (looking across blocks: a character may straddle two)."""
        if self.dropped and self._blocks:
            head = self._slice(self.dropped, self.dropped + 3)
            skip = 0
            while skip < len(head) and head[skip] & 0xC0 == 0x80:
                skip += 1
            if skip:
                self._trim(skip)

    def char_start(self, offset: int) -> int:
        """The first character boundary at or after ``offset`` (within the
        window; invalid bytes count as characters)."""
        head = self._slice(offset, offset + 3)
        skip = 0
        while skip < len(head) and head[skip] & 0xC0 == 0x80:
            skip += 1
        return offset + skip

    def discard(self) -> int:
        """Drop everything held (the output budget needs the room); returns the bytes freed."""
        freed = self._held
        self._blocks.clear()
        self._held = 0
        self._cache = None
        return freed

    def end(self, final: bool) -> int:
        """The offset up to which a reader may take bytes now."""
        if final or not self._blocks:
            return self.total
        tail = self._blocks[-1][-4:]
        if len(tail) < 4 and len(self._blocks) > 1:
            tail = (self._blocks[-2][-4:] + tail)[-4:]
        return max(self.dropped, self.total - _incomplete_utf8_tail(bytes(tail)))

    def _slice(self, start: int, stop: int) -> bytes:
        pos = self.dropped
        parts = []
        for block in self._blocks:
            block_end = pos + len(block)
            if block_end > start and pos < stop:
                parts.append(memoryview(block)[max(0, start - pos):min(len(block), stop - pos)])
            pos = block_end
            if pos >= stop:
                break
        return b"".join(parts)

    def tail(self, final: bool, limit: int) -> Tuple[str, int, int]:
        """The newest ``limit`` bytes up to the readable end, from a character
        boundary: (text, start, stop) as read() returns them."""
        stop = self.end(final)
        start = max(self.dropped, stop - limit)
        if start > self.dropped:             # cut inside the window: start on a character boundary
            head = self._slice(start, min(stop, start + 3))
            skip = 0
            while skip < len(head) and head[skip] & 0xC0 == 0x80:
                skip += 1
            start += skip
        return (self._slice(start, stop).decode("utf-8", "replace") if stop > start else ""), start, stop

    def read(self, offset: Optional[int], final: bool, limit: Optional[int] = None) -> Tuple[str, int, int]:
        """Text from ``offset`` (None: the whole window) to the readable end,
        at most ``limit`` bytes of it (cut on a character boundary).

        Returns (text, start, stop): ``start`` is where the text begins (later
        than ``offset`` when that fell out of the window), ``stop`` is the
        offset to continue from.
        """
        stop = self.end(final)
        start = self.dropped if offset is None else min(max(offset, self.dropped), stop)
        if limit is not None and stop - start > limit:
            data = self._slice(start, min(stop, start + limit + 3))
            cut = limit
            while cut > limit - 3 and cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1            # do not split a character (invalid bytes: cut anyway)
            if cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut = limit
            return data[:cut].decode("utf-8", "replace"), start, start + cut
        if offset is None and self._cache is not None and self._cache[0] == stop:
            return self._cache[1], start, stop
        text = self._slice(start, stop).decode("utf-8", "replace") if stop > start else ""
        if offset is None:
            self._cache = (stop, text)
        return text, start, stop


_FINAL_STATUSES = ("completed", "failed")
_STATUSES = ("queued", "running") + _FINAL_STATUSES
_TIMEOUT_REASONS = ("timeout", "idle_timeout")     # reported with exit code 124, as timeout(1) does


def _signal_name(signum: Optional[int]) -> Optional[str]:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "SIG%d" % signum


def _parse_signal(value: Any) -> int:
    """A signal given as a name ("SIGINT", "int") or a number (2, "2")."""
    if isinstance(value, str) and _is_digits(value.strip()):
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if value in {int(s) for s in signal.Signals}:
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        member = getattr(signal.Signals, name, None)
        if member is not None and not name.startswith("SIG_"):
            return int(member)
    raise BadRequest("unknown signal: %r" % (value,))


class _Launch(_Plain):
    """What to run: argv, where, with which environment, and the temp file to
    remove when it ends. Built by the HTTP layer, consumed by the manager.

    For code, ``code`` and ``code_argv`` stand in for argv until the process
    starts: the code file is written then, so a queued run holds no file."""

    argv: List[str]
    cwd: str
    env: Dict[str, str]
    kind: str = "code"                 # "code" or "command"
    language: Optional[str] = None
    command: Optional[str] = None
    name: Optional[str] = None
    timeout: float = BACKGROUND_TIMEOUT_S
    stdin: bool = False
    tempfile: Optional[str] = None
    idle_timeout: Optional[float] = None   # end the process after this long without output
    limits: Optional["_LimitValues"] = None    # api.md §14, validated (section "Children: limits")
    user: Optional["_RunAs"] = None
    pty: Optional[Tuple[int, int]] = None  # (cols, rows): run on a pseudo-terminal (api.md §12)
    code: Optional[bytes] = None           # the code to write to a file when the process starts
    code_suffix: str = ""
    code_argv: Optional[Callable[[str], List[str]]] = None   # argv for the code file's path
    code_prefix: str = "hopx-"             # the code file's name: durability names it after the state dir

    def prepare(self) -> None:
        """Write the code file (just before the spawn) and make the argv that
        runs it. The file is 0600 and, with a ``user``, owned by that user:
        readable by it and by nobody else."""
        if self.code is not None and self.code_argv is not None and self.tempfile is None:
            other = self.user is not None and not self.user.is_current
            self.tempfile = _write_code_file(self.code, self.code_suffix, self.code_prefix,
                                             (self.user.uid, self.user.gid) if other and self.user else None)
            if self.user is not None and not self.user.is_current:
                os.chown(self.tempfile, self.user.uid, self.user.gid)   # on failure cleanup() removes it
            self.argv = self.code_argv(self.tempfile)

    def cleanup(self) -> None:
        if self.tempfile:
            try:
                os.unlink(self.tempfile)
            except OSError:
                pass
            self.tempfile = None


class _Usage(collections.namedtuple("_Usage", "ru_utime ru_stime ru_maxrss")):
    """The part of a resource.struct_rusage a record shows (kept by a final
    record instead of the whole struct; restored from the journal)."""


_NO_STRAGGLERS: frozenset = frozenset()   # a record's until it has one (a set each: 216 bytes)


class _ProcessRecord:
    """One execution: its launch, its child, its output and its outcome."""

    # Slots: a retained record costs ~1.2 KiB less than with a __dict__ (more
    # than 30 attributes: CPython shares no dict keys between instances). A new
    # attribute must be named here.
    __slots__ = ("id", "execution_id", "launch", "cond", "status", "reason", "exit_code", "signal", "error",
                 "pid", "popen", "reaped", "kill_reason", "created", "started", "started_mono", "ended",
                 "duration", "rusage", "stdout", "stderr", "open_streams", "extra", "confinement", "usage",
                 "on_finish", "timer", "idle_timer", "accounted", "last_output", "stdin_busy",
                 "stdin_closed", "pty_eof", "stragglers", "idempotency_key", "exit_info", "prereaped",
                 "changes", "seq", "fseq", "starttime", "boot_id", "final_hook", "fds", "readers", "timers",
                 "journaled", "idempotency", "cgroups", "output_waiters")

    def __init__(self, launch: _Launch, cap: int) -> None:
        self.id = "proc_" + secrets.token_hex(12)       # unguessable, not a pid
        self.execution_id = "exec_" + secrets.token_hex(12)
        self.launch = launch
        self.cond = threading.Condition()  # guards every field below that changes after creation
        self.status = "queued"
        self.reason: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.signal: Optional[str] = None
        self.error: Optional[str] = None
        self.pid: Optional[int] = None
        self.popen: Optional[subprocess.Popen] = None
        self.reaped = False                # leader reaped: its pid may be reused, never signal it
        self.kill_reason: Optional[str] = None   # "killed" | "timeout" | "shutdown" once asked to end
        self.created = time.time()
        self.started: Optional[float] = None
        self.started_mono: Optional[float] = None
        self.ended: Optional[float] = None
        self.duration: Optional[float] = None
        self.rusage: Optional[Any] = None
        self.stdout = _OutputBuffer(cap)
        self.stderr = _OutputBuffer(cap)
        self.open_streams = 0              # reader threads not yet at EOF
        self.extra: Dict[str, Any] = {}    # e.g. webhook delivery state, shown in the record
        self.confinement: Optional["_Confinement"] = None   # its cgroup and user, set at spawn
        self.usage: Dict[str, Any] = {}    # with cgroups: memory_peak_mb, oom_kills (api.md §14)
        self.on_finish: List[Callable[["_ProcessRecord"], None]] = []
        self.timer: Optional[_Timer] = None  # the timeout, cancelled when the record ends
        self.idle_timer: Optional[_Timer] = None  # the idle timeout's next check, likewise
        self.accounted = 0                 # output bytes counted in the manager's budget
        self.last_output: Optional[float] = None  # monotonic time of the newest output (idle timeout)
        # The offsets each thread waiting on cond for new output waits past
        # (stream -> offset); only output past one of them wakes the waiters.
        self.output_waiters: Optional[List[Dict[str, int]]] = None
        self.stdin_busy = False            # a write to stdin is in progress (one at a time)
        self.stdin_closed = not launch.stdin
        self.pty_eof: Optional[bytes] = None   # on a pty: what "eof" writes (VEOF, ^D) instead of closing
        self.stragglers: AbstractSet[int] = _NO_STRAGGLERS   # marked processes outside the group that we ended
        self.idempotency_key: Optional[str] = None
        self.exit_info: Optional[Tuple[Optional[int], Any]] = None   # (wait status, rusage) once reaped
        self.prereaped: Optional[Tuple[int, Any]] = None   # the same, where wait4 had to reap to wait
        self.changes = 0                   # bumped by changes to_json cannot see in its cache key
        # durability (issue 16): what the journal and an upgrade need of the record
        self.seq = 0                       # creation order (the listing's), from the registry
        self.fseq = 0                      # the order it became final in (retention's)
        self.starttime: Optional[int] = None   # the leader's start (clock ticks since boot): proof after a crash
        self.boot_id: Optional[str] = None
        self.final_hook: Optional[Callable[["_ProcessRecord"], None]] = None  # set_final calls it, cond held
        self.fds: Dict[str, int] = {}      # output pipes not at EOF yet, by stream: an upgrade hands them over
        self.readers = 0                   # reader jobs submitted and not returned (an upgrade restarts parked ones)
        self.timers: Dict[str, _Timer] = {}   # "escalate", "drain": pending deadlines an upgrade carries over
        self.journaled = False             # the journal has its start (so a later spawn is journaled too)
        self.idempotency: Optional[List[Any]] = None   # [key, request digest, first answer], kept with it
        self.cgroups: List[str] = []       # the record's cgroup directories (issue 15), swept after a crash

    @property
    def finished(self) -> bool:
        return self.status in _FINAL_STATUSES

    def stream(self, name: str) -> _OutputBuffer:
        return self.stdout if name == "stdout" else self.stderr

    def cache_key(self, queue_position: Optional[int]) -> Tuple[Any, ...]:
        """What the record's JSON depends on, for _RecordCache. Call with ``cond`` held."""
        return (queue_position, self.status, self.pid, self.stdout.total, self.stdout.held,
                self.stderr.total, self.stderr.held, self.stdin_closed, len(self.stragglers), self.changes)

    def set_final(self, reason: str, exit_code: Optional[int], signame: Optional[str]) -> None:
        """Make the record final and wake its waiters. Call with ``cond`` held."""
        self.reason, self.exit_code, self.signal = reason, exit_code, signame
        self.status = "completed" if reason == "exited" and exit_code == 0 else "failed"
        self.ended = time.time()
        self.duration = round(time.monotonic() - self.started_mono, 6) if self.started_mono else 0.0
        if self.final_hook is not None:     # the journal: the outcome is written before anyone sees it
            self.final_hook(self)
        self.cond.notify_all()

    def compact(self) -> None:
        """Once final, drop what only a live child needs: the Popen (unless a
        stdin write still holds its pipe), the child's environment, the code
        (in its file, or never run) and the confinement. A retained record
        keeps what it reports; ~3 KiB less each, more with large code. Call
        with ``cond`` held."""
        if self.popen is not None and not self.stdin_busy and (self.stdin_closed or self.popen.stdin is None):
            self.popen = None
        self.launch.env = {}
        self.launch.code = None
        self.confinement = None            # finished before the record was final: its cgroups are gone
        usage = self.rusage
        if usage is not None and not isinstance(usage, _Usage):     # 3 of struct_rusage's 16 fields
            self.rusage = _Usage(usage.ru_utime, usage.ru_stime, usage.ru_maxrss)
            if self.exit_info is not None:
                self.exit_info = (self.exit_info[0], self.rusage)
            self.prereaped = None

    def to_json(self, *, output: bool = True, offsets: Optional[Dict[str, Optional[int]]] = None,
                queue_position: Optional[int] = None, cap: Optional[int] = None) -> Dict[str, Any]:
        """The process record of api.md §5. Call with ``cond`` held. With
        ``cap`` (listings), each stream carries its newest ``cap`` bytes at most,
        with ``*_offset`` where that text starts and ``*_truncated`` when older
        kept bytes were left out (GET /execute/processes/{id} has them)."""
        launch = self.launch
        rec: Dict[str, Any] = {
            "process_id": self.id, "execution_id": self.execution_id, "name": launch.name,
            "kind": launch.kind, "language": launch.language, "command": launch.command,
            "pid": self.pid, "status": self.status, "reason": self.reason,
            "exit_code": self.exit_code, "signal": self.signal,
            "started_at": _rfc3339(self.started), "completed_at": _rfc3339(self.ended),
            "execution_time": self.duration, "start_time": _rfc3339(self.started),
            "end_time": _rfc3339(self.ended), "duration": self.duration,
            "created_at": _rfc3339(self.created), "timeout": launch.timeout,
            "working_dir": launch.cwd,
        }
        if queue_position is not None:
            rec["queue_position"] = queue_position
        if self.error is not None:
            rec["error"] = self.error
        final = self.finished
        for name in ("stdout", "stderr"):
            buf = self.stream(name)
            if output and cap is not None:
                text, start, stop = buf.tail(final, cap)
                rec[name], rec[name + "_offset"], rec[name + "_next_offset"] = text, start, stop
                rec[name + "_truncated"] = start > buf.dropped
            elif output:
                offset = offsets.get(name) if offsets else None
                text, start, stop = buf.read(offset, final)
                rec[name] = text
                rec[name + "_next_offset"] = stop
                if offsets is not None:
                    rec[name + "_offset"] = start
                    rec[name + "_skipped"] = max(0, start - offset) if offset is not None else 0
            rec[name + "_bytes"] = buf.total
            rec[name + "_dropped"] = buf.dropped
        rec["stdin"] = "closed" if self.stdin_closed else "open"
        if launch.pty:
            rec["pty"] = {"cols": launch.pty[0], "rows": launch.pty[1]}
        if launch.idle_timeout:
            rec["idle_timeout"] = launch.idle_timeout
        if self.stragglers:
            rec["stragglers_killed"] = len(self.stragglers)
        if self.rusage is not None:
            rec["cpu_user_s"] = round(self.rusage.ru_utime, 6)
            rec["cpu_system_s"] = round(self.rusage.ru_stime, 6)
            rec["max_rss_kb"] = self.rusage.ru_maxrss
        rec.update(self.usage)
        if launch.limits is not None and launch.limits.given():
            rec["limits"] = launch.limits.given()
        if launch.user is not None:
            rec["user"] = launch.user.name
        rec.update(self.extra)
        return rec



@contextlib.contextmanager
def _waiting_for_output(rec: _ProcessRecord, marks: Dict[str, int]) -> Iterator[None]:
    """While the caller waits on ``rec.cond`` (held) for output past ``marks``:
    readers wake it for such output only (see _Lifecycle._read_stream)."""
    if rec.output_waiters is None:
        rec.output_waiters = []
    rec.output_waiters.append(marks)
    try:
        yield
    finally:
        rec.output_waiters.remove(marks)
        if not rec.output_waiters:
            rec.output_waiters = None


class _RecordCache:
    """The records' JSON as listings send it, kept until the record changes,
    so that listing a thousand finished records encodes none of them again.
    Bounded in bytes (the least recently used entries go first); this is the
    cache /cache/stats reports and /cache/clear empties."""

    def __init__(self, budget: int) -> None:
        self._lock = threading.Lock()   # guards every field below; a leaf: nothing is taken under it
        self._entries: "collections.OrderedDict[Tuple[str, bool], Tuple[Any, bytes]]" = collections.OrderedDict()
        self._bytes = 0
        self._budget = budget
        self._hits = 0
        self._misses = 0

    def get(self, rec: _ProcessRecord, *, output: bool, queue_position: Optional[int],
            cap: Optional[int] = None) -> bytes:
        """The record as JSON bytes (a listing's, output capped at ``cap``),
        from the cache when unchanged. Call with ``rec.cond`` held."""
        key = (cap,) + rec.cache_key(queue_position)
        ident = (rec.id, output)
        with self._lock:
            entry = self._entries.get(ident)
            if entry is not None and entry[0] == key:
                self._entries.move_to_end(ident)
                self._hits += 1
                return entry[1]
            self._misses += 1
        data = _json_bytes(rec.to_json(output=output, queue_position=queue_position, cap=cap))
        with self._lock:
            self._drop(ident)
            if len(data) <= self._budget:
                self._entries[ident] = (key, data)
                self._bytes += len(data)
                while self._bytes > self._budget:
                    self._drop(next(iter(self._entries)))
        return data

    def _drop(self, ident: Tuple[str, bool]) -> int:
        entry = self._entries.pop(ident, None)
        size = len(entry[1]) if entry is not None else 0
        self._bytes -= size
        return size

    def forget(self, record_id: str) -> None:
        """A record left the agent: its entries go too."""
        with self._lock:
            self._drop((record_id, True))
            self._drop((record_id, False))

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            lookups = self._hits + self._misses
            return {"hits": self._hits, "misses": self._misses,
                    "hit_rate": round(self._hits / lookups, 4) if lookups else 0.0,
                    "size": self._bytes, "count": len(self._entries), "max_size": self._budget}

    def clear(self) -> Dict[str, Any]:
        with self._lock:
            count, freed = len(self._entries), self._bytes
            self._entries.clear()
            self._bytes = 0
        return {"message": "cache cleared", "entries_removed": count, "cleared_entries": count,
                "freed_bytes": freed}


# Languages of api.md §4: canonical name -> (aliases, program candidates, argv builder, suffix).
_LANGUAGES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Callable[[str, str], List[str]], str]] = {
    "python": (("python3", "py"), ("python3",), lambda prog, path: [prog, path], ".py"),
    "javascript": (("js", "node", "nodejs"), ("node", "nodejs"), lambda prog, path: [prog, path], ".js"),
    "bash": ((), ("bash",), lambda prog, path: [prog, path], ".sh"),
    "sh": (("shell",), ("/bin/sh",), lambda prog, path: [prog, path], ".sh"),
    "go": ((), ("go",), lambda prog, path: [prog, "run", path], ".go"),
}
_LANGUAGE_ALIASES = {alias: name for name, spec in _LANGUAGES.items() for alias in (name,) + spec[0]}


def _find_program(language: str) -> Optional[str]:
    """The interpreter for a canonical language name, or None if not installed."""
    for candidate in _LANGUAGES[language][1]:
        found = shutil.which(candidate)
        if found:
            return found
    if language == "python":
        return sys.executable or None
    return None


def _languages_installed() -> Dict[str, Dict[str, Any]]:
    found = {name: _find_program(name) for name in _LANGUAGES}
    return {name: {"aliases": list(spec[0]), "program": found[name], "available": found[name] is not None}
            for name, spec in _LANGUAGES.items()}


class _Recent:
    """A value computed again once it is older than ``max_age_s``. /health is
    polled, and each language look-up walks PATH (~50 stat calls for all of
    them, a millisecond: 4x the rest of a /health answer)."""

    def __init__(self, compute: Callable[[], Any], max_age_s: float) -> None:
        self._compute = compute
        self._max_age_s = max_age_s
        self._lock = threading.Lock()      # guards _value (computed outside it: two may race, both right)
        self._value: Optional[Tuple[float, Any]] = None   # (monotonic expiry, value)

    def get(self) -> Any:
        now = time.monotonic()
        with self._lock:
            cached = self._value
        if cached is not None and now < cached[0]:
            return cached[1]
        value = self._compute()
        with self._lock:
            self._value = (now + self._max_age_s, value)
        return value


def _resolve_language(value: Any) -> Tuple[str, str]:
    """(canonical name, program) for a request's language, or BadRequest."""
    if value is None:
        value = "python"
    if not isinstance(value, str):
        raise BadRequest("language must be a string")
    name = _LANGUAGE_ALIASES.get(value.strip().lower())
    if name is None:
        raise BadRequest("unknown language %r; known: %s" % (value, ", ".join(sorted(_LANGUAGE_ALIASES))))
    program = _find_program(name)
    if program is None:
        raise BadRequest("language %r needs %s, which is not installed"
                         % (name, " or ".join(_LANGUAGES[name][1])))
    return name, program


def _searchable_by(path: str, uid: int, gid: int) -> bool:
    """Can that user reach files in ``path`` (search permission all the way down)?"""
    import stat
    parts = os.path.realpath(path).split(os.sep)
    for n in range(1, len(parts) + 1):
        try:
            st = os.stat(os.sep.join(parts[:n]) or os.sep)
        except OSError:
            return False
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _write_code_file(code: bytes, suffix: str, prefix: str = "hopx-", for_user: Optional[Tuple[int, int]] = None) -> str:
    """The code in a private (0600) temp file, so there is no argv length limit
    and tracebacks name a real file. A full disk removes the partial file. An
    agent with a journal names it after its state directory (``prefix``), so a
    restart finds what a crash left. For another user (``for_user``), a temp
    directory that user cannot reach (a private TMPDIR) gives way to /tmp."""
    import tempfile  # imported here: it costs import time and is needed only to run code
    directory = None
    if for_user is not None and not _searchable_by(tempfile.gettempdir(), *for_user):
        if not _searchable_by("/tmp", *for_user):
            raise BadRequest("no temp directory that user %d may reach for the code file" % for_user[0])
        directory = "/tmp"
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(code)
    except BaseException:
        os.unlink(path)
        raise
    return path


# ============================================================================
# Watchdog: one thread, one deadline heap, for every timer of the agent
# ============================================================================


class _Timer:
    __slots__ = ("deadline", "seq", "fn")

    def __init__(self, deadline: float, seq: int, fn: Optional[Callable[[], None]]) -> None:
        self.deadline, self.seq, self.fn = deadline, seq, fn

    def __lt__(self, other: "_Timer") -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def cancel(self) -> None:
        self.fn = None                     # drops the reference to the record at once


class _Watchdog:
    """Runs callbacks at monotonic deadlines on one thread (started on first
    use). Sleeps without a timeout when nothing is due: no polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()  # guards _heap, _seq, _stopped, _thread
        self._heap: List[_Timer] = []
        self._seq = 0
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        # Held by an upgrade in place while it takes its snapshot: callbacks
        # wait here (taken around each one, never while holding _cond).
        self.gate = threading.Lock()

    def ensure_running(self) -> None:
        """Start the thread now if it is not running; RuntimeError when it cannot be."""
        with self._cond:
            if self._thread is None and not self._stopped:
                thread = threading.Thread(target=self._run, name="hopx-watchdog", daemon=True)
                thread.start()           # raises before we remember it: a later call tries again
                self._thread = thread

    def schedule(self, delay: float, fn: Callable[[], None]) -> _Timer:
        self.ensure_running()
        with self._cond:
            self._seq += 1
            timer = _Timer(time.monotonic() + delay, self._seq, fn)
            heapq.heappush(self._heap, timer)
            if self._heap[0] is timer:
                self._cond.notify()
            return timer

    def _due(self) -> List[_Timer]:
        """Wait for the next deadline; return the timers due, [] when stopped."""
        with self._cond:
            while not self._stopped:
                while self._heap and self._heap[0].fn is None:
                    heapq.heappop(self._heap)      # cancelled: discard lazily
                now = time.monotonic()
                if self._heap and self._heap[0].deadline <= now:
                    due = []
                    while self._heap and self._heap[0].deadline <= now:
                        due.append(heapq.heappop(self._heap))
                    return due
                self._cond.wait(self._heap[0].deadline - now if self._heap else None)
            return []

    def _run(self) -> None:
        while True:
            due = self._due()
            if not due:
                return
            for timer in due:
                with self.gate:
                    fn, timer.fn = timer.fn, None
                    if fn is None:
                        continue
                    try:
                        fn()
                    except Exception:
                        log.exception("watchdog callback failed")

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def pending(self, timer: Optional[_Timer]) -> Optional[float]:
        """The monotonic deadline of ``timer`` if it has neither run nor been cancelled."""
        return timer.deadline if timer is not None and timer.fn is not None else None


def _malloc_trim_function() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        import ctypes
        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class _HeapTrim:
    """Gives freed heap back to the system after a lot was freed.

    Output blocks are filled by pooled reader threads, each with its own glibc
    arena; a retained record's small objects pin the top of those arenas, so
    megabytes freed below them stay in the process (an agent that served
    256 MiB of output kept ~200 MiB of it). ``malloc_trim(0)`` returns every
    free page of every arena. Whoever freed a lot (retention, the output
    budget, a listing) calls ``freed``; past HEAP_TRIM_BYTES, one trim runs
    on the watchdog's thread, at most once per HEAP_TRIM_INTERVAL_S.
    """

    def __init__(self, schedule: Callable[[float, Callable[[], None]], Any],
                 trim: Optional[Callable[[int], int]] = None) -> None:
        self._schedule = schedule
        self._trim_fn = trim
        self._lock = threading.Lock()   # guards _freed, _pending, _last, trims
        self._freed = 0                 # bytes reported freed since the last trim
        self._pending = False           # a trim is scheduled
        self._last = -HEAP_TRIM_INTERVAL_S
        self.trims = 0

    def freed(self, nbytes: int) -> None:
        if self._trim_fn is None:
            return
        with self._lock:
            self._freed += nbytes
            if self._pending or self._freed < HEAP_TRIM_BYTES:
                return
            self._pending = True
            delay = max(HEAP_TRIM_DELAY_S, self._last + HEAP_TRIM_INTERVAL_S - time.monotonic())
        try:
            self._schedule(delay, self._run)
        except RuntimeError:            # no watchdog thread to be had: the next report tries again
            with self._lock:
                self._pending = False

    def _run(self) -> None:
        with self._lock:
            self._freed, self._pending, self._last = 0, False, time.monotonic()
            self.trims += 1
        fn = self._trim_fn
        if fn is not None:
            fn(0)                       # through ctypes: the GIL is released meanwhile


# ============================================================================
# Threads of the process manager: the worker pool and the exit watcher
# ============================================================================

_THREAD_STATE = threading.local()       # per-thread scratch buffers of the pipe readers


def _grow_pipe(fd: int) -> None:
    """Ask for a larger pipe (Linux): a chatty child then wakes its reader less often."""
    try:
        import fcntl
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE_BYTES)
    except (ImportError, OSError):
        pass


def _close_quietly(fd: Optional[int]) -> None:
    """Close a descriptor that may be gone already (or None: nothing to close)."""
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass


class _WorkerPool:
    """Named threads for the blocking work of each process (two pipe readers
    and a leader waiter), reused, with a few kept idle in reserve.

    Thread.start() waits until the new thread runs; starting three per child
    on the request path would cost more than the fork itself. Here a start
    hands its jobs to waiting threads, and a thread that takes a job tops the
    reserve up itself, off the request path. Idle threads beyond the reserve
    end after WORKER_IDLE_S; those in it wait without a timeout (no polling).
    """

    def __init__(self, reserve: int = WORKER_RESERVE) -> None:
        self._cond = threading.Condition(threading.Lock())  # guards every field below
        self._jobs: collections.deque = collections.deque()
        self._idle = 0
        self._threads: set = set()
        self._stopped = False
        self._seq = 0
        self._reserve = reserve

    def submit(self, name: str, fn: Callable[..., None], *args: Any, wake: bool = True) -> None:
        """Run ``fn(*args)`` on a pooled thread named ``name`` while it runs.
        ``wake=False``: an idle thread is counted for the job but woken only by
        ``wake()`` (one that wakes by itself meanwhile takes the job anyway)."""
        with self._cond:
            if self._stopped:       # a start that raced shutdown still gets its threads
                threading.Thread(target=fn, args=args, name=name, daemon=True).start()
                return
            job = (name, fn, args)
            self._jobs.append(job)
            if self._idle >= len(self._jobs):
                if wake:
                    self._cond.notify()
                return
        try:
            self._grow()        # the reserve ran out: this start pays for a new thread
        except RuntimeError:    # none to be had (a pids or memory limit): take the job back, say so
            with self._cond:
                if job in self._jobs and self._idle < len(self._jobs):
                    self._jobs.remove(job)
                    raise Unavailable("no thread is available to run %s" % name) from None

    def wake(self, n: int) -> None:
        """Wake idle threads for ``n`` jobs submitted with ``wake=False``."""
        with self._cond:
            self._cond.notify(n)

    def _grow(self) -> None:
        with self._cond:
            if self._stopped:
                return
            self._seq += 1
            thread = threading.Thread(target=self._work, name="hopx-worker-%d" % self._seq, daemon=True)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:     # never started: stop() must not join it
            with self._cond:
                self._threads.discard(thread)
            raise

    def _next_job(self) -> Optional[Tuple[str, Callable[..., None], Tuple[Any, ...], bool]]:
        """Wait for a job; None when this thread should end. The flag says
        whether the reserve needs a new thread."""
        with self._cond:
            while not self._jobs:
                if self._stopped:
                    return None
                spare = self._idle >= self._reserve
                self._idle += 1
                notified = self._cond.wait(WORKER_IDLE_S if spare else None)
                self._idle -= 1
                if not notified and not self._jobs and self._idle >= self._reserve:
                    return None
            name, fn, args = self._jobs.popleft()
            return name, fn, args, self._idle < self._reserve and not self._stopped

    def _work(self) -> None:
        me = threading.current_thread()
        idle_name = me.name
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                name, fn, args, top_up = job
                if top_up:
                    try:
                        self._grow()
                    except RuntimeError:     # the reserve stays short; this job runs anyway
                        pass
                me.name = name
                try:
                    fn(*args)
                except Exception:
                    log.exception("%s failed", name)
                finally:
                    me.name = idle_name
        finally:
            with self._cond:
                self._threads.discard(me)

    def stop(self, timeout: float) -> None:
        """Idle threads end now; busy ones when their job ends (joined until ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Parking:
    """Lets the readers of children's output stop between two reads when an
    upgrade in place asks, leaving what is unread in the pipe (or pty) for
    the successor: the offset handed over is exactly where reading stopped.

    A reader job is counted from its submission (submit()) to its return,
    so park() also waits for jobs not started yet (they see the request and
    return before reading). A reader polls its descriptor together with this
    wake-up pipe and reads its (non-blocking) descriptor until it is empty
    before it polls again: a flood costs one poll per emptied pipe, not one
    per read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())  # guards _active, _pipe
        self.requested = False   # read by readers between reads without the lock: a stale False costs one read
        self._active = 0         # reader jobs submitted and not returned
        self._pipe: Optional[Tuple[int, int]] = None

    def submit(self, workers: "_WorkerPool", name: str, fn: Callable[..., None], *args: Any,
               wake: bool = True) -> None:
        """Run a reader job on the pool, counted until it returns."""
        with self._cond:
            self._active += 1
        try:
            workers.submit(name, self._run, fn, args, wake=wake)
        except BaseException:      # no thread to be had: the job never runs
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
            raise

    def _run(self, fn: Callable[..., None], args: Tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def poller(self, fd: int) -> Any:
        """A poll set for a reader of ``fd`` (made non-blocking) and the wake-up pipe."""
        with self._cond:
            if self._pipe is None:
                self._pipe = os.pipe()
            wake = self._pipe[0]
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        return poller

    def park(self, timeout: float) -> bool:
        """Ask every reader to stop; True once all have (within ``timeout``)."""
        with self._cond:
            self.requested = True
            if self._pipe is not None:
                os.write(self._pipe[1], b"p")        # level-triggered: wakes every poller until unpark
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def unpark(self) -> None:
        """The upgrade did not happen: readers may be submitted again."""
        with self._cond:
            self.requested = False
            if self._pipe is not None:
                os.set_blocking(self._pipe[0], False)
                try:
                    os.read(self._pipe[0], 64)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        """Close the wake-up pipe, unless a reader still polls it (a closed fd would make it spin)."""
        with self._cond:
            if self._active:
                return
            pipe, self._pipe = self._pipe, None
        for fd in pipe or ():
            _close_quietly(fd)


def _read_parkable(fd: int, parking: _Parking, scratch: bytearray, deliver: Callable[[memoryview], None]) -> bool:
    """Read ``fd`` into ``deliver`` until EOF (True) or until parking is
    requested (False: ``fd`` is left open, just after the last byte
    delivered). A pty master's EIO (its other side closed) counts as EOF."""
    view = memoryview(scratch)
    poller = parking.poller(fd)
    empty = True
    while not parking.requested:
        if empty:
            poller.poll()
            empty = False
            continue
        try:
            size = os.readv(fd, [scratch])
        except BlockingIOError:
            empty = True
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return True
            raise
        if not size:
            return True
        deliver(view[:size])
        if size == len(scratch) < READ_CHUNK_BYTES:
            # A chatty child: a big buffer for this descriptor only, so the idle
            # threads of the pool keep their small one each, not this.
            scratch = bytearray(READ_CHUNK_BYTES)
            view = memoryview(scratch)
    return False


class _ExitWatcher:
    """One thread that learns of every leader's exit: each leader's pidfd
    (Linux 5.3+) in one epoll set, so no thread per process sits waiting for
    its leader. watch() says False where pidfds or epoll are missing, and the
    caller falls back to a waiter job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _callbacks, _epoll, _thread, _stopped, _wake
        self._callbacks: Dict[int, Callable[[], None]] = {}   # pidfd -> what to run on exit
        self._epoll: Any = None
        self._wake: Optional[Tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self.gate = threading.Lock()   # held by an upgrade in place: exit handlers wait (see _Watchdog.gate)

    def watch(self, pid: int, on_exit: Callable[[], None]) -> bool:
        if not hasattr(os, "pidfd_open") or not hasattr(select, "epoll"):
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        with self._lock:
            try:
                if self._stopped:
                    raise RuntimeError("stopped")
                if self._epoll is None:
                    self._start()
                # epoll_ctl while another thread sits in epoll_wait is safe; the wait sees it
                self._epoll.register(pidfd, select.EPOLLIN)
                self._callbacks[pidfd] = on_exit
                return True
            except (OSError, ValueError, RuntimeError) as exc:   # the caller falls back to a waiter job
                log.debug("exit watcher unavailable for pid %d: %s", pid, exc)
                os.close(pidfd)
                return False

    def ensure_running(self) -> None:
        """Start the epoll set and its thread now (where pidfds exist); OSError
        or RuntimeError when that cannot be done."""
        if not hasattr(os, "pidfd_open") or not hasattr(select, "epoll"):
            return
        with self._lock:
            if self._epoll is None and not self._stopped:
                self._start()

    def _start(self) -> None:
        """The epoll set, its wake-up pipe and the thread (with ``_lock`` held)."""
        epoll = select.epoll()
        wake = os.pipe()
        try:
            epoll.register(wake[0], select.EPOLLIN)
            thread = threading.Thread(target=self._run, args=(epoll,), name="hopx-exits", daemon=True)
            thread.start()
        except BaseException:
            epoll.close()
            for fd in wake:
                os.close(fd)
            raise
        self._epoll, self._wake, self._thread = epoll, wake, thread

    def _run(self, epoll: Any) -> None:
        while True:
            try:
                events = epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):     # closed under us: stop() gave up waiting
                return
            for fd, _ in events:
                with self.gate:
                    if not self._handle(epoll, fd):
                        return

    def _handle(self, epoll: Any, fd: int) -> bool:
        """Run the exit callback of one readable pidfd; False once stopped."""
        with self._lock:
            if self._stopped:
                return False
            on_exit = self._callbacks.pop(fd, None)
        if on_exit is None:
            return True
        try:
            epoll.unregister(fd)
            os.close(fd)
            on_exit()
        except Exception:      # one failure must not end the watch for every process
            log.exception("exit handling failed")
        return True

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopped = True
            thread, wake = self._thread, self._wake
            self._thread = self._wake = None
        if thread is None or wake is None:
            return                  # never started, or stopped already
        os.write(wake[1], b"x")
        thread.join(timeout)
        if thread.is_alive():      # still inside an exit handler: leave it its descriptors
            return
        with self._lock:
            for fd in list(self._callbacks) + list(wake):
                _close_quietly(fd)
            self._callbacks.clear()
            self._epoll.close()


# ============================================================================
# Children: limits, users and the agent's own safety (api.md §14)
# ============================================================================
#
# How a child is confined, in order, without Python code between fork and
# exec (the agent is threaded: no preexec_fn):
#
#   1. the agent makes the child's cgroups and writes their limits;
#   2. Popen starts ``/bin/sh -c '<preludes>' [dropper] argv`` whose stdin is
#      the read end of a "gate" pipe; the shell sets its oom_score_adj and
#      waits on the gate (``read``) before anything else;
#   3. the agent writes the child's pid into every cgroup.procs, sets its
#      rlimits with prlimit(2), and only then writes a line into the gate;
#   4. the shell restores the real stdin, then execs the dropper (which
#      drops root for ``user``) or the program itself.
#
# So the child is in all its cgroups, under its rlimits, before it runs any
# user code and before it drops root. A plain start (no limits, no user)
# needs only the oom_score_adj prelude; with nothing to do it stays a direct exec.


class _LimitValues(_Plain, frozen=True):
    """The limits of one execution (None: no limit); values validated."""

    memory_limit_mb: Optional[float] = None
    cpu_limit: Optional[float] = None
    pids_limit: Optional[int] = None
    cpu_time_limit_s: Optional[float] = None
    file_size_limit_mb: Optional[float] = None

    def given(self) -> Dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and every start calls this several times.
        return {name: getattr(self, name) for name in _LIMIT_FIELDS if getattr(self, name) is not None}

    @property
    def needs_cgroup(self) -> bool:
        return any(getattr(self, name) is not None for name in _CGROUP_LIMITS)

    def over(self, defaults: "_LimitValues") -> "_LimitValues":
        """These values, with ``defaults`` where none was given."""
        merged = defaults.given()
        merged.update(self.given())
        return _LimitValues(**merged)

    def without(self, names: Iterable[str]) -> "_LimitValues":
        return self._replace(**{name: None for name in names})


def _limit_value(value: Any, field: str) -> Any:
    """One limit from a request or option: a positive finite number (an
    integer for pids_limit), never a bool, within its documented range."""
    integer, low, high, unit = _LIMIT_FIELDS[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest("%s must be a number (%s), not %s" % (field, unit, type(value).__name__),
                         details={"field": field})
    if integer and not isinstance(value, int):
        raise BadRequest("%s must be an integer" % field, details={"field": field})
    if not math.isfinite(value) or value <= 0:
        raise BadRequest("%s must be a positive number of %s" % (field, unit), details={"field": field})
    if value < low or value > high:
        raise BadRequest("%s must be between %g and %g %s" % (field, low, high, unit), details={"field": field})
    return value


def _parse_limits(body: Dict[str, Any]) -> _LimitValues:
    """The limit fields of a start request (absent or null: not given)."""
    values = {field: _limit_value(body[field], field)
              for field in _LIMIT_FIELDS if body.get(field) is not None}
    return _LimitValues(**values)


def _parse_limit_option(text: str, field: str) -> Any:
    """A ``--default-<limit>`` value from the command line or environment."""
    integer = _LIMIT_FIELDS[field][0]
    try:
        value: Any = int(text) if integer else float(text)
    except ValueError:
        raise BadRequest("%s must be %s, not %r" % (field, "an integer" if integer else "a number", text),
                         details={"field": field}) from None
    return _limit_value(value, field)


# -- run as a user -------------------------------------------------------------


class _RunAs(_Plain, frozen=True):
    """A user children run as: uid, primary gid, supplementary groups, home."""

    name: str
    uid: int
    gid: int
    groups: Tuple[int, ...]
    home: str

    def env(self) -> Dict[str, str]:
        """What a login sets and programs read (api.md §14)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    @property
    def is_current(self) -> bool:
        """Nothing to drop: the agent already runs with these ids."""
        return self.uid == os.geteuid() and self.gid == os.getegid()

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "gid": self.gid}


def _resolve_user(value: Any, field: str = "user") -> _RunAs:
    """``user`` of a request or --run-as: a name, or a uid (number or digits).

    A uid without a passwd entry (common in containers) runs with the group
    of the same number, no supplementary groups and HOME=/, never with the
    agent's groups (root's group would open root-group files to it).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest("%s must be a user name or a uid" % field, details={"field": field})
    text = str(value).strip()
    if not text or "\0" in text:
        raise BadRequest("%s must be a user name or a uid" % field, details={"field": field})
    try:
        entry = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        if not text.isdigit():
            raise BadRequest("unknown user %r" % text, details={"field": field}) from None
        uid = int(text)
        if uid > 0xFFFFFFFE:
            raise BadRequest("%s: uid %d is out of range" % (field, uid), details={"field": field}) from None
        return _RunAs(name=text, uid=uid, gid=uid, groups=(), home="/")
    except OverflowError:
        raise BadRequest("%s: uid %s is out of range" % (field, text), details={"field": field}) from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid}))
    return _RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups,
                  home=entry.pw_dir or "/")


def _check_switchable(user: _RunAs) -> None:
    """Only root may start children as another user (api.md §14: else 400)."""
    if not user.is_current and os.geteuid() != 0:
        raise BadRequest("user %r needs an agent running as root; this agent runs as uid %d"
                         % (user.name, os.geteuid()), details={"field": "user"})



def _own_file(fd: int, user: Optional[_RunAs]) -> None:
    """Give a file the agent just created (a code file, a file written
    through the files API) to ``user``, keeping its mode; no-op without one."""
    if user is not None and not user.is_current:
        os.fchown(fd, user.uid, user.gid)


# The dropper: after the gate, a program that drops root and execs argv.
# setpriv (util-linux) where it works, else the agent's own interpreter in
# isolated mode (-I: no PYTHON* variables or user site from the child's env).
_PY_DROPPER = ("import os,sys\n"
               "u,g,gs=int(sys.argv[1]),int(sys.argv[2]),sys.argv[3]\n"
               "try:\n"
               " os.setgroups([int(x) for x in gs.split(',') if x]);os.setresgid(g,g,g);os.setresuid(u,u,u)\n"
               " os.execvp(sys.argv[4],sys.argv[4:])\n"
               "except OSError as e:\n"
               " sys.stderr.write('hopx_agent: cannot run %s as uid %d: %s\\n'%(sys.argv[4],u,e.strerror));"
               "sys.exit(127 if isinstance(e,FileNotFoundError) else 126)\n")


def _find_setpriv() -> Optional[str]:
    """setpriv, if it is there and can drop root to nobody (checked once)."""
    path = shutil.which("setpriv")
    if path is None or os.geteuid() != 0:
        return None
    try:
        done = subprocess.run([path, "--reuid=65534", "--regid=65534", "--clear-groups", "--", "/bin/sh", "-c",
                               "exit 0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=5, close_fds=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def _dropper_argv(user: _RunAs, setpriv: Optional[str]) -> List[str]:
    """The argv prefix that becomes ``user`` and then execs the rest."""
    if setpriv:
        groups = ("--groups=" + ",".join(map(str, user.groups))) if user.groups else "--clear-groups"
        return [setpriv, "--reuid=%d" % user.uid, "--regid=%d" % user.gid, groups, "--"]
    return [sys.executable or "python3", "-I", "-S", "-c", _PY_DROPPER,
            str(user.uid), str(user.gid), ",".join(map(str, user.groups))]


# -- the agent's own safety: oom_score_adj -------------------------------------------


def _read_oom_score_adj(pid: str = "self") -> Optional[int]:
    try:
        with open("/proc/%s/oom_score_adj" % pid, "rb") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def _write_oom_score_adj(value: int, pid: str = "self") -> bool:
    try:
        with open("/proc/%s/oom_score_adj" % pid, "wb", buffering=0) as fh:
            fh.write(b"%d" % value)
        return True
    except OSError:
        return False


class _OomPolicy:
    """The agent at ``agent_adj`` where permitted, every child at ``child_adj``.

    Lowering the agent's value needs CAP_SYS_RESOURCE (root may lack it in a
    container); children always get their own value through a shell prelude
    before exec, because oom_score_adj is inherited and the agent's -1000
    would otherwise make every child, and what it forks, unkillable.
    """

    def __init__(self, agent_adj: Optional[int], child_adj: Optional[int]) -> None:
        self.requested = agent_adj
        self.child_adj = child_adj
        self.before = _read_oom_score_adj()
        self.agent_adj = self.before
        self.protected = False

    def protect_agent(self) -> None:
        if self.requested is not None and self.before is not None and self.requested != self.before:
            if _write_oom_score_adj(self.requested):
                self.agent_adj = _read_oom_score_adj()
        self.protected = self.agent_adj is not None and self.agent_adj <= -1000
        if self.requested is not None and self.agent_adj != self.requested:
            log.warning("oom_score_adj: the agent stays at %s (wanted %s: needs CAP_SYS_RESOURCE)",
                        self.agent_adj, self.requested)

    def restore(self) -> None:
        """Give the hosting process its value back (create_server in tests, embedders)."""
        if self.before is not None and self.agent_adj != self.before and _write_oom_score_adj(self.before):
            self.agent_adj = self.before

    @property
    def child_target(self) -> Optional[int]:
        """A child's value: the configured one, else what the agent had before it lowered its own."""
        return self.child_adj if self.child_adj is not None else self.before

    def plan(self) -> Tuple[Optional[int], bool]:
        """(a child's value to set or None, whether it must be set before exec).

        Before exec when the agent lowered its own value: what the child
        forked in its first microseconds would otherwise keep the agent's
        -1000 and be unkillable. Otherwise the agent writes it right after
        the child starts (a gated child: before it is released), which
        keeps plain starts a direct exec: an early grandchild then keeps the
        agent's unchanged value, never a protected one.
        """
        target = self.child_target
        if target is None or target == self.agent_adj:
            return None, False
        return target, self.agent_adj != self.before

    def to_json(self) -> Dict[str, Any]:
        return {"agent": self.agent_adj, "agent_requested": self.requested, "agent_protected": self.protected,
                "children": self.child_target}


# -- cgroup discovery --------------------------------------------------------------


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", "replace")


def _write_text(path: str, text: str) -> None:
    """One write(2) of ``text``: cgroup files take a value per write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _parse_proc_cgroup(text: str) -> Dict[str, str]:
    """/proc/<pid>/cgroup: controller -> path; the v2 entry ("0::/x") under ""."""
    own: Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                own[controller] = parts[2]
    return own


def _unescape_mount(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo(text: str) -> List[Tuple[str, str, str, List[str]]]:
    """cgroup mounts from /proc/self/mountinfo: (root, mount point, fstype, super options)."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if sep and len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            mounts.append((_unescape_mount(fields[3]), _unescape_mount(fields[4]), rest[0], rest[2].split(",")))
    return mounts


def _cgroup_dir(mount_root: str, mount_point: str, path: str) -> Optional[str]:
    """Where the cgroup ``path`` is under a mount of its hierarchy (None if the mount cannot see it)."""
    root = mount_root.rstrip("/")
    if path != root and not path.startswith(root + "/") and root:
        return None
    return os.path.join(mount_point, path[len(root):].lstrip("/")).rstrip("/") or "/"


def _v1_dirs(mounts: List[Tuple[str, str, str, List[str]]], own: Dict[str, str]) -> Dict[str, str]:
    """controller -> the agent's own cgroup directory, for each v1 controller we use."""
    dirs: Dict[str, str] = {}
    for root, point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in ("memory", "cpu", "pids", "freezer"):
            if controller in options and controller in own and controller not in dirs:
                found = _cgroup_dir(root, point, own[controller])
                if found and os.path.isdir(found):
                    dirs[controller] = found
    return dirs


def _v2_dir(mounts: List[Tuple[str, str, str, List[str]]], own: Dict[str, str]) -> Optional[str]:
    """The agent's own cgroup directory in the unified hierarchy, if mounted."""
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            found = _cgroup_dir(root, point, own[""])
            if found and os.path.isdir(found):
                return found
    return None


def _owned_by_us(path: str) -> bool:
    """A non-root agent uses a cgroup only where it was delegated: the
    directory and its cgroup.procs are ours and writable."""
    if os.geteuid() == 0:
        return True
    try:
        return all(os.stat(p).st_uid == os.geteuid() and os.access(p, os.W_OK)
                   for p in (path, os.path.join(path, "cgroup.procs")))
    except OSError:
        return False


def _poll_until(predicate, deadline: float) -> bool:
    """Poll a kernel state that offers no notification (the v1 freezer,
    cgroup.events without inotify) with a short backoff, until ``deadline``."""
    delay = 0.0005
    while True:
        if predicate():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _pids_in(directory: str) -> List[int]:
    try:
        return [int(x) for x in _read_text(os.path.join(directory, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def _member_pidfd(pid: int, directory_line: Tuple[str, str]) -> Optional[int]:
    """A pidfd for ``pid`` if it is (still) in the cgroup: the pidfd pins
    the process, so a pid reused after the check is never signalled."""
    controller, path = directory_line
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    try:
        if _parse_proc_cgroup(_read_text("/proc/%d/cgroup" % pid)).get(controller) == path:
            return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


def _wait_pidfds(pidfds: List[int], deadline: float) -> None:
    """Wait (bounded) until every pidfd says its process has exited."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    left = set(pidfds)
    while left:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return
        for fd, _ in poller.poll(timeout * 1000):
            left.discard(fd)
            poller.unregister(fd)


# -- one execution's cgroup ------------------------------------------------------


class _ExecCgroup:
    """The cgroup(s) of one child: created with its limits before the child
    starts, joined by it at the gate, ended as a whole, read for usage, and
    removed when the record is final."""

    version = ""

    def __init__(self, dirs: Dict[str, str], proc_path: Tuple[str, str]) -> None:
        self.dirs = dirs                   # controller (or "" for v2) -> directory
        self.proc_path = proc_path         # (controller, path) as /proc/<pid>/cgroup names it
        self.removed = False
        self.swap = True                   # the machine may swap: limit memory+swap too (v1)

    @property
    def _distinct(self) -> List[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def join(self, pid: int) -> None:
        """Move ``pid`` (all its threads) into every hierarchy's cgroup."""
        for directory in self._distinct:
            _write_text(os.path.join(directory, "cgroup.procs"), "%d" % pid)

    def members(self) -> List[int]:
        return _pids_in(self._distinct[0])

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every member (a polite SIGTERM reaches setsid escapers too)."""
        sent = 0
        for pid in self.members():
            pidfd = _member_pidfd(pid, self.proc_path)
            if pidfd is None:
                continue
            try:
                signal.pidfd_send_signal(pidfd, sig)
                sent += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        return sent

    def _sigkill_members(self) -> List[int]:
        """SIGKILL every member; the pidfds to wait on."""
        pidfds = []
        for pid in self.members():
            pidfd = _member_pidfd(pid, self.proc_path)
            if pidfd is None:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            pidfds.append(pidfd)
        return pidfds

    def kill(self, wait: float = CGROUP_EMPTY_WAIT_S) -> bool:
        """End every process in the cgroup, escaped descendants included;
        True once it is empty (within ``wait``)."""
        if self.removed or not self.members():
            return True
        deadline = time.monotonic() + wait

        for _ in range(3):               # a member that forked mid-kill (freeze timed out) is caught next round
            pidfds = self._kill_once()
            try:
                _wait_pidfds(pidfds, deadline)
            finally:
                for fd in pidfds:
                    os.close(fd)
            if not self.members():
                return True
            if time.monotonic() >= deadline:
                break
        return not self.members()

    def _kill_once(self) -> List[int]:
        raise NotImplementedError

    def usage(self) -> Dict[str, Any]:
        raise NotImplementedError

    def remove(self) -> bool:
        """rmdir in every hierarchy, killing what is left first (rmdir says
        EBUSY while a member lives); True when all are gone."""
        if self.removed:
            return True
        left = [d for d in self._distinct if not self._rmdir(d, quiet=True)]
        if left and self.kill():
            left = [d for d in left if not self._rmdir(d, quiet=False)]
        self.removed = not left
        return self.removed

    @staticmethod
    def _rmdir(directory: str, *, quiet: bool) -> bool:
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not quiet:
                log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)
            return False
        return True


def _read_keyed(path: str) -> Dict[str, int]:
    """A flat keyed cgroup file ("oom_kill 1\\n...") as a dict; {} if unreadable."""
    try:
        pairs = (line.split() for line in _read_text(path).splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}
    except OSError:
        return {}


def _read_int(path: str) -> Optional[int]:
    try:
        return int(_read_text(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mib(value: Optional[int]) -> Optional[float]:
    return round(value / MIB, 2) if value is not None else None


def _swap_in_use() -> bool:
    """Whether the machine has swap (/proc/swaps lists more than its header)."""
    try:
        with open("/proc/swaps", "rb") as fh:
            return len(fh.read().splitlines()) > 1
    except OSError:
        return True


class _ExecCgroupV1(_ExecCgroup):

    """v1: one directory per controller (memory, cpu, pids, freezer)."""

    version = "cgroup_v1"

    def apply(self, limits: _LimitValues) -> None:
        if limits.memory_limit_mb is not None:
            size = "%d" % int(limits.memory_limit_mb * MIB)
            _write_text(os.path.join(self.dirs["memory"], "memory.limit_in_bytes"), size)
            if self.swap:                # no swapping past the limit either (with swap accounting)
                memsw = os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw):
                    _write_text(memsw, size)
        if limits.cpu_limit is not None:
            _write_text(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), "%d" % CPU_PERIOD_US)
            _write_text(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"),
                        "%d" % max(1000, round(limits.cpu_limit * CPU_PERIOD_US)))
        if limits.pids_limit is not None:
            _write_text(os.path.join(self.dirs["pids"], "pids.max"), "%d" % limits.pids_limit)

    def _state(self) -> str:
        try:
            return _read_text(os.path.join(self.dirs["freezer"], "freezer.state")).strip()
        except OSError:
            return ""

    def _kill_once(self) -> List[int]:
        """Freeze (so nobody forks while we kill), SIGKILL every member, thaw."""
        state = os.path.join(self.dirs["freezer"], "freezer.state")
        try:
            _write_text(state, "FROZEN")
            _poll_until(lambda: self._state() == "FROZEN", time.monotonic() + FREEZE_WAIT_S)
        except OSError as exc:
            if exc.errno != errno.ENOENT:      # ENOENT: removed meanwhile, nothing left to kill
                log.warning("cannot freeze %s: %s", self.dirs["freezer"], exc.strerror)
        try:
            return self._sigkill_members()
        finally:
            try:
                _write_text(state, "THAWED")   # frozen tasks die of their SIGKILL once thawed
            except OSError:
                pass

    def usage(self) -> Dict[str, Any]:
        memory = self.dirs.get("memory")
        out: Dict[str, Any] = {}
        if memory:
            out["memory_peak_mb"] = _mib(_read_int(os.path.join(memory, "memory.max_usage_in_bytes")))
            out["oom_kills"] = _read_keyed(os.path.join(memory, "memory.oom_control")).get("oom_kill", 0)
        if "pids" in self.dirs:
            out["pids_limit_hits"] = _read_keyed(os.path.join(self.dirs["pids"], "pids.events")).get("max", 0)
        return out


class _ExecCgroupV2(_ExecCgroup):
    """v2: one directory in the unified hierarchy."""

    version = "cgroup_v2"

    def apply(self, limits: _LimitValues) -> None:
        directory = self.dirs[""]
        if limits.memory_limit_mb is not None:
            _write_text(os.path.join(directory, "memory.max"), "%d" % int(limits.memory_limit_mb * MIB))
            swap = os.path.join(directory, "memory.swap.max")
            if os.path.exists(swap):       # the limit is on memory, not memory plus swap
                _write_text(swap, "0")
        if limits.cpu_limit is not None:
            _write_text(os.path.join(directory, "cpu.max"), "%d %d" % (
                max(1000, round(limits.cpu_limit * CPU_PERIOD_US)), CPU_PERIOD_US))
        if limits.pids_limit is not None:
            _write_text(os.path.join(directory, "pids.max"), "%d" % limits.pids_limit)

    def _kill_once(self) -> List[int]:
        """cgroup.kill (Linux 5.14+) kills every member, forks racing it
        included; older kernels: freeze, SIGKILL every member, thaw."""
        directory = self.dirs[""]
        pidfds = [fd for fd in (_member_pidfd(pid, self.proc_path) for pid in self.members()) if fd is not None]
        kill_file = os.path.join(directory, "cgroup.kill")
        if os.path.exists(kill_file):
            try:
                _write_text(kill_file, "1")
                return pidfds
            except OSError as exc:
                log.warning("cgroup.kill of %s failed: %s", directory, exc.strerror)
        for fd in pidfds:
            os.close(fd)
        freeze = os.path.join(directory, "cgroup.freeze")
        events = os.path.join(directory, "cgroup.events")
        try:
            _write_text(freeze, "1")
            _poll_until(lambda: _read_keyed(events).get("frozen") == 1, time.monotonic() + FREEZE_WAIT_S)
        except OSError:
            pass
        try:
            return self._sigkill_members()
        finally:
            try:
                _write_text(freeze, "0")
            except OSError:
                pass

    def usage(self) -> Dict[str, Any]:
        directory = self.dirs[""]
        out: Dict[str, Any] = {}
        if os.path.exists(os.path.join(directory, "memory.events")):
            out["memory_peak_mb"] = _mib(_read_int(os.path.join(directory, "memory.peak")))
            out["oom_kills"] = _read_keyed(os.path.join(directory, "memory.events")).get("oom_kill", 0)
        if os.path.exists(os.path.join(directory, "pids.events")):
            out["pids_limit_hits"] = _read_keyed(os.path.join(directory, "pids.events")).get("max", 0)
        return out


# -- the agent's cgroup trees ------------------------------------------------------


class _CgroupTree:
    """Where this agent makes its children's cgroups: a directory
    ``hopx-runs-<pid>-<token>`` below the agent's own cgroup in each
    hierarchy used, and one directory per execution inside it."""

    version = ""

    def __init__(self, own: Dict[str, str], controllers: Sequence[str], proc_base: str) -> None:
        self.own = own                       # controller -> the agent's own cgroup directory
        self.proc_base = proc_base           # the freezer (v1) or unified (v2) own path as /proc names it
        self.controllers = tuple(controllers)   # limit controllers present ("memory", "cpu", "pids")
        self.runs: Dict[str, str] = {}       # controller -> the runs directory
        self.name = "%s%d-%s" % (CGROUP_RUNS_PREFIX, os.getpid(), secrets.token_hex(4))
        self.swap = True                     # v1: found out at open (/proc/swaps)
        self._lock = threading.Lock()        # guards _live

        self._live: Dict[str, _ExecCgroup] = {}   # name -> cgroups not removed yet

    def open(self) -> None:
        raise NotImplementedError

    def _make_runs(self) -> None:
        for controller, directory in self.own.items():
            path = os.path.join(directory, self.name)
            if path not in self.runs.values():
                os.mkdir(path)
            self.runs[controller] = path

    def _make(self, cls: type, name: str, limits: _LimitValues) -> _ExecCgroup:
        dirs: Dict[str, str] = {}
        made: List[str] = []
        try:
            for controller, runs in self.runs.items():
                if controller == "cpu" and limits.cpu_limit is None and self.version == "cgroup_v1":
                    continue     # v1 cpu only for a quota: joining it costs more than the three others

                path = os.path.join(runs, name)
                if path not in made:
                    os.mkdir(path)
                    made.append(path)
                dirs[controller] = path
            group = cls(dirs, self._proc_path(dirs))
            group.swap = self.swap
            group.apply(limits)
        except BaseException:
            for path in reversed(made):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            raise
        with self._lock:
            self._live[name] = group
        return group

    def _proc_path(self, dirs: Dict[str, str]) -> Tuple[str, str]:
        raise NotImplementedError

    def create(self, name: str, limits: _LimitValues) -> _ExecCgroup:
        raise NotImplementedError

    def forget(self, name: str) -> None:
        with self._lock:
            self._live.pop(name, None)

    def close(self) -> None:
        """Remove what is left (killing members) and the runs directories."""
        with self._lock:
            live = list(self._live.items())
        for name, group in live:
            if group.remove():
                self.forget(name)
        for path in reversed(list(dict.fromkeys(self.runs.values()))):
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove cgroup %s: %s", path, exc.strerror)


def _sweep_stale_runs(directory: str) -> int:
    """Remove the empty runs directories of agents that are gone (a crash
    leaves them); a non-empty one still holds processes and is left alone."""
    removed = 0
    try:
        names = [n for n in os.listdir(directory) if n.startswith(CGROUP_RUNS_PREFIX)]
    except OSError:
        return 0
    for name in names:
        pid = name[len(CGROUP_RUNS_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists("/proc/%s" % pid):
            continue
        path = os.path.join(directory, name)
        try:
            for child in os.listdir(path):
                if os.path.isdir(os.path.join(path, child)):
                    os.rmdir(os.path.join(path, child))
            os.rmdir(path)
            removed += 1
        except OSError:
            pass
    return removed


class _CgroupTreeV1(_CgroupTree):
    version = "cgroup_v1"

    def open(self) -> None:
        for directory in dict.fromkeys(self.own.values()):
            _sweep_stale_runs(directory)
        self.swap = _swap_in_use()
        self._make_runs()


    def _proc_path(self, dirs: Dict[str, str]) -> Tuple[str, str]:
        """How /proc/<pid>/cgroup names a member's freezer cgroup."""
        relative = os.path.relpath(dirs["freezer"], self.own["freezer"])
        return "freezer", os.path.normpath(os.path.join(self.proc_base, relative))

    def create(self, name: str, limits: _LimitValues) -> _ExecCgroup:
        return self._make(_ExecCgroupV1, name, limits)


class _CgroupTreeV2(_CgroupTree):
    """v2: controllers must be enabled in subtree_control all the way down,
    and a non-root cgroup with processes cannot enable them (the
    no-internal-processes rule): then the agent moves into a leaf of its
    own (``hopx-agent``) first."""

    version = "cgroup_v2"

    def __init__(self, own_dir: str, controllers: Sequence[str], proc_base: str, *,
                 agent_pid: Optional[int] = None) -> None:
        super().__init__({"": own_dir}, controllers, proc_base)
        self.agent_pid = agent_pid or os.getpid()
        self.is_root = proc_base == "/"
        self.moved_to: Optional[str] = None

    def _enable(self, directory: str) -> None:
        if self.controllers:
            _write_text(os.path.join(directory, "cgroup.subtree_control"),
                        " ".join("+" + c for c in self.controllers))

    def open(self) -> None:
        base = self.own[""]
        _sweep_stale_runs(base)
        try:
            self._enable(base)
        except OSError as exc:
            if exc.errno != errno.EBUSY or self.is_root:
                raise
            self._move_agent_to_leaf(base)
            self._enable(base)
        self._make_runs()
        self._enable(self.runs[""])

    def _move_agent_to_leaf(self, base: str) -> None:
        """Move the agent (all its threads) into ``<base>/hopx-agent``; if
        others still live in ``base`` the controllers stay off: move back."""
        leaf = os.path.join(base, CGROUP_AGENT_LEAF)
        if not os.path.isdir(leaf):
            os.mkdir(leaf)
        _write_text(os.path.join(leaf, "cgroup.procs"), "%d" % self.agent_pid)
        self.moved_to = leaf
        others = _pids_in(base)
        if others:
            _write_text(os.path.join(base, "cgroup.procs"), "%d" % self.agent_pid)
            self.moved_to = None
            raise OSError(errno.EBUSY, "other processes share the agent's cgroup (%s)" % ", ".join(
                map(str, others[:5])))
        log.info("cgroup v2: moved the agent into %s so that %s can be enabled", leaf, base)

    def _proc_path(self, dirs: Dict[str, str]) -> Tuple[str, str]:
        """How /proc/<pid>/cgroup names a member's cgroup."""
        return "", os.path.normpath(os.path.join(self.proc_base, os.path.relpath(dirs[""], self.own[""])))

    def create(self, name: str, limits: _LimitValues) -> _ExecCgroup:
        return self._make(_ExecCgroupV2, name, limits)


def _v2_base(directory: str) -> str:
    """The agent's base cgroup: its own, or the parent of the leaf an
    earlier start of the agent (an exec in place) moved it into."""
    if os.path.basename(directory) == CGROUP_AGENT_LEAF:
        return os.path.dirname(directory)
    return directory


def _probe_v2(mounts, own: Dict[str, str]) -> Tuple[Optional[_CgroupTree], str]:
    """A v2 tree when memory and pids can be enabled for children, else why not."""
    directory = _v2_dir(mounts, own)
    if directory is None:
        return None, "no cgroup2 mount shows the agent's cgroup"
    base = _v2_base(directory)
    try:
        offered = _read_text(os.path.join(base, "cgroup.controllers")).split()
    except OSError as exc:
        return None, "cgroup v2: %s" % exc.strerror
    missing = [c for c in ("memory", "pids") if c not in offered]
    if missing:
        return None, "cgroup v2 offers no %s controller (bound to v1 or not delegated)" % " or ".join(missing)
    if not _owned_by_us(base):
        log.info("cgroup v2: %s is not delegated to uid %d", base, os.geteuid())
        return None, "cgroup v2: the agent's cgroup is not delegated to uid %d" % os.geteuid()
    proc_base = own[""] if base == directory else (os.path.dirname(own[""].rstrip("/")) or "/")
    tree = _CgroupTreeV2(base, [c for c in ("memory", "pids", "cpu") if c in offered], proc_base)
    return _opened(tree)


def _probe_v1(mounts, own: Dict[str, str]) -> Tuple[Optional[_CgroupTree], str]:
    dirs = _v1_dirs(mounts, own)
    missing = [c for c in ("memory", "pids", "freezer") if c not in dirs]
    if missing:
        return None, "cgroup v1 lacks %s" % ", ".join(missing)
    if "cpu" in dirs and not _owned_by_us(dirs["cpu"]):
        del dirs["cpu"]                  # optional: without it cpu_limit is a 400
    bad = [d for d in dirs.values() if not _owned_by_us(d)]
    if bad:

        log.info("cgroup v1: %s is not delegated to uid %d", bad[0], os.geteuid())
        return None, "cgroup v1: the agent's cgroups are not delegated to uid %d" % os.geteuid()
    return _opened(_CgroupTreeV1(dirs, [c for c in ("memory", "pids", "cpu") if c in dirs], own["freezer"]))


def _opened(tree: _CgroupTree) -> Tuple[Optional[_CgroupTree], str]:
    """Open the tree and try one cgroup with every limit, so a machine that
    only pretends (read-only mounts, missing files) is found out at start."""
    try:
        tree.open()
        trial = _LimitValues(memory_limit_mb=64, pids_limit=64,
                             cpu_limit=1.0 if "cpu" in tree.controllers else None)
        group = tree.create("probe", trial)
        group.remove()
        tree.forget("probe")
        return tree, ""
    except OSError as exc:
        tree.close()
        log.info("%s unusable: %s", tree.version, exc)      # the paths go to the log, not to /health
        return None, "%s: %s" % (tree.version, exc.strerror or type(exc).__name__)



def _probe_cgroups(prefer: str = "auto") -> Tuple[Optional[_CgroupTree], List[str]]:
    """The cgroup tree to use (v2 first, api.md §14), and why others were not."""
    try:
        mounts = _parse_mountinfo(_read_text("/proc/self/mountinfo"))
        own = _parse_proc_cgroup(_read_text("/proc/self/cgroup"))
    except OSError as exc:
        return None, ["cannot read /proc: %s" % exc.strerror]
    reasons = []
    for version, probe in (("cgroup_v2", _probe_v2), ("cgroup_v1", _probe_v1)):
        if prefer not in ("auto", version):
            continue
        tree, why = probe(mounts, own)
        if tree is not None:
            return tree, reasons
        reasons.append(why)
    return None, reasons


# -- a child's confinement -------------------------------------------------------


_RLIMITS = (   # field -> (resource name, bytes per unit); RLIMIT_CPU rounds up to whole seconds
    ("memory_limit_mb", "RLIMIT_AS", MIB),
    ("pids_limit", "RLIMIT_NPROC", 1),
    ("cpu_time_limit_s", "RLIMIT_CPU", 0),
    ("file_size_limit_mb", "RLIMIT_FSIZE", MIB),
)


def _rlimits_for(limits: _LimitValues, with_cgroup: bool) -> List[Tuple[int, int, int]]:
    """(resource, soft, hard) to set with prlimit; under cgroups only CPU
    time and file size are rlimits (api.md §14)."""
    import resource  # Unix only; imported where it is needed
    out = []
    for field, name, unit in _RLIMITS:
        value = getattr(limits, field)
        if value is None or (with_cgroup and field in _CGROUP_LIMITS):
            continue
        if unit == 0:    # SIGXCPU at the limit, SIGKILL a second later if it is caught
            soft = max(1, math.ceil(value))
            out.append((resource.RLIMIT_CPU, soft, soft + 1))
        else:
            amount = max(1, int(value * unit))
            out.append((getattr(resource, name), amount, amount))
    return out


class _Confinement:
    """Everything one child needs before and after it runs: the shell
    preludes, the gate, its cgroup, its rlimits, the user it runs as.

    Use: ``wrap()`` before Popen, ``started()`` right after it (joins the
    cgroups, sets rlimits, opens the gate), then ``signal()``/``kill()``
    while it runs and ``finish()`` once its record is final.
    """

    def __init__(self, limits: _LimitValues, user: Optional[_RunAs], *, oom: Tuple[Optional[int], bool],
                 cgroup: Optional[_ExecCgroup], tree: Optional[_CgroupTree], name: str,
                 setpriv: Callable[[], Optional[str]]) -> None:
        self.limits = limits
        self.user = user
        self.cgroup = cgroup
        self.tree = tree
        self.name = name
        self.rlimits = _rlimits_for(limits, cgroup is not None)
        self.drop = user is not None and not user.is_current
        self.gated = bool(cgroup is not None or self.rlimits)
        self._oom_adj, early = oom
        # Errors silenced: a read-only /proc must not print into the child's stderr.
        self._oom_prelude = ("echo %d 2>/dev/null >/proc/self/oom_score_adj" % self._oom_adj
                             if early and not self.gated else None)
        self._setpriv = setpriv
        self._gate_r: Optional[int] = None
        self._gate_w: Optional[int] = None
        self._stdin_pipe = False
        self.usage: Dict[str, Any] = {}
        self.finished = False
        self._lock = threading.Lock()      # guards finished
        self._done = threading.Event()     # set once finish() has run

    @property
    def mechanism(self) -> str:
        return self.cgroup.version if self.cgroup is not None else "rlimit"

    def wrap(self, argv: List[str], stdin: Any, env: Dict[str, str], preludes: Sequence[str] = (),
             tty: Optional[str] = None) -> Tuple[List[str], Any, Dict[str, Any]]:
        """(argv, stdin, extra Popen keywords) for this child; ``env`` gets
        the user's HOME, USER and LOGNAME. The gate takes stdin's place until
        released (or is a line written into the child's own stdin pipe); the
        user's ids come from the dropper after the gate, or from Popen's own
        user= (C code between fork and exec) when there is no gate. The
        spawner's own ``preludes`` (a tty made the controlling terminal) run
        after the gate, as root when the child drops root for a user."""
        kwargs: Dict[str, Any] = {}
        steps = [self._oom_prelude] if self._oom_prelude else []
        if self.user is not None:
            env.update(self.user.env())
        if self.gated:
            steps.append("read _ || exit %d" % GATE_EXIT_CODE)
            if stdin == subprocess.PIPE:
                self._stdin_pipe = True
            else:
                if tty is None:         # with a tty, a later prelude opens it onto 0, 1 and 2
                    steps.extend(self._restore_stdin(stdin, kwargs))
                self._gate_r, self._gate_w = os.pipe()
                stdin = self._gate_r

            if self.drop:
                argv = _dropper_argv(self.user, self._setpriv()) + argv
        elif self.drop:
            kwargs.update(user=self.user.uid, group=self.user.gid, extra_groups=list(self.user.groups))
        steps.extend(preludes)
        if steps:
            argv = ["/bin/sh", "-c", "; ".join(steps) + '; exec "$0" "$@"'] + argv
        return argv, stdin, kwargs


    @staticmethod
    def _restore_stdin(stdin: Any, kwargs: Dict[str, Any]) -> List[str]:
        """The prelude that gives the program its real stdin after the gate.
        An fd is kept open at its own number and reopened through /proc
        (dash reads single-digit fds only, so one above 9 stays open too)."""
        if not isinstance(stdin, int) or stdin < 0:
            return ["exec </dev/null"]          # DEVNULL, and None: children never share the agent's stdin
        kwargs["pass_fds"] = (stdin,)
        return ["exec </proc/self/fd/%d" % stdin] + (["exec %d<&-" % stdin] if stdin <= 9 else [])

    def started(self, popen: subprocess.Popen) -> None:
        """Right after Popen: put the waiting child into its cgroups and
        under its rlimits, then open the gate. If any step fails the child
        is killed (it has run nothing yet) and the error raised."""
        self._close_gate_r()
        late_oom = self._oom_adj is not None and self._oom_prelude is None
        if not self.gated:
            if late_oom:
                _write_oom_score_adj(self._oom_adj, str(popen.pid))
            return
        try:
            if late_oom:     # still at the gate: exact, before any user code
                _write_oom_score_adj(self._oom_adj, str(popen.pid))
            if self.cgroup is not None:
                self.cgroup.join(popen.pid)

            if self.rlimits:
                import resource
                for res, soft, hard in self.rlimits:
                    resource.prlimit(popen.pid, res, (soft, hard))
            os.write(popen.stdin.fileno() if self._stdin_pipe else self._gate_w, b"\n")
        except BaseException:
            try:
                popen.kill()
            except OSError:
                pass
            popen.wait()
            self.finish()
            raise
        finally:
            self._close_gate_w()

    def spawn_failed(self) -> None:
        """Popen itself failed: nothing runs; let go of the gate and the cgroup."""
        self._close_gate_r()
        self._close_gate_w()
        self.finish()

    def _close_gate_r(self) -> None:
        if self._gate_r is not None:      # the child has its own copy
            _close_quietly(self._gate_r)
            self._gate_r = None

    def _close_gate_w(self) -> None:
        if self._gate_w is not None:
            _close_quietly(self._gate_w)
            self._gate_w = None


    def signal(self, sig: int) -> int:
        """Signal every process of the cgroup (0 without one)."""
        return self.cgroup.signal(sig) if self.cgroup is not None and not self.cgroup.removed else 0

    def kill(self) -> bool:
        """End the whole cgroup now (False without one)."""
        return self.cgroup.kill() if self.cgroup is not None and not self.cgroup.removed else False

    def read_usage(self) -> Dict[str, Any]:
        if self.cgroup is not None and not self.cgroup.removed:
            self.usage = self.cgroup.usage()
        return self.usage

    def oom_killed(self, wait_status: Optional[int]) -> bool:
        """api.md §14: the leader died of SIGKILL and the cgroup counted an OOM kill."""
        return (wait_status is not None and os.WIFSIGNALED(wait_status)
                and os.WTERMSIG(wait_status) == signal.SIGKILL and self.read_usage().get("oom_kills", 0) > 0)

    def finish(self) -> Dict[str, Any]:
        """The record is final: read the usage, end what is left, remove the
        cgroups. Once; a second caller waits (bounded) for the first's usage."""
        with self._lock:
            first, self.finished = not self.finished, True
        if not first:
            self._done.wait(CGROUP_EMPTY_WAIT_S + FREEZE_WAIT_S + 1.0)
            return self.usage
        try:
            self.read_usage()
            if self.cgroup is not None and self.cgroup.remove() and self.tree is not None:
                self.tree.forget(self.name)
        finally:
            self._done.set()
        return self.usage


# -- the agent-wide object ---------------------------------------------------------


class _ResourceLimits:
    """Which mechanism this agent uses (probed once), the defaults, the
    run-as user and oom_score_adj policy; makes each child's _Confinement.

    ``mechanism``: "auto" (v2, else v1, else rlimit), or one of "cgroup_v2",
    "cgroup_v1", "rlimit" to force it (tests force "rlimit" so both paths
    run here); a forced mechanism the machine lacks falls back, never fails.
    """

    def __init__(self, *, mechanism: str = "auto", defaults: Optional[_LimitValues] = None,
                 run_as: Optional[str] = None, agent_oom_score_adj: Optional[int] = AGENT_OOM_SCORE_ADJ,
                 child_oom_score_adj: Optional[int] = CHILD_OOM_SCORE_ADJ) -> None:
        self.requested = mechanism
        self.tree: Optional[_CgroupTree] = None
        self.why_not: List[str] = []
        self.defaults = defaults or _LimitValues()
        self.run_as = _resolve_user(run_as, "run_as") if run_as is not None else None
        if self.run_as is not None:
            _check_switchable(self.run_as)
        self.oom = _OomPolicy(agent_oom_score_adj, child_oom_score_adj)
        self._setpriv: Optional[Tuple[Optional[str]]] = None   # (path or None,) once looked for
        self._count = 0
        self._lock = threading.Lock()    # guards _count and _setpriv

    @property
    def mechanism(self) -> str:
        return self.tree.version if self.tree is not None else "rlimit"

    def open(self) -> None:
        """Probe and take what the machine offers (never raises for a lesser machine)."""
        if self.requested not in ("auto",) + _MECHANISMS:
            raise ValueError("limits mechanism must be auto, %s" % ", ".join(_MECHANISMS))
        if self.requested != "rlimit":
            self.tree, self.why_not = _probe_cgroups(self.requested)
        else:
            self.why_not = ["rlimit forced by configuration"]
        self.oom.protect_agent()
        self.defaults = self._usable_defaults(self.defaults)

        log.info("limits: %s%s; oom_score_adj agent %s, children %s", self.mechanism,
                 (" (%s)" % "; ".join(self.why_not)) if self.tree is None and self.why_not else "",
                 self.oom.agent_adj, self.oom.child_target)

    def _usable_defaults(self, defaults: _LimitValues) -> _LimitValues:
        """A --default-* the machine cannot enforce is dropped with a warning, never fatal."""
        unusable = [f for f in defaults.given() if self.unsupported(f, self.run_as)]
        for field in unusable:
            log.warning("--default-%s ignored: %s", field.replace("_", "-"), self.unsupported(field, self.run_as))
        return defaults.without(unusable)

    def unsupported(self, field: str, user: Optional[_RunAs]) -> Optional[str]:
        """Why ``field`` cannot be enforced for a child running as ``user``, or None."""
        if field == "cpu_limit" and (self.tree is None or "cpu" not in self.tree.controllers):
            return ("cpu_limit needs the cgroup cpu controller; this agent limits with %s (%s)"
                    % (self.mechanism, "; ".join(self.why_not) or "no cpu controller"))
        if field == "pids_limit" and self.tree is None:
            uid = user.uid if user is not None else os.geteuid()
            if uid == 0:
                return ("pids_limit without cgroups is RLIMIT_NPROC, which does not bind root; "
                        "run as another user or give the agent cgroups")
        return None

    def resolve(self, body: Dict[str, Any]) -> Tuple[_LimitValues, Optional[_RunAs]]:
        """The limits and user of a start request (400 for anything wrong or unenforceable)."""
        limits = _parse_limits(body)
        user = _resolve_user(body["user"]) if body.get("user") is not None else self.run_as
        if user is not None:
            _check_switchable(user)
        for field in limits.given():
            why = self.unsupported(field, user)
            if why:
                raise BadRequest(why, details={"field": field})
        merged = limits.over(self.defaults.without(f for f in self.defaults.given() if self.unsupported(f, user)))
        return merged, user

    def resolve_text(self, params: Dict[str, Optional[str]]) -> Tuple[_LimitValues, Optional[_RunAs]]:
        """The same from text values (a WebSocket upgrade's query: /terminal?memory_limit_mb=256&user=...)."""
        body: Dict[str, Any] = {}
        for field in _LIMIT_FIELDS:
            if params.get(field) not in (None, ""):
                body[field] = _parse_limit_option(params[field] or "", field)
        if params.get("user") not in (None, ""):
            body["user"] = params["user"]
        return self.resolve(body)

    def confine(self, limits: _LimitValues, user: Optional[_RunAs], name: str = "") -> _Confinement:
        """The confinement of one child; makes its cgroup now when it needs one."""
        with self._lock:
            self._count += 1
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "child-%d" % self._count

        group = self.tree.create(name, limits) if self.tree is not None and limits.needs_cgroup else None
        return _Confinement(limits, user, oom=self.oom.plan(), cgroup=group, tree=self.tree,

                            name=name, setpriv=self.setpriv)

    def setpriv(self) -> Optional[str]:
        """setpriv's path if it works here, looked for on first use (a child run)."""
        with self._lock:
            found = self._setpriv
        if found is None:
            found = (_find_setpriv(),)
            with self._lock:
                self._setpriv = found
        return found[0]


    def features(self) -> Dict[str, Any]:
        """features.resource_limits, the same in /health and /info (api.md §14)."""
        controllers = list(self.tree.controllers) if self.tree is not None else []
        unsupported = {f: self.unsupported(f, self.run_as) for f in _LIMIT_FIELDS}
        return {
            "mechanism": self.mechanism, "controllers": controllers,
            "limits": [f for f in _LIMIT_FIELDS if not unsupported[f]],
            "unsupported": {f: why for f, why in unsupported.items() if why},
            "defaults": self.defaults.given(),
            "maxima": {f: spec[2] for f, spec in _LIMIT_FIELDS.items()},
            "kill": {"cgroup_v2": "cgroup.kill", "cgroup_v1": "freezer"}.get(self.mechanism, "process group"),
            "run_as": self.run_as.name if self.run_as is not None else None,
            "users": os.geteuid() == 0,
            "oom_score_adj": self.oom.to_json(),
            "why_not_cgroups": self.why_not if self.tree is None else [],
        }

    def close(self) -> None:
        if self.tree is not None:
            self.tree.close()
        self.oom.restore()


def _limits_from(config: AgentConfig) -> _ResourceLimits:
    """The agent's _ResourceLimits from its configuration, probed and opened."""
    defaults = _LimitValues(**{field: getattr(config, "default_" + field) for field in _LIMIT_FIELDS})
    limits = _ResourceLimits(mechanism=config.limits_mechanism, defaults=defaults, run_as=config.run_as,
                             agent_oom_score_adj=config.agent_oom_score_adj,
                             child_oom_score_adj=config.child_oom_score_adj)
    limits.open()
    return limits


# ============================================================================
# Children: the one way any child of the agent is started
# ============================================================================


class _ChildSpec(_Plain):
    """How to start one child. Every child of the agent (background and
    synchronous runs, and whatever else the families start) is started from
    one of these by _Spawner.spawn(), so sessions, descriptors and the steps
    before exec are done in one place."""

    argv: List[str]
    cwd: str
    env: Dict[str, str]
    stdin: Any = subprocess.DEVNULL     # an fd, subprocess.PIPE or subprocess.DEVNULL
    stdout: Any = None
    stderr: Any = None
    pass_fds: Tuple[int, ...] = ()      # descriptors the child keeps besides 0, 1 and 2
    # Shell commands run in the child after fork and before the program:
    # the only safe place for such steps in a threaded parent (no preexec_fn).
    preludes: List[str] = _Factory(list)   # type: ignore[assignment]
    # A pty slave's path: made the child's controlling terminal (the
    # spawner's own prelude, after the caller's). Give the slave as
    # stdin/stdout/stderr too, so it is held open from fork on.
    tty: Optional[str] = None
    # api.md §14: the child's limits and user, and a name for its cgroup
    # (unique among the agent's live children: a record or context id).
    limits: Optional[_LimitValues] = None
    user: Optional[_RunAs] = None
    name: str = ""
    confinement: Optional[_Confinement] = None   # set by spawn(): the owner ends and finishes it


def _check_executable(program: str, cwd: str, env: Dict[str, str]) -> None:
    """What execve would refuse, raised as Popen raises it, for a child that
    starts as a shell wrapper: its exec failing later would only be an exit
    status 127 or 126, which the program itself could have returned."""
    def refuse(code: int) -> None:
        cls = {errno.ENOENT: FileNotFoundError, errno.EACCES: PermissionError}.get(code, OSError)
        raise cls(code, os.strerror(code), program)
    path = os.path.join(cwd, program) if "/" in program else \
        shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None or not os.path.exists(path):
        refuse(errno.ENOENT)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        refuse(errno.EACCES)
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return                          # not readable by the agent: exec will tell
    if head.startswith(b"#!"):          # a script: its interpreter must exist too
        words = head[2:].split(b"\n", 1)[0].split()
        if not words or not os.path.exists(os.fsdecode(words[0])):
            refuse(errno.ENOENT)
    elif not head.startswith(b"\x7fELF"):
        refuse(errno.ENOEXEC)           # the shell would run it as a script; execve refuses it



def _ctty_prelude(path: str) -> str:
    """The step that makes the terminal at ``path`` the controlling terminal.

    The child leads a new session (Popen's start_new_session: setsid() in C
    between fork and exec) and has none; on Linux a session leader without a
    controlling terminal that opens a terminal without O_NOCTTY acquires it
    (System V semantics; BSDs need TIOCSCTTY instead). So the shell opens the
    slave by its path as fds 0-2 and then execs the program, which keeps it:
    TIOCSCTTY without preexec_fn. It must run before a step that drops root
    (the slave belongs to the agent's user unless given to the child's).
    """
    return "exec 0<>%s 1>&0 2>&0" % shlex.quote(path)


class _Pty:
    """A pseudo-terminal pair: the master stays with the agent, the slave
    becomes fds 0-2 and the controlling terminal of one child (terminals,
    and "pty": true executions).

    Use: ``_Pty(cols, rows)``; spawn with ``stdin/stdout/stderr = pty.slave``
    and ``tty=pty.path``; then ``close_slave()``. Output is read from
    ``master`` (EIO once no slave descriptor is open: the end of output,
    see _read_pty) and input written to it. Both descriptors are
    non-inheritable (os.openpty), so no other child holds the terminal.
    """

    def __init__(self, cols: int = 80, rows: int = 24) -> None:
        self.master, self.slave = os.openpty()
        try:
            self.path = os.ttyname(self.slave)
            self.resize(cols, rows)
        except BaseException:
            self.close()
            raise

    def resize(self, cols: int, rows: int) -> None:
        """TIOCSWINSZ on the master: the kernel sends SIGWINCH to the
        terminal's foreground process group when the size changes."""
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def size(self) -> Tuple[int, int]:
        """(cols, rows) as the kernel has them."""
        import fcntl
        import struct
        import termios
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(self.master, termios.TIOCGWINSZ, b"\0" * 8))
        return cols, rows

    def give_to(self, uid: int, gid: int) -> None:
        """Make the slave the child's user's, as login and sshd do: a child
        that drops root before its prelude runs can still open it."""
        os.fchown(self.slave, uid, gid)

    def eof_bytes(self) -> bytes:
        """The terminal's EOF character (VEOF, normally ^D) as the line
        discipline has it now. It ends input at the start of a line; after
        a partial line it first hands that line over (a second one ends it)."""
        import termios
        try:
            char = termios.tcgetattr(self.master)[6][termios.VEOF]
        except (termios.error, OSError, IndexError):
            return b"\x04"
        return char if isinstance(char, bytes) and char != b"\0" else b"\x04"

    def close_slave(self) -> None:
        if self.slave >= 0:
            _close_quietly(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            _close_quietly(self.master)
            self.master = -1


def _read_pty(fd: int, size: int) -> Optional[bytes]:
    """One read from a pty master: bytes; b"" at the end of output (EIO: no
    slave descriptor is open any more); None when nothing is there now (a
    non-blocking master)."""
    try:
        return os.read(fd, size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


class _Spawner:

    """Starts children (each in a session of its own, so it leads its process
    group) and knows which pids are children not reaped yet, so that the
    orphan reaper never takes the exit status of one of ours."""

    def __init__(self, limits: Optional[_ResourceLimits] = None) -> None:
        self._lock = threading.Lock()               # guards _tracked and _spawning
        self.changed = threading.Condition(self._lock)   # notified when either shrinks or grows
        self._tracked: set = set()                  # pids started and not reaped yet
        self._spawning = 0                          # Popen calls under way: pids not known yet
        self.limits = limits or _ResourceLimits(mechanism="rlimit", agent_oom_score_adj=None,
                                                child_oom_score_adj=None)
        # Added to every child's environment (durability: HOPX_AGENT_STATE, the
        # state dir's id, by which a restarted agent proves an orphan its own).
        self.markers: Dict[str, str] = {}

    def spawn(self, spec: _ChildSpec) -> subprocess.Popen:
        """Popen for ``spec``; the pid is tracked until untrack() says it was reaped.

        With preludes (the spawner's own: oom_score_adj, the gate of a
        confined child; and the caller's) the child is
        ``/bin/sh -c '<preludes>; exec "$0" "$@"' argv...``: the shell runs
        them and then becomes the program; without, the program is executed
        directly (a shell costs ~0.8 ms per start). ``spec.confinement`` is
        set to the child's _Confinement (its cgroup, its user): the owner
        calls its finish() once the child is reaped, also when spawn raises.
        """
        conf = spec.confinement = self.limits.confine(spec.limits or _LimitValues(), spec.user, spec.name)
        env = dict(spec.env, **self.markers)     # durability: the state dir's id (orphans)
        try:
            preludes = list(spec.preludes) + ([_ctty_prelude(spec.tty)] if spec.tty else [])
            argv, stdin, extra = conf.wrap(list(spec.argv), spec.stdin, env, preludes, spec.tty)
            if argv[0] != spec.argv[0]:    # wrapped: a missing program must still fail here, not exit 127
                _check_executable(spec.argv[0], spec.cwd, env)
        except BaseException:
            conf.spawn_failed()
            raise
        if spec.pass_fds:
            extra["pass_fds"] = tuple(spec.pass_fds) + tuple(extra.get("pass_fds", ()))
        with self._lock:
            self._spawning += 1
        popen = None
        try:
            popen = subprocess.Popen(argv, stdin=stdin, stdout=spec.stdout, stderr=spec.stderr,
                                     cwd=spec.cwd, env=env, start_new_session=True, close_fds=True, **extra)
        except BaseException:
            conf.spawn_failed()
            raise
        finally:
            with self._lock:
                self._spawning -= 1
                if popen is not None:
                    self._tracked.add(popen.pid)
                self.changed.notify_all()
        try:
            conf.started(popen)     # into its cgroups, under its rlimits; then the gate opens
        except BaseException:
            self.untrack(popen.pid)     # killed and reaped by started()
            raise
        return popen


    def adopt(self, pid: int) -> None:
        """``pid`` is a child the agent's previous version started (an upgrade in place)."""
        with self._lock:
            self._tracked.add(pid)
            self.changed.notify_all()

    def untrack(self, pid: int) -> None:
        """``pid`` was reaped by its owner."""
        with self._lock:
            self._tracked.discard(pid)
            self.changed.notify_all()

    def owns(self, pid: int) -> bool:
        """True when ``pid`` is (or may be about to become) a tracked child."""
        with self._lock:
            return pid in self._tracked or self._spawning > 0

    def wait_released(self, pid: int, timeout: float) -> None:
        """Wait until ``pid`` is no longer a tracked child and no spawn is under way."""
        with self._lock:
            self.changed.wait_for(lambda: pid not in self._tracked and not self._spawning, timeout)

    def wait_for_children(self, stop: threading.Event) -> None:
        """Wait until there is a tracked child or ``stop`` is set (woken by wake())."""
        with self._lock:
            self.changed.wait_for(lambda: bool(self._tracked) or stop.is_set())

    def wake(self) -> None:
        with self._lock:
            self.changed.notify_all()


# ============================================================================
# Process manager: escaped descendants and the subreaper
# ============================================================================

def _marker_of(environ: bytes) -> str:
    """The HOPX_PROCESS_ID value in a /proc/<pid>/environ blob, or ""."""
    prefix = PROCESS_ID_ENV.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("ascii", "replace")
    return ""


def _read_environ(pid: int) -> bytes:
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _scan_marked() -> Dict[str, List[int]]:
    """Record id -> pids of the processes whose environment carries
    HOPX_PROCESS_ID (readable for processes of our own user, or as root)."""
    found: Dict[str, List[int]] = {}
    me = os.getpid()
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
    except OSError:
        return found
    for pid in pids:
        environ = _read_environ(pid)
        if PROCESS_ID_ENV.encode() in environ:
            marker = _marker_of(environ)
            if marker:
                found.setdefault(marker, []).append(pid)
    return found


def _signal_marked(pid: int, process_id: str, sig: int,
                   on_match: Optional[Callable[[], None]] = None) -> bool:
    """Signal ``pid`` only if it still carries the marker; with a pidfd the
    check and the signal name the same process even if the pid is reused.
    ``on_match`` runs after the check, before the signal."""
    pidfd = None
    try:
        if hasattr(os, "pidfd_open"):
            pidfd = os.pidfd_open(pid)
        if _marker_of(_read_environ(pid)) != process_id:
            return False
        if on_match is not None:
            on_match()
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return True
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _wait_gone(pids: List[int], deadline: float) -> None:
    """Wait until the given processes have exited (pidfds turn readable then), or the deadline."""
    if not pids or not hasattr(os, "pidfd_open"):
        return
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:       # already gone
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = len(fds)
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                poller.unregister(fd)
                pending -= 1
    finally:
        for fd in fds:
            os.close(fd)


def _set_subreaper(on: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of our descendants re-parent to us (or no longer)."""
    if not sys.platform.startswith("linux"):
        log.info("not Linux: orphaned descendants re-parent to init, not to the agent")
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, int(on), 0, 0, 0) != 0:   # 36 = PR_SET_CHILD_SUBREAPER
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return True
    except (OSError, AttributeError, ImportError) as exc:
        log.info("cannot become a child subreaper (%s): orphans re-parent to init", exc)
        return False


def _is_zombie_child(pid: int) -> bool:
    """True when ``pid`` is our child and has exited but is not reaped yet."""
    if not hasattr(os, "waitid"):
        return False
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def _killpg(pgid: int, sig: int) -> bool:
    """killpg that treats a group already gone as done."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _end_marked(rec: _ProcessRecord, sig: int, marked: Optional[Dict[str, List[int]]] = None) -> None:
    """Signal the processes that carry the record's HOPX_PROCESS_ID but left
    its process group (setsid, double fork); remember them as stragglers."""
    pids = (marked if marked is not None else _scan_marked()).get(rec.id, [])
    for pid in pids:
        try:
            if os.getpgid(pid) == rec.pid and not rec.reaped:
                continue               # in the group: the group signal reaches it
        except OSError:
            continue
        _signal_marked(pid, rec.id, sig, on_match=lambda pid=pid: _add_straggler(rec, pid))


def _add_straggler(rec: _ProcessRecord, pid: int) -> None:
    # Counted before the signal: the record may turn final the moment the straggler dies.
    with rec.cond:
        if not rec.stragglers:
            rec.stragglers = set()
        rec.stragglers.add(pid)


class _Subreaper:
    """Adopts orphaned descendants (Linux PR_SET_CHILD_SUBREAPER) and reaps
    them on a thread of its own, so no zombie is ever left. Only for a process
    whose children all come from the spawner (the CLI agent)."""

    def __init__(self, spawner: _Spawner, stopping: threading.Event) -> None:
        self._spawner = spawner
        self._stopping = stopping
        self._lock = threading.Lock()   # guards _thread
        self._thread: Optional[threading.Thread] = None

    def enable(self) -> bool:
        if not _set_subreaper(True):
            return False
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="hopx-reaper", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    _set_subreaper(False)      # adopted orphans would have nobody to reap them
                    log.warning("cannot start the orphan reaper: not a subreaper")
                    return False
                self._thread = thread
        return True

    def _run(self) -> None:
        """Wait (without reaping) for any child to exit; reap it only if it is
        not a tracked child, whose status belongs to its owner."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:   # no children now: wait for the next spawn
                self._spawner.wait_for_children(self._stopping)
                info = None
            if self._stopping.is_set():
                return                  # stop() does the last sweep itself
            if info is not None:
                self._reap_if_orphan(info.si_pid, wait=True)

    def _reap_if_orphan(self, pid: int, *, wait: bool) -> bool:
        """Reap ``pid`` unless it is a tracked child or may be one being
        spawned (with ``wait``, wait a little for that to change). False when
        it was left alone."""
        if self._spawner.owns(pid):
            if wait:
                self._spawner.wait_released(pid, 1.0)
            return False
        try:
            os.waitpid(pid, os.WNOHANG)
            log.debug("reaped orphan %d", pid)
        except ChildProcessError:
            pass
        return True

    def stop(self, deadline: float) -> None:
        """Stop being a subreaper, reap the orphans already adopted, end the thread."""
        with self._lock:
            thread = self._thread
        self._spawner.wake()
        if thread is None:
            return
        _set_subreaper(False)
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or not self._reap_if_orphan(info.si_pid, wait=False):
                break
        thread.join(max(0.0, deadline - time.monotonic()))


# ============================================================================
# Process manager: the environment and launches (languages, code files, directories)
# ============================================================================


class _Launcher:
    """Builds launches: the working directory of a request, the interpreter
    and code file of its language, and its environment (agent < global store
    < request, api.md §7). Owns the global env store."""

    def __init__(self, config: AgentConfig, environ: Optional[Dict[str, str]] = None) -> None:
        self.config = config
        self._lock = threading.Lock()   # guards _env
        self._env: Dict[str, str] = {}  # the global env store (api.md §7)
        base = dict(os.environ if environ is None else environ)
        base.pop(SECRET_ENV, None)
        base.setdefault("PYTHONUNBUFFERED", "1")   # live output from Python children by default
        self._base_env = base
        self.code_prefix = "hopx-"      # durability: "hopx-<state dir id>-" once there is a journal

    def env_snapshot(self) -> Dict[str, str]:
        """Agent environment overlaid with the global store (what GET /env shows)."""
        with self._lock:
            env = dict(self._base_env)
            env.update(self._env)
        env.pop(SECRET_ENV, None)
        return env

    def global_env(self) -> Dict[str, str]:
        """The global store alone, secret removed (a context applies it at each call)."""
        with self._lock:
            env = dict(self._env)
        env.pop(SECRET_ENV, None)
        return env

    def base_env(self) -> Dict[str, str]:
        """The agent's environment alone (a context's child starts with it)."""
        return dict(self._base_env)

    def env_set(self, values: Dict[str, str], *, replace: bool) -> None:
        """Replace or merge the global store; 413 (nothing changed) when the
        result would pass ENV_STORE_VARS or ENV_STORE_BYTES."""
        with self._lock:
            merged = dict(values) if replace else dict(self._env, **values)
            if len(merged) > ENV_STORE_VARS:
                raise AgentError("the global environment would hold %d variables; at most %d"
                                 % (len(merged), ENV_STORE_VARS), status=413, code="PAYLOAD_TOO_LARGE")
            size = _env_bytes(merged)
            if size > ENV_STORE_BYTES:
                raise AgentError("the global environment would take %d bytes; at most %d, so that every "
                                 "later execution can still start" % (size, ENV_STORE_BYTES),
                                 status=413, code="PAYLOAD_TOO_LARGE")
            self._env = merged

    def env_store(self) -> Dict[str, str]:
        """The global store alone (what an upgrade hands over)."""
        with self._lock:
            return dict(self._env)

    def env_delete(self, keys: Optional[Iterable[str]] = None) -> None:
        """Forget the given keys of the global store, or all of it."""
        with self._lock:
            if keys is None:
                self._env.clear()
            else:
                for key in keys:
                    self._env.pop(key, None)

    def child_env(self, request_env: Optional[Dict[str, str]]) -> Dict[str, str]:
        """Precedence: request > global store > agent (api.md §7); 413 when the
        whole would not fit a child's exec (EXEC_ARGS_BYTES)."""
        env = self.env_snapshot()
        env.update(request_env or {})
        env.pop(SECRET_ENV, None)
        size = _env_bytes(env)
        if size > EXEC_ARGS_BYTES:
            raise AgentError("the environment of this execution would take %d bytes; a child's exec "
                             "takes at most %d" % (size, EXEC_ARGS_BYTES), status=413, code="PAYLOAD_TOO_LARGE")
        return env

    def resolve_cwd(self, value: Optional[str]) -> str:
        """The working directory for a request (api.md §1): the default when
        absent, the default too for a missing /workspace (the SDK always sends
        it), 400 for any other directory that does not exist."""
        if value is None or value == "":
            return self.config.workdir
        path = os.path.join(self.config.workdir, value)
        if os.path.isdir(path):
            return os.path.normpath(path)
        if os.path.normpath(value) == "/workspace":
            return self.config.workdir
        raise BadRequest("working directory does not exist: %s" % value)

    def code_launch(self, code: str, language: Optional[str], *, cwd: Optional[str] = None,
                    env: Optional[Dict[str, str]] = None, timeout: float = BACKGROUND_TIMEOUT_S,
                    name: Optional[str] = None, stdin: bool = False,
                    idle_timeout: Optional[float] = None, pty: Optional[Tuple[int, int]] = None,
                    limits: Optional[_LimitValues] = None, user: Optional[_RunAs] = None) -> _Launch:
        """A launch that runs ``code`` with the language's interpreter from a
        temp file (0600, owned by ``user`` when there is one: readable by it and
        nobody else); with ``pty`` (cols, rows) on a pseudo-terminal, stdin open."""
        lang, program = _resolve_language(language)
        directory = self.resolve_cwd(cwd)
        build = _LANGUAGES[lang][2]
        return _Launch(argv=[program], cwd=directory, env=self._launch_env(env, pty), kind="code", language=lang,
                       name=name, timeout=timeout, stdin=stdin or pty is not None, idle_timeout=idle_timeout,
                       code=code.encode("utf-8"), code_suffix=_LANGUAGES[lang][3], code_prefix=self.code_prefix,
                       code_argv=lambda path: build(program, path), pty=pty, limits=limits, user=user)

    def command_launch(self, command: str, args: Optional[List[str]] = None, *,
                       cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                       timeout: float = BACKGROUND_TIMEOUT_S, name: Optional[str] = None,
                       stdin: bool = False, idle_timeout: Optional[float] = None,
                       pty: Optional[Tuple[int, int]] = None, limits: Optional[_LimitValues] = None,
                       user: Optional[_RunAs] = None) -> _Launch:
        """A launch of ``[command] + args`` as argv, or of a shell string through /bin/sh -c."""
        argv = [command] + list(args) if args is not None else ["/bin/sh", "-c", command]
        shown = " ".join([command] + list(args)) if args is not None else command
        return _Launch(argv=argv, cwd=self.resolve_cwd(cwd), env=self._launch_env(env, pty), kind="command",
                       command=shown, name=name, timeout=timeout, stdin=stdin or pty is not None,
                       idle_timeout=idle_timeout, pty=pty, limits=limits, user=user)

    def _launch_env(self, request_env: Optional[Dict[str, str]], pty: Optional[Tuple[int, int]]) -> Dict[str, str]:
        """A child's environment; on a pty it says what terminal it has
        (TERM, as the request's env may override) and no inherited size."""
        env = self.child_env(request_env)
        if pty is not None:
            asked = request_env or {}
            for stale in ("COLUMNS", "LINES"):
                if stale not in asked:
                    env.pop(stale, None)
            if "TERM" not in asked:
                env["TERM"] = PTY_TERM
        return env


# ============================================================================
# Process manager: the records, the queue, retention and idempotent starts
# ============================================================================


class _IdempotentStart:
    """The first request made with one Idempotency-Key, and its answer once known."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.done = threading.Event()
        self.answer: Optional[Dict[str, Any]] = None


class _Registry:
    """Every record, the FIFO queue of those waiting for a slot, retention of
    finished records and their output, the counters /metrics reports, the
    Idempotency-Keys and the listings' JSON cache. Lock order: ``lock`` may be
    taken before a record's ``cond``, never after it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.lock = threading.Lock()   # guards every field below but the cache (which locks itself)
        self._records: Dict[str, _ProcessRecord] = {}          # creation order = listing order
        self._finished: "collections.OrderedDict[str, _ProcessRecord]" = collections.OrderedDict()
        self._queue: collections.deque = collections.deque()   # FIFO of queued records
        self._queued_code_bytes = 0                            # code the queued records hold in memory
        self.running = 0                                       # slots taken (spawning or running)
        self.closed = False
        self._finished_bytes = 0                               # output held by finished records
        self._stats: Dict[str, int] = collections.Counter()
        self._idempotency: Dict[str, _IdempotentStart] = {}    # Idempotency-Key -> its first start
        self.cache = _RecordCache(RECORD_CACHE_BYTES)
        self.on_freed: Callable[[int], None] = lambda nbytes: None   # told of output let go (a _HeapTrim)
        # durability (issue 16): the journal told of evictions once the lock is released
        self.journal: Optional[Any] = None
        self._seq = 0                                          # the last record's creation number
        self.fseq = itertools.count(1)     # the order records become final in (lock-free: set_final's cond is held)
        self._forgotten: List[str] = []                        # evicted, not journaled yet
        self._emptied: List[str] = []                          # output dropped by the budget, likewise

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self._stats[name] += n

    def admit(self, rec: _ProcessRecord) -> bool:
        """Take in a new record: True when it may run now, False when it was
        queued; Unavailable while closing, LimitExceeded (429) when the queue is full."""
        with self.lock:
            if self.closed:
                raise Unavailable("agent is shutting down")
            if self.running < self.config.max_running and not self._queue:
                self.running += 1
                run_now = True
            elif len(self._queue) >= self.config.queue_limit:
                raise LimitExceeded("too many processes: %d running and %d queued"
                                    % (self.running, len(self._queue)))
            elif self._queued_code_bytes + len(rec.launch.code or b"") > QUEUE_CODE_BYTES:
                raise LimitExceeded("the queue holds %d bytes of code already (at most %d)"
                                    % (self._queued_code_bytes, QUEUE_CODE_BYTES))
            else:
                self._queue.append(rec)
                self._queued_code_bytes += len(rec.launch.code or b"")
                run_now = False
            self._seq += 1
            rec.seq = self._seq
            self._records[rec.id] = rec
            self._stats["started"] += 1
        return run_now

    def all(self) -> List[_ProcessRecord]:
        with self.lock:
            return list(self._records.values())

    def hand_over(self) -> Tuple[List[_ProcessRecord], List[str], Dict[str, Any]]:
        """For an upgrade: every record (creation order), the queue's ids, and the rest."""
        with self.lock:
            keys = {key: [entry.digest, entry.answer] for key, entry in self._idempotency.items()
                    if entry.done.is_set() and entry.answer is not None}
            return (list(self._records.values()), [r.id for r in self._queue],
                    {"stats": dict(self._stats), "seq": self._seq, "finished": list(self._finished),
                     "idempotency": keys})

    def adopt(self, recs: List[_ProcessRecord], queue: List[str], extra: Dict[str, Any]) -> None:
        """Take in the records of a previous agent: a restart's (all final) or
        an upgrade's (running and queued too, with the queue's order)."""
        by_id = {rec.id: rec for rec in recs}
        finished_order = [i for i in extra.get("finished", []) if i in by_id]
        with self.lock:
            for rec in sorted(recs, key=lambda r: r.seq):
                self._records[rec.id] = rec
                self._seq = max(self._seq, rec.seq)
            self._seq = max(self._seq, int(extra.get("seq", 0)))
            finals = [by_id[i] for i in finished_order] or sorted(
                (r for r in recs if r.finished), key=lambda r: (r.fseq or float("inf"), r.seq))
            for rec in finals:
                self._finished[rec.id] = rec
                rec.accounted = rec.stdout.held + rec.stderr.held
                self._finished_bytes += rec.accounted
            self._queue.extend(by_id[i] for i in queue)
            self.running += sum(1 for r in recs if not r.finished and r.status != "queued")
            self.fseq = itertools.count(max([r.fseq for r in recs] + [0]) + 1)
            self._stats.update(extra.get("stats") or {})
            for key, (digest, answer) in (extra.get("idempotency") or {}).items():
                self._adopt_key(key, digest, answer)
            for rec in recs:
                if rec.idempotency and rec.idempotency[0] not in self._idempotency:
                    self._adopt_key(*rec.idempotency)
            self._enforce_retention()
        self.journal_retention()

    def _adopt_key(self, key: str, digest: str, answer: Dict[str, Any]) -> None:
        entry = self._idempotency[key] = _IdempotentStart(digest)
        entry.answer = answer
        entry.done.set()

    def withdraw(self, rec: _ProcessRecord) -> List[_ProcessRecord]:
        """Forget a record that could not start, as if it never came; returns
        queued records that may start in its slot."""
        with self.lock:
            self._records.pop(rec.id, None)
            self._stats["started"] -= 1
            self.running -= 1
            return self._ready()

    def _ready(self) -> List[_ProcessRecord]:
        """Queued records that may start now, their slots taken (call with ``lock`` held)."""
        ready = []
        while not self.closed and self._queue and self.running < self.config.max_running:
            rec = self._queue.popleft()
            self._queued_code_bytes -= len(rec.launch.code or b"")
            ready.append(rec)
            self.running += 1
        return ready

    def dequeue(self, rec: _ProcessRecord) -> bool:
        """Take a record out of the queue; False if it was not queued."""
        with self.lock:
            if rec not in self._queue:
                return False
            self._queue.remove(rec)
            self._queued_code_bytes -= len(rec.launch.code or b"")
            return True

    def close(self) -> Tuple[List[_ProcessRecord], List[_ProcessRecord]]:
        """No more starts: returns (the queued records, now out of the queue, the others)."""
        with self.lock:
            self.closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._queued_code_bytes = 0
            return queued, [r for r in self._records.values() if r not in queued]

    def retire(self, rec: _ProcessRecord, *, was_running: bool) -> List[_ProcessRecord]:
        """Book-keeping once a record is final; returns queued records that may start now."""
        with rec.cond:
            held = rec.stdout.held + rec.stderr.held
            status, reason = rec.status, rec.reason
        with self.lock:
            if was_running:
                self.running -= 1
            self._finished[rec.id] = rec
            rec.accounted = held
            self._finished_bytes += held
            self._stats["status_" + status] += 1
            self._stats["reason_" + str(reason)] += 1
            freed = self._enforce_retention()
            ready = self._ready()
        self.journal_retention()
        if freed:
            self.on_freed(freed)
        return ready

    def journal_retention(self) -> None:
        """Tell the journal what retention evicted or emptied (outside the lock)."""
        with self.lock:
            forgotten, self._forgotten = self._forgotten, []
            emptied, self._emptied = self._emptied, []
        if self.journal is not None:
            self.journal.forget(forgotten)
            for rec_id in emptied:
                self.journal.output_dropped(rec_id)

    def _enforce_retention(self) -> int:
        """Keep at most ``retain`` finished records and ``output_budget`` bytes
        of their output: the oldest records go first (call with ``lock`` held).
        Returns the output bytes let go."""
        freed = 0
        while len(self._finished) > self.config.retain:
            _, old = self._finished.popitem(last=False)
            self._records.pop(old.id, None)
            self._idempotency.pop(old.idempotency_key or "", None)
            self._finished_bytes -= old.accounted
            freed += old.accounted
            self.cache.forget(old.id)
            self._forgotten.append(old.id)
        for old in self._finished.values():
            if self._finished_bytes <= self.config.output_budget:
                break
            with old.cond:
                old.stdout.discard()
                old.stderr.discard()
            self._finished_bytes -= old.accounted
            freed += old.accounted
            if old.accounted:
                self._emptied.append(old.id)
            old.accounted = 0
        return freed

    # -- reading -----------------------------------------------------------------

    def get(self, process_id: str) -> _ProcessRecord:
        with self.lock:
            rec = self._records.get(process_id)
        if rec is None:
            raise NotFound("process not found: %s" % process_id, code="PROCESS_NOT_FOUND")
        return rec

    def position(self, rec: _ProcessRecord) -> Optional[int]:
        """The record's place in the queue (1 = next), or None."""
        with self.lock:
            return self._queue.index(rec) + 1 if rec in self._queue else None

    def list_json(self, *, statuses: Optional[Iterable[str]] = None, name: Optional[str] = None,
                  output: bool = True) -> List[bytes]:
        """Records oldest first, filtered by status and name, each as JSON bytes.

        Every record is listed; the output a listing carries is bounded: the
        newest LISTING_STREAM_BYTES per stream, fewer when many records share
        LISTING_OUTPUT_BYTES, so a listing costs at most about six times that
        (JSON escapes) plus the records' fields, whatever the children printed."""
        wanted = set(statuses) if statuses else None
        with self.lock:
            recs = [r for r in self._records.values() if name is None or r.launch.name == name]
            positions = {r.id: i + 1 for i, r in enumerate(self._queue)}
        if wanted is not None:
            recs = [r for r in recs if r.status in wanted]
        cap = min(LISTING_STREAM_BYTES, LISTING_OUTPUT_BYTES // max(1, 2 * len(recs))) if output else None
        out = []
        for rec in recs:
            with rec.cond:
                if wanted is None or rec.status in wanted:
                    out.append(self.cache.get(rec, output=output, queue_position=positions.get(rec.id), cap=cap))
        return out

    def stats(self) -> Dict[str, Any]:
        """Counters for /metrics."""
        with self.lock:
            recs = list(self._records.values())
            stats = dict(self._stats)
            queued, running = len(self._queue), self.running
        held = 0
        for rec in recs:
            with rec.cond:
                held += rec.stdout.held + rec.stderr.held
        return {"started": stats.get("started", 0), "running": running, "queued": queued,
                "records": len(recs), "output_bytes_held": held,
                "by_status": {k[7:]: v for k, v in stats.items() if k.startswith("status_")},
                "by_reason": {k[7:]: v for k, v in stats.items() if k.startswith("reason_")},
                "webhooks": {"delivered": stats.get("webhooks_delivered", 0),
                             "failed": stats.get("webhooks_failed", 0)}}

    def idempotent_start(self, key: str, digest: str, start: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """Run ``start`` once per Idempotency-Key: a retry with the same request
        gets the first answer, the same key with another request is a 409.
        Keys live as long as the record they started."""
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            with self.lock:
                entry = self._idempotency.get(key)
                if entry is None:
                    entry = self._idempotency[key] = _IdempotentStart(digest)
                    break
            if entry.digest != digest:
                raise Conflict("Idempotency-Key %r was used for a different request" % key)
            if not entry.done.wait(max(0.0, deadline - time.monotonic())):
                raise Conflict("a request with Idempotency-Key %r is still in progress" % key)
            if entry.answer is not None:
                return dict(entry.answer, idempotent_replay=True)
            # the first request failed and let go of the key: try to take it
        try:
            entry.answer = start()
            rec = self.get(entry.answer["process_id"])
            with rec.cond:
                rec.idempotency_key = key
                rec.idempotency = [key, digest, entry.answer]
            if self.journal is not None:
                self.journal.changed(rec)
            return entry.answer
        except BaseException:
            with self.lock:
                self._idempotency.pop(key, None)
            raise
        finally:
            entry.done.set()


# ============================================================================
# Process manager: a record's lifecycle (spawn, drain, exit, timeouts, ending)
# ============================================================================


def _write_before(fd: int, data: bytes, deadline: float) -> int:
    """Write what a pipe takes before ``deadline``; returns the bytes written."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    written = 0
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while written < len(data):
        try:
            written += os.write(fd, view[written:])
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            poller.poll(remaining * 1000)
    return written


class _StartRefused(Exception):
    """A child that cannot start now for want of a resource; nothing of it ran."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
        if isinstance(cause, AgentError):
            self.error: AgentError = cause
        elif isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            self.error = AgentError("no space left to write the code file (%s)" % (cause.strerror or cause),
                                    status=507, code="INSUFFICIENT_STORAGE")
        else:
            self.error = Unavailable("cannot start a process now: %s" % (
                "no thread available" if isinstance(cause, RuntimeError) else getattr(cause, "strerror", None) or cause))


def _has_exited(pid: int) -> bool:
    """True when our child ``pid`` has exited (not reaped: WNOWAIT) or is gone."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class _ChildEnds(_Plain):
    """The child's side of its streams, closed in the agent once it is
    forked, and on a pty the agent's stdin descriptor (popen.stdin then)."""

    stdin: Any
    stdout: int
    stderr: int
    close_after: List[int]
    tty: Optional[str] = None
    stdin_fd: Optional[int] = None


class _Lifecycle:
    """Carries each record from spawn to final: its pipes drained by pooled
    readers, its leader's exit seen by the exit watcher, its timers on the
    watchdog, its group ended with TERM, grace, KILL, and its retirement,
    which frees its slot for the next queued record."""

    def __init__(self, config: AgentConfig, registry: _Registry, spawner: _Spawner) -> None:
        self.config = config
        self.registry = registry
        self.spawner = spawner
        self.watchdog = _Watchdog()
        self.workers = _WorkerPool()
        self.exits = _ExitWatcher()
        self.parking = _Parking()

    def start_all(self, recs: List[_ProcessRecord], *, refuse_first: bool = False) -> None:
        """Spawn each record; a spawn that fails frees its slot for the next queued one.

        With ``refuse_first`` (a start answering its request), a first record
        the machine cannot start now (no thread, no descriptor, a full disk)
        is withdrawn as if it never came, and the refusal raised: nothing ran.
        Later ones (queued, nobody waiting) are recorded as ``spawn_failed``.
        """
        pending = collections.deque(recs)
        first = recs[0] if refuse_first and recs else None
        while pending:
            rec = pending.popleft()
            try:
                pending.extend(self._spawn(rec))
            except _StartRefused as refused:
                if rec is first:
                    rec.launch.cleanup()
                    self.start_all(self.registry.withdraw(rec))
                    raise refused.error from None
                pending.extend(self._spawn_failed(rec, refused.cause))

    def _spawn(self, rec: _ProcessRecord) -> List[_ProcessRecord]:
        """Start one record's child. Everything the child needs from the agent
        (its code file, pipes, the timer and exit-watcher threads, two pooled
        readers) is had before it is forked, so a shortage refuses the start
        (_StartRefused) before anything ran, and a running child always has
        its readers and a watcher."""
        launch = rec.launch
        fds: List[int] = []
        unwoken = 0                      # readers had but not yet woken
        try:
            launch.prepare()
            ends, readers = self._pty_ends(rec, fds) if launch.pty else self._pipe_ends(launch, fds)
            self.watchdog.ensure_running()
            self.exits.ensure_running()
            with rec.cond:
                rec.open_streams = len(readers)
            for fd, name in readers:
                # Had now, woken after the fork: woken before, they would take the
                # GIL from the fork at each of its blocking calls (~0.5 ms a start).
                self._submit_reader(rec, name, fd, wake=False)
                fds.remove(fd)           # the reader owns it now
                unwoken += 1
        except (OSError, RuntimeError, AgentError) as exc:
            self.workers.wake(unwoken)
            for fd in fds:               # a reader already given its pipe sees EOF and ends
                _close_quietly(fd)
            raise _StartRefused(exc) from None
        try:
            return self._fork(rec, ends)     # which closes the child's ends (and the stdin one, if it fails)
        finally:
            self.workers.wake(unwoken)

    @staticmethod
    def _pipe_ends(launch: _Launch, fds: List[int]) -> Tuple["_ChildEnds", List[Tuple[int, str]]]:
        """A pipe for each output stream: the child's ends, and the readers' (fd, stream)."""
        out_r, out_w = os.pipe()
        fds += [out_r, out_w]
        err_r, err_w = os.pipe()
        fds += [err_r, err_w]
        ends = _ChildEnds(stdin=subprocess.PIPE if launch.stdin else subprocess.DEVNULL, stdout=out_w,
                          stderr=err_w, close_after=[out_w, err_w])
        return ends, [(out_r, "stdout"), (err_r, "stderr")]

    @staticmethod
    def _pty_ends(rec: _ProcessRecord, fds: List[int]) -> Tuple["_ChildEnds", List[Tuple[int, str]]]:
        """A pseudo-terminal (api.md §12): its slave is the child's fds 0-2 and
        controlling terminal, so all its output is the stdout stream (stderr
        stays empty); the master goes to the reader, and a second descriptor
        of it is the child's stdin (each closed by its own owner: none is
        used after a close). "eof" writes the terminal's EOF character."""
        assert rec.launch.pty is not None
        pty = _Pty(*rec.launch.pty)
        fds += [pty.master, pty.slave]
        stdin_fd = os.dup(pty.master)    # non-inheritable, like every os.dup
        fds.append(stdin_fd)
        rec.pty_eof = pty.eof_bytes()
        ends = _ChildEnds(stdin=pty.slave, stdout=pty.slave, stderr=pty.slave, close_after=[pty.slave],
                          tty=pty.path, stdin_fd=stdin_fd)
        return ends, [(pty.master, "stdout")]

    def _fork(self, rec: _ProcessRecord, ends: "_ChildEnds") -> List[_ProcessRecord]:
        launch = rec.launch
        try:
            spec = _ChildSpec(argv=launch.argv, cwd=launch.cwd, env=launch.env, stdin=ends.stdin,
                              stdout=ends.stdout, stderr=ends.stderr, tty=ends.tty,
                              limits=launch.limits, user=launch.user, name=rec.id)
            popen = self.spawner.spawn(spec)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            if ends.stdin_fd is not None:
                _close_quietly(ends.stdin_fd)
            if isinstance(exc, BlockingIOError) or getattr(exc, "errno", None) in (errno.EAGAIN, errno.ENOMEM):
                raise _StartRefused(exc) from None    # fork itself failed: nothing ran (the readers see EOF)
            return self._spawn_failed(rec, exc)
        finally:
            for fd in ends.close_after:  # the readers reach EOF when the child (or nobody) holds these
                _close_quietly(fd)
        if ends.stdin_fd is not None:
            popen.stdin = open(ends.stdin_fd, "wb", buffering=0)
        with rec.cond:
            rec.confinement = spec.confinement
            if rec.confinement is not None and rec.confinement.cgroup is not None:   # journaled (durability)
                rec.cgroups = list(dict.fromkeys(rec.confinement.cgroup.dirs.values()))
            rec.popen, rec.pid = popen, popen.pid
            rec.status = "running"
            rec.started, rec.started_mono = time.time(), time.monotonic()
            rec.last_output = rec.started_mono
            kill_now = rec.kill_reason is not None
            if rec.journaled and self.registry.journal is not None:   # queued before: its start is known
                self.registry.journal.ran(rec)
            rec.cond.notify_all()
        # Timers first: a child that ends at once must find them there to cancel.
        if launch.timeout:
            rec.timer = self.watchdog.schedule(launch.timeout, lambda: self.on_timeout(rec))
        if launch.idle_timeout:
            rec.idle_timer = self.watchdog.schedule(launch.idle_timeout, lambda: self.on_idle(rec))
        self._watch_leader(rec)
        if kill_now:
            self.terminate(rec)
        log.debug("started %s pid %d: %s", rec.id, popen.pid, launch.argv[0])
        return []

    def watch(self, rec: _ProcessRecord) -> None:
        """Readers for a record's open streams and a watch on its leader's exit:
        what an upgraded agent does for each running record it adopted."""
        self.read_streams(rec)
        if rec.pid is not None and not rec.reaped:
            self._watch_leader(rec)

    def read_streams(self, rec: _ProcessRecord) -> None:
        """A reader job for each open stream, when none runs (after a refused upgrade: the parked ones)."""
        with rec.cond:
            idle = sorted(rec.fds.items()) if not rec.readers else []
        for name, fd in idle:
            self._submit_reader(rec, name, fd)

    def _submit_reader(self, rec: _ProcessRecord, name: str, fd: int, *, wake: bool = True) -> None:
        """One stream's reader job (counted by the parking until it returns)."""
        with rec.cond:
            rec.fds[name] = fd
            rec.readers += 1
        try:
            self.parking.submit(self.workers, "hopx-proc-%s-%s" % (rec.id[5:13], name), self._read_stream,
                                rec, fd, name, wake=wake)
        except BaseException:
            with rec.cond:
                rec.fds.pop(name, None)
                rec.readers -= 1
            raise

    def _watch_leader(self, rec: _ProcessRecord) -> None:
        """The leader's exit: by its pidfd, else a waiter job, else (no thread
        to be had) a watchdog timer that looks every EXIT_POLL_S."""
        pid = rec.pid or 0
        if self.exits.watch(pid, lambda: self._leader_exited(rec)):
            return
        try:
            self.workers.submit("hopx-proc-%s-wait" % rec.id[5:13], self._wait_leader, rec)
        except (RuntimeError, Unavailable):
            log.warning("no thread to wait for %s: polling its exit", rec.id)
            self._poll_leader(rec)

    def _poll_leader(self, rec: _ProcessRecord) -> None:
        if _has_exited(rec.pid or 0):
            self._leader_exited(rec)
        else:
            self.watchdog.schedule(EXIT_POLL_S, lambda: self._poll_leader(rec))

    def _spawn_failed(self, rec: _ProcessRecord, exc: BaseException) -> List[_ProcessRecord]:
        """Record a child that never ran: a shell's 127 (not found) or 126, and the OS error."""
        missing = isinstance(exc, FileNotFoundError)
        cwd = rec.launch.cwd
        if isinstance(exc, OSError) and (exc.filename == cwd or not os.path.isdir(cwd)):
            text = "the working directory %s is gone (%s)" % (cwd, exc.strerror or exc)
        else:
            text = "cannot run %s: %s" % (rec.launch.argv[0],
                                          exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        with rec.cond:
            rec.error = text
            rec.stderr.append(("hopx_agent: %s\n" % text).encode("utf-8", "replace"))
            rec.set_final("spawn_failed", 127 if missing else 126, None)
        log.info("spawn failed for %s: %s", rec.id, text)
        return self.retire(rec, was_running=True)

    def _read_stream(self, rec: _ProcessRecord, fd: int, name: str) -> None:
        """Drain one pipe until EOF into the record's bounded buffer, or until
        an upgrade parks the reader (the pipe then stays open, for the successor)."""
        buf = rec.stream(name)
        scratch = getattr(_THREAD_STATE, "scratch", None)
        if scratch is None:      # one small read buffer per pooled thread, reused for every pipe
            scratch = _THREAD_STATE.scratch = bytearray(READ_SMALL_BYTES)
        grown = [False]

        def deliver(data: memoryview) -> None:
            if len(data) >= 65536 and not grown[0]:   # a chatty child: fewer wake-ups with a bigger pipe
                grown[0] = True
                _grow_pipe(fd)
            with rec.cond:
                buf.append(data)
                rec.last_output = time.monotonic()
                if rec.output_waiters and any(buf.total > marks[name] for marks in rec.output_waiters):
                    rec.cond.notify_all()    # not per read for every waiter: that halved the drain rate

        at_eof = True
        try:
            at_eof = _read_parkable(fd, self.parking, scratch, deliver)
        except Exception:
            log.exception("reading %s of %s failed", name, rec.id)
        finally:
            with rec.cond:
                rec.readers -= 1
                if at_eof:
                    rec.fds.pop(name, None)
                    rec.open_streams -= 1
                rec.cond.notify_all()
                last = at_eof and rec.open_streams == 0 and rec.exit_info is not None
            if at_eof:
                _close_quietly(fd)
            if last:
                self.finish(rec)

    def _reap(self, rec: _ProcessRecord) -> Tuple[Optional[int], Any]:
        """After the leader has exited: end the rest of its group, reap it.

        Its exit was seen without reaping (pidfd, or waitid with WNOWAIT), so
        a zombie is left, which keeps the
        pid (and so the group id) from being reused while the stragglers
        (``sleep 1000 &``) get their SIGKILL. Popen's returncode is set so
        that Popen never waits for this pid itself (no ECHILD surprises).
        """
        pid = rec.pid
        assert pid is not None
        try:
            with rec.cond:
                if rec.prereaped is not None:   # reaped by a waiter job without waitid
                    if rec.popen is not None:
                        rec.popen.returncode = os.waitstatus_to_exitcode(rec.prereaped[0])
                    return rec.prereaped
                if _is_zombie_child(pid):   # the zombie holds the pid: the group id is still ours
                    _killpg(pid, signal.SIGKILL)
                wpid, status, rusage = os.wait4(pid, 0)
                rec.reaped = True
                if rec.popen is not None:
                    rec.popen.returncode = os.waitstatus_to_exitcode(status)
            return status, rusage
        except ChildProcessError:      # someone else reaped it: the status is lost
            with rec.cond:
                rec.reaped = True
                rec.error = "exit status lost: the child was reaped elsewhere"
                if rec.popen is not None and rec.popen.returncode is None:
                    rec.popen.returncode = -1
            return None, None
        finally:
            self.spawner.untrack(pid)

    def _leader_exited(self, rec: _ProcessRecord) -> None:
        """The leader has exited (the exit watcher saw its pidfd, or a waiter
        job its waitid): reap it, end the rest, and finish the record as soon
        as the readers have taken what it wrote (at most DRAIN_AFTER_EXIT_S)."""
        try:
            exit_info = self._reap(rec)
            self.close_stdin(rec, quiet=True)
            if rec.kill_reason is not None:   # killed or timed out: escapers go with the leader
                _end_marked(rec, signal.SIGKILL)
            with rec.cond:
                rec.exit_info = exit_info
                drained = rec.open_streams == 0
            if drained:
                self.finish(rec)
            else:   # a reader at EOF finishes it, or this timer if a straggler holds a pipe
                self.schedule_drain(rec, DRAIN_AFTER_EXIT_S)
        except Exception:
            log.exception("handling the exit of %s failed", rec.id)

    def schedule_drain(self, rec: _ProcessRecord, delay: float) -> None:
        timer = self.watchdog.schedule(delay, lambda: self._drain_expired(rec))
        with rec.cond:
            rec.timers["drain"] = timer

    def _drain_expired(self, rec: _ProcessRecord) -> None:
        """The leader is gone but its pipes are still open: a descendant that
        left the group holds them. It is a straggler like ``sleep 1000 &``:
        end it (found by its HOPX_PROCESS_ID), so the readers reach EOF and
        no thread or descriptor stays behind; the record is final now."""
        with rec.cond:
            held = rec.open_streams > 0
        if held:
            _end_marked(rec, signal.SIGKILL)
            if rec.confinement is not None:
                rec.confinement.kill()      # an escaper in its cgroup, found without a marker
        self.finish(rec)

    def finish(self, rec: _ProcessRecord) -> None:
        """Make a record final from its exit status, once (readers, timer and
        exit handler may all get here)."""
        with rec.cond:
            stragglers = list(rec.stragglers) if rec.exit_info is not None and not rec.finished else []
        if stragglers:   # a signalled escaper may still be exiting: a final record leaves none alive
            _wait_gone(stragglers, time.monotonic() + ESCAPER_GONE_S)
        with rec.cond:
            conf = rec.confinement if rec.exit_info is not None and not rec.finished else None
        usage = conf.finish() if conf is not None else {}   # usage read, the rest ended, cgroups removed
        if conf is not None:
            rec.launch.cleanup()     # before it is final: whoever waits for it finds the code file gone
        with rec.cond:
            if rec.exit_info is None or rec.finished:
                return

            status, rusage = rec.exit_info
            rec.usage = usage
            exit_code, signame = None, None
            if status is not None:
                if os.WIFSIGNALED(status):
                    exit_code = 128 + os.WTERMSIG(status)
                    signame = _signal_name(os.WTERMSIG(status))
                else:
                    exit_code = os.WEXITSTATUS(status)
            reason = rec.kill_reason or ("signaled" if signame else "exited")
            if rec.kill_reason is None and conf is not None and conf.oom_killed(status):
                reason = "oom_killed"       # api.md §14: SIGKILL and the cgroup counted an OOM kill
            rec.rusage = rusage
            rec.set_final(reason, 124 if reason in _TIMEOUT_REASONS else exit_code, signame)
        log.debug("%s finished: %s, exit %s", rec.id, reason, exit_code)
        self.start_all(self.retire(rec, was_running=True))

    def _wait_leader(self, rec: _ProcessRecord) -> None:
        """A waiter job, where pidfds are unavailable: block until the leader
        exits (without reaping it where waitid exists; macOS before Python
        3.13 has none, and then wait4 also reaps, so the group is not signalled)."""
        try:
            if hasattr(os, "waitid"):
                os.waitid(os.P_PID, rec.pid or 0, os.WEXITED | os.WNOWAIT)
            else:
                _, status, rusage = os.wait4(rec.pid or 0, 0)
                with rec.cond:
                    rec.reaped = True
                    rec.prereaped = (status, rusage)
        except ChildProcessError:
            pass
        self._leader_exited(rec)

    def signal_group(self, rec: _ProcessRecord, sig: int) -> bool:
        """Signal the record's process group, only while its leader is unreaped
        (so a reused pid is never hit). True when the signal was sent."""
        with rec.cond:
            if rec.pid is None or rec.reaped:
                return False
            return _killpg(rec.pid, sig)

    def terminate(self, rec: _ProcessRecord) -> None:
        """SIGTERM to the group, to marked escapers and to every process of its
        cgroup now; SIGKILL (the whole cgroup) after the grace period."""
        self.signal_group(rec, signal.SIGTERM)
        _end_marked(rec, signal.SIGTERM)
        if rec.confinement is not None:
            rec.confinement.signal(signal.SIGTERM)
        self.schedule_escalation(rec, self.config.kill_grace)

    def schedule_escalation(self, rec: _ProcessRecord, delay: float) -> None:
        timer = self.watchdog.schedule(delay, lambda: self._escalate(rec))
        with rec.cond:
            rec.timers["escalate"] = timer

    def end_leftovers(self, rec: _ProcessRecord) -> int:
        """SIGTERM now, SIGKILL after the grace period, to the live processes
        that carry a finished record's marker; returns how many there were."""
        marked = _scan_marked()
        count = len(marked.get(rec.id, []))
        if count:
            _end_marked(rec, signal.SIGTERM, marked)
            self.watchdog.schedule(self.config.kill_grace, lambda: _end_marked(rec, signal.SIGKILL))
        return count

    def _escalate(self, rec: _ProcessRecord) -> None:
        self.signal_group(rec, signal.SIGKILL)
        _end_marked(rec, signal.SIGKILL)
        if rec.confinement is not None:   # freeze-kill-thaw may wait: not on the watchdog's thread
            try:
                self.workers.submit("hopx-proc-%s-cgkill" % rec.id[5:13], rec.confinement.kill)
            except (RuntimeError, Unavailable):   # no thread to be had: better late here than never
                rec.confinement.kill()



    def on_idle(self, rec: _ProcessRecord) -> None:
        """The idle timer: end the process, or look again when it could next be idle."""
        with rec.cond:
            if rec.finished or rec.exit_info is not None or rec.kill_reason is not None:
                return
            quiet = time.monotonic() - (rec.last_output or 0.0)
            idle = rec.launch.idle_timeout or 0.0
            if quiet < idle:
                rec.idle_timer = self.watchdog.schedule(idle - quiet, lambda: self.on_idle(rec))
                return
            rec.kill_reason = "idle_timeout"
        log.info("%s printed nothing for %ss: ending it", rec.id, idle)
        self.terminate(rec)

    def on_timeout(self, rec: _ProcessRecord) -> None:
        with rec.cond:   # a leader that exited on its own keeps its outcome, drained or not
            if rec.finished or rec.exit_info is not None or rec.kill_reason is not None:
                return
            rec.kill_reason = "timeout"
        log.info("%s reached its timeout of %ss", rec.id, rec.launch.timeout)
        self.terminate(rec)

    def drop_queued(self, rec: _ProcessRecord, reason: str) -> bool:
        """Take a record out of the queue, final with ``reason`` (exit code
        124 for a timeout, none otherwise: it never ran). False if not queued."""
        queued = self.registry.dequeue(rec)
        if queued:
            with rec.cond:
                rec.kill_reason = reason
                rec.set_final(reason, 124 if reason in _TIMEOUT_REASONS else None, None)
            self.retire(rec, was_running=False)
        return queued

    def wait_final_locked(self, rec: _ProcessRecord) -> None:
        """With ``rec.cond`` held: let an exited record become final (drain, at most 0.5 s)."""
        rec.cond.wait_for(lambda: rec.finished, DRAIN_AFTER_EXIT_S + 1.0)

    def close_stdin(self, rec: _ProcessRecord, *, quiet: bool = False) -> None:
        """Close the child's stdin (EOF for it); 409 if there is none, unless quiet."""
        with rec.cond:
            stream = rec.popen.stdin if rec.popen is not None else None
            if rec.stdin_closed or stream is None or rec.stdin_busy:
                if quiet:
                    return
                raise Conflict("process %s has no open stdin" % rec.id)
            rec.stdin_closed = True
        try:
            stream.close()
        except OSError:
            pass

    def retire(self, rec: _ProcessRecord, *, was_running: bool) -> List[_ProcessRecord]:
        """After a record became final: its temp file, its timers, the registry's
        book-keeping, its finish callbacks; returns queued records to start now."""
        rec.launch.cleanup()
        for timer in (rec.timer, rec.idle_timer):
            if timer is not None:
                timer.cancel()
        ready = self.registry.retire(rec, was_running=was_running)
        for callback in rec.on_finish:
            try:
                callback(rec)
            except Exception:
                log.exception("finish callback of %s failed", rec.id)
        with rec.cond:
            rec.compact()
        return ready

    def stop(self, deadline: float) -> None:
        """Join the threads (the worker pool, the exit watcher, the watchdog) until ``deadline``."""
        self.workers.stop(max(0.0, deadline - time.monotonic()))
        self.exits.stop(max(0.0, deadline - time.monotonic()))
        self.watchdog.stop(max(0.0, deadline - time.monotonic()))
        self.parking.close()


# ============================================================================
# Process manager
# ============================================================================


class ProcessManager:
    """Starts, watches, queues, times out and ends child process groups.

    Every child runs through ``start()``: one code path for background runs,
    synchronous runs and commands. The manager coordinates its collaborators:
    the launcher (languages, code files, environment), the spawner (every
    child's Popen), the registry (records, queue, retention), the lifecycle
    (pipes, exits, timers, ending a group) and the subreaper. Lock order: the
    registry's lock may be taken before a record's ``cond``, never after it.
    """

    def __init__(self, config: Optional[AgentConfig] = None, *,
                 environ: Optional[Dict[str, str]] = None) -> None:
        self.config = config or AgentConfig()
        self.stopping = threading.Event()   # set by shutdown(); webhook retries stop waiting
        self.limits = _limits_from(self.config)   # probes cgroups, protects the agent (api.md §14)
        self.spawner = _Spawner(self.limits)
        self.launcher = _Launcher(self.config, environ)
        self.registry = _Registry(self.config)
        self.lifecycle = _Lifecycle(self.config, self.registry, self.spawner)
        self.watchdog = self.lifecycle.watchdog   # one timer thread, shared by every family
        self.subreaper = _Subreaper(self.spawner, self.stopping)
        self.heap = _HeapTrim(self.watchdog.schedule, _malloc_trim_function())   # any family may report to it
        self.registry.on_freed = self.heap.freed
        self.interrupt = threading.Event()   # an upgrade wakes the long polls (?wait=): they answer now

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of the counters /metrics reports."""
        self.registry.count(name, n)

    # -- the environment and launches (the launcher's) ------------------------------

    def env_snapshot(self) -> Dict[str, str]:
        """Agent environment overlaid with the global store (what GET /env shows)."""
        return self.launcher.env_snapshot()

    def env_set(self, values: Dict[str, str], *, replace: bool) -> None:
        self.launcher.env_set(values, replace=replace)

    def env_delete(self, keys: Optional[Iterable[str]] = None) -> None:
        """Forget the given keys of the global store, or all of it."""
        self.launcher.env_delete(keys)

    def resolve_cwd(self, value: Optional[str]) -> str:
        return self.launcher.resolve_cwd(value)

    def code_launch(self, code: str, language: Optional[str], **kwargs: Any) -> _Launch:
        """A launch that runs ``code`` with the language's interpreter from a temp file."""
        return self.launcher.code_launch(code, language, **kwargs)

    def command_launch(self, command: str, args: Optional[List[str]] = None, **kwargs: Any) -> _Launch:
        """A launch of ``[command] + args`` as argv, or of a shell string through /bin/sh -c."""
        return self.launcher.command_launch(command, args, **kwargs)

    # -- starting and ending ------------------------------------------------------

    def start(self, launch: _Launch, *,
              on_finish: Iterable[Callable[[_ProcessRecord], None]] = ()) -> _ProcessRecord:
        """Run ``launch`` now, or queue it when max-running children run.

        Raises Unavailable while shutting down and LimitExceeded (429) when
        the queue is full; the launch's temp file is removed in both cases.
        """
        rec = _ProcessRecord(launch, self.config.max_output_bytes)
        rec.on_finish.extend(on_finish)      # before the child exists, so none can be missed
        launch.env[PROCESS_ID_ENV] = rec.id
        self.prepare(rec)
        try:
            run_now = self.registry.admit(rec)
        except AgentError:
            launch.cleanup()
            raise
        if run_now:
            self.lifecycle.start_all([rec], refuse_first=True)
        if self.registry.journal is not None:   # before the caller answers with the id
            self.registry.journal.created(rec)
        return rec

    def prepare(self, rec: _ProcessRecord) -> None:
        """What every record gets, started here or taken over from a previous agent."""
        rec.final_hook = self._on_final

    def _on_final(self, rec: _ProcessRecord) -> None:
        """set_final's hook (``rec.cond`` held): its place in the finished order, and the journal."""
        rec.fseq = next(self.registry.fseq)
        if self.registry.journal is not None:
            self.registry.journal.ended(rec)

    def record_changed(self, rec: _ProcessRecord) -> None:
        """A final record's ``extra`` changed (a webhook delivery): the journal keeps it."""
        if self.registry.journal is not None:
            self.registry.journal.changed(rec)

    def interrupt_waits(self, on: bool) -> None:
        """Wake every long poll so that it answers now (an upgrade is about to exec), or stop doing so."""
        if not on:
            self.interrupt.clear()
            return
        self.interrupt.set()
        for rec in self.registry.all():
            with rec.cond:
                rec.cond.notify_all()

    def kill(self, process_id: str, sig: Optional[int] = None, *, wait: bool = True) -> Dict[str, Any]:
        """End a process and its group (api.md §5 Kill); with ``sig``, only send that signal.

        A queued process leaves the queue; a finished one is left as it is.
        With ``wait`` the call returns once the leader is gone (at most the
        grace period plus a little).
        """
        rec = self.get(process_id)
        if self.drop_queued(rec, "killed"):
            return {"process_id": rec.id, "status": "killed", "message": "removed from the queue"}
        with rec.cond:
            if rec.finished or rec.exit_info is not None:   # exited: its real outcome stands
                self.lifecycle.wait_final_locked(rec)
                answer = {"process_id": rec.id, "status": rec.status, "record_status": rec.status,
                          "exit_code": rec.exit_code, "message": "process already finished; its outcome stands"}
            else:
                answer = None
        if answer is not None:      # ...but what it left running (a daemon with its marker) ends now
            left = self.lifecycle.end_leftovers(rec)
            answer.update(leftovers_ended=left)
            return answer
        with rec.cond:
            if sig is not None:
                if rec.pid is None:
                    raise Conflict("process %s has not started yet" % rec.id)
                if not rec.reaped:
                    _killpg(rec.pid, sig)
                return {"process_id": rec.id, "status": rec.status, "signal": _signal_name(sig),
                        "message": "sent %s to the process group" % _signal_name(sig)}
            first = rec.kill_reason is None
            if first:
                rec.kill_reason = "killed"
            started = rec.pid is not None
        if first and started:
            self.lifecycle.terminate(rec)
        if wait:
            with rec.cond:
                rec.cond.wait_for(lambda: rec.finished, self.config.kill_grace + 2.0)
        with rec.cond:
            return {"process_id": rec.id, "status": "killed",
                    "message": "process group terminated" if rec.finished else "termination in progress",
                    "exit_code": rec.exit_code, "signal": rec.signal, "record_status": rec.status,
                    "stragglers_killed": len(rec.stragglers)}

    def time_out(self, rec: _ProcessRecord) -> None:
        """End a record as its timeout would (a synchronous run's deadline
        counts from the request, queue time included)."""
        if not self.drop_queued(rec, "timeout"):
            self.lifecycle.on_timeout(rec)

    def drop_queued(self, rec: _ProcessRecord, reason: str) -> bool:
        """Take a record out of the queue, final with ``reason``; False if not queued."""
        return self.lifecycle.drop_queued(rec, reason)

    def send_signal(self, process_id: str, sig: int) -> Dict[str, Any]:
        """Deliver one signal to a running process's group, without escalation (409 otherwise)."""
        rec = self.get(process_id)
        with rec.cond:
            if rec.finished or rec.pid is None or rec.reaped:
                raise Conflict("process %s is %s; no signal sent" % (rec.id, rec.status))
            _killpg(rec.pid, sig)
            return {"process_id": rec.id, "status": rec.status, "signal": _signal_name(sig),
                    "message": "sent %s to the process group" % _signal_name(sig)}

    # -- stdin ------------------------------------------------------------------

    def write_stdin(self, process_id: str, data: bytes, eof: bool = False) -> Dict[str, Any]:
        """Write to a child's stdin (started with stdin: true), then close it on ``eof``.

        A child on a pty keeps its stdin: ``eof`` writes the terminal's EOF
        character (^D) after the data instead. A child that does not read
        cannot hold the caller longer than STDIN_WRITE_TIMEOUT_S: what did
        not fit is reported as a 409.
        """
        rec = self.get(process_id)
        if eof and rec.pty_eof is None and not data:
            self.close_stdin(rec)
            return {"process_id": rec.id, "written": 0, "stdin": "closed"}
        if eof and rec.pty_eof is not None:
            data, eof = data + rec.pty_eof, False
        with rec.cond:
            if rec.stdin_closed or rec.popen is None or rec.popen.stdin is None:
                raise Conflict("process %s has no open stdin" % rec.id)
            if rec.stdin_busy:
                raise Conflict("another write to the stdin of %s is in progress" % rec.id)
            rec.stdin_busy = True
            fd = rec.popen.stdin.fileno()
        written = 0
        try:
            written = _write_before(fd, data, time.monotonic() + STDIN_WRITE_TIMEOUT_S)
        except OSError as exc:    # EPIPE: the child closed its end or exited
            raise Conflict("stdin of %s is closed (%s)" % (rec.id, exc.strerror or exc)) from None
        finally:
            with rec.cond:
                rec.stdin_busy = False
                leader_gone = rec.reaped
            if leader_gone:     # the waiter left stdin open for us: close it now
                self.lifecycle.close_stdin(rec, quiet=True)
        if written < len(data):
            raise Conflict("stdin of %s is full: the process is not reading (wrote %d of %d bytes)"
                           % (rec.id, written, len(data)))
        if eof:
            self.lifecycle.close_stdin(rec, quiet=True)
        return {"process_id": rec.id, "written": written, "stdin": "closed" if rec.stdin_closed else "open"}


    def close_stdin(self, rec: _ProcessRecord, *, quiet: bool = False) -> None:
        """Close the child's stdin (EOF for it); 409 if there is none, unless quiet."""
        self.lifecycle.close_stdin(rec, quiet=quiet)

    def idempotent_start(self, key: str, digest: str, start: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """Run ``start`` once per Idempotency-Key (see _Registry.idempotent_start)."""
        return self.registry.idempotent_start(key, digest, start)

    def enable_subreaper(self) -> bool:
        """Adopt and reap orphaned descendants (the CLI agent, whose children are all ours)."""
        return self.subreaper.enable()

    # -- reading --------------------------------------------------------------

    def get(self, process_id: str) -> _ProcessRecord:
        return self.registry.get(process_id)

    def describe(self, rec: _ProcessRecord, *, output: bool = True,
                 offsets: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Any]:
        position = self.registry.position(rec) if rec.status == "queued" else None
        with rec.cond:
            return rec.to_json(output=output, offsets=offsets, queue_position=position)

    def list(self, *, statuses: Optional[Iterable[str]] = None, name: Optional[str] = None,
             output: bool = True) -> List[Dict[str, Any]]:
        """Records oldest first, filtered by status and name."""
        return [json.loads(item) for item in self.list_json(statuses=statuses, name=name, output=output)]

    def list_json(self, *, statuses: Optional[Iterable[str]] = None, name: Optional[str] = None,
                  output: bool = True) -> List[bytes]:
        """The records of list(), each as cached JSON bytes (what the HTTP listing sends)."""
        return self.registry.list_json(statuses=statuses, name=name, output=output)

    def wait(self, rec: _ProcessRecord, timeout: float) -> bool:
        """Block until the record is final or ``timeout`` passes; True when final."""
        with rec.cond:
            return rec.cond.wait_for(lambda: rec.finished, timeout)

    def wait_for_output(self, rec: _ProcessRecord, offsets: Dict[str, Optional[int]],
                        timeout: float) -> None:
        """Block until there is output past ``offsets`` (past what exists now
        for a stream without one), the record is final, or ``timeout`` passes."""
        with rec.cond:
            marks = {name: offsets.get(name) if offsets.get(name) is not None
                     else rec.stream(name).end(False) for name in ("stdout", "stderr")}
            with _waiting_for_output(rec, marks):
                rec.cond.wait_for(lambda: rec.finished or self.interrupt.is_set() or any(
                    rec.stream(name).end(False) > mark for name, mark in marks.items()), timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters for /metrics."""
        return self.registry.stats()

    # -- shutting down ----------------------------------------------------------

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """End every process group (TERM, grace, KILL), drop the queue, join
        every thread; returns within ``timeout`` (default: grace + 2 s)."""
        grace = self.config.kill_grace
        deadline = time.monotonic() + (grace + 2.0 if timeout is None else timeout)
        self.stopping.set()
        queued, live = self.registry.close()
        for rec in queued:
            with rec.cond:
                rec.kill_reason = "shutdown"
                rec.set_final("shutdown", None, None)
            self.lifecycle.retire(rec, was_running=False)
        marked = _scan_marked()
        for rec in live:
            with rec.cond:
                if not rec.finished and rec.exit_info is None:
                    rec.kill_reason = rec.kill_reason or "shutdown"
            self.lifecycle.signal_group(rec, signal.SIGTERM)
            _end_marked(rec, signal.SIGTERM, marked)
            if rec.confinement is not None:
                rec.confinement.signal(signal.SIGTERM)
        term_deadline = min(deadline, time.monotonic() + grace)
        for rec in live:
            self.wait(rec, max(0.0, term_deadline - time.monotonic()))
            if not rec.finished:
                self.lifecycle.signal_group(rec, signal.SIGKILL)
                if rec.confinement is not None:
                    rec.confinement.kill()
        marked = _scan_marked()
        for rec in live:
            _end_marked(rec, signal.SIGKILL, marked)
        _wait_gone([pid for rec in live for pid in marked.get(rec.id, [])], deadline)
        for rec in live:
            self.wait(rec, max(0.0, deadline - time.monotonic()))
            with rec.cond:
                rec.cond.wait_for(lambda: rec.open_streams == 0, max(0.0, deadline - time.monotonic()))
        self.lifecycle.stop(deadline)
        self.subreaper.stop(deadline)
        self.limits.close()          # what is left in cgroups is killed, the cgroups removed



# ============================================================================
# Webhooks: the result of /execute/async POSTed to its callback_url
# ============================================================================

WEBHOOK_ATTEMPTS = 4                  # first try plus three retries
WEBHOOK_TIMEOUT_S = 10.0              # per attempt: connect, send, read the status
WEBHOOK_BACKOFF_S = 1.0               # doubled after each failed attempt


class _Webhook:
    """Delivers one record's result to its callback URL on a thread of its own."""

    def __init__(self, manager: ProcessManager, url: str, headers: Dict[str, str],
                 signing_secret: Optional[str]) -> None:
        self.manager = manager
        self.url = url
        self.headers = headers
        self.signing_secret = signing_secret
        self.attempts = 0            # made so far (an upgrade's successor goes on from there)
        self.state = "waiting"       # "waiting" for the record's end, "delivering", "done"

    def __call__(self, rec: _ProcessRecord) -> None:
        with rec.cond:
            rec.extra["webhook"] = {"url": self.url, "delivered": False, "attempts": 0,
                                    "last_status": None, "last_error": None}
            rec.changes += 1
        self.manager.record_changed(rec)
        self._start_thread(rec, WEBHOOK_ATTEMPTS)

    def _start_thread(self, rec: _ProcessRecord, tries: int) -> None:
        """The delivery thread; where none can be had now, try again later (a
        result is not dropped for want of a thread)."""
        self.state = "delivering"
        try:
            threading.Thread(target=self._deliver, args=(rec,), daemon=True,
                             name="hopx-webhook-%s" % rec.id[5:13]).start()
        except RuntimeError:
            if tries <= 1 or self.manager.stopping.is_set():
                log.warning("webhook for %s not delivered: no thread could be started", rec.id)
                self.manager.count("webhooks_failed")
                self.state = "done"
                return
            self.manager.watchdog.schedule(WEBHOOK_BACKOFF_S, lambda: self._start_thread(rec, tries - 1))

    def hand_over(self) -> Dict[str, Any]:
        """What an upgrade's successor needs to deliver it (kept in memory only, never on disk)."""
        return {"url": self.url, "headers": self.headers, "secret": self.signing_secret,
                "attempts": self.attempts, "state": self.state}

    @classmethod
    def adopt(cls, manager: ProcessManager, rec: _ProcessRecord, state: Dict[str, Any]) -> None:
        """The successor's side: wait for the record's end, or go on delivering."""
        hook = cls(manager, state["url"], dict(state.get("headers") or {}), state.get("secret"))
        hook.attempts = int(state.get("attempts") or 0)
        if state.get("state") == "waiting":
            rec.on_finish.append(hook)
        elif state.get("state") == "delivering":
            hook._start_thread(rec, WEBHOOK_ATTEMPTS)

    def payload(self, rec: _ProcessRecord) -> bytes:
        with rec.cond:
            status = "timeout" if rec.reason == "timeout" else rec.status
            body = {"execution_id": rec.execution_id, "process_id": rec.id, "status": status,
                    "success": rec.status == "completed",
                    "stdout": rec.stdout.read(None, True)[0], "stderr": rec.stderr.read(None, True)[0],
                    "exit_code": rec.exit_code, "execution_time": rec.duration,
                    "timestamp": _rfc3339(time.time()), "error": rec.error or (
                        None if rec.status == "completed" else "process %s" % rec.reason)}
        return json.dumps(body).encode("utf-8")

    def _post(self, body: bytes) -> int:
        import urllib.error
        import urllib.request
        stamp = str(int(time.time()))
        headers = dict(self.headers)
        headers.update({"Content-Type": "application/json", "X-HopX-Timestamp": stamp,
                        "User-Agent": "hopx-agent/" + __version__})
        if self.signing_secret is not None:
            mac = hmac.new(self.signing_secret.encode("utf-8"), stamp.encode("ascii") + body, hashlib.sha256)
            headers["X-HopX-Signature"] = "sha256=" + mac.hexdigest()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _deliver(self, rec: _ProcessRecord) -> None:
        body = self.payload(rec)
        delay = WEBHOOK_BACKOFF_S * 2 ** self.attempts
        delivered, attempt = False, self.attempts
        for attempt in range(self.attempts + 1, WEBHOOK_ATTEMPTS + 1):
            status, error = None, None
            try:
                status = self._post(body)
            except Exception as exc:  # network errors of every kind are one more failed attempt
                error = "%s: %s" % (type(exc).__name__, exc)
            delivered = status is not None and 200 <= status < 300
            self.attempts = attempt
            with rec.cond:
                rec.extra["webhook"].update(attempts=attempt, last_status=status,
                                            last_error=error, delivered=delivered)
                rec.changes += 1
            self.manager.record_changed(rec)
            # 4xx other than 408/429 will not change on a retry
            final = delivered or (status is not None and 400 <= status < 500 and status not in (408, 429))
            if final or attempt == WEBHOOK_ATTEMPTS or self.manager.stopping.wait(delay):
                break
            delay *= 2
        self.state = "done"
        self.manager.count("webhooks_delivered" if delivered else "webhooks_failed")
        log.info("webhook for %s: %s after %d attempt(s)", rec.id,
                 "delivered" if delivered else "failed", attempt)


# ============================================================================
# Durability: the state directory and the journal
# ============================================================================
#
# What a restarted agent knows comes from its state directory (--state-dir),
# private (0700, the agent's own, never a symlink) and held by one agent at a
# time (an flock that an upgrade's exec keeps):
#
#   lock       the flock; holds the holder's pid, for the error message
#   instance   the directory's id: every child carries it as HOPX_AGENT_STATE,
#              which is how a restarted agent proves that a process is its orphan
#   journal    an append-only log of checksummed JSON lines, one per event of a
#              record (new, run, end, set, gone), rewritten when mostly dead
#   out/<id>   a record's retained output (final) or its output tail so far
#              (running, a checkpoint), checksummed, written whole and renamed
#   aside/     corrupt or foreign files, set aside (the newest ASIDE_KEEP kept)
#
# The events a client may rely on at once are appended before they are
# visible (a new record before its id is answered, an outcome as it is
# reached): one write(2) to the page cache, which a crash of the agent
# cannot lose. Everything else (output files, deletions, checkpoints, fsync,
# compaction) is done by one writer thread, off the request path.

STATE_DIR_ENV = "HOPX_AGENT_STATE"       # every child carries its agent's state-dir id (orphans are proven by it)
JOURNAL_VERSION = 1                      # format of the journal and the out files; another one is set aside
CHECKPOINT_S = 1.0                       # a running record's output tail is saved this often, when it grew
CHECKPOINT_TAIL_BYTES = 64 * 1024        # per stream of a running record; a final one keeps its whole window
ASIDE_KEEP = 8                           # corrupt or foreign files kept for a post-mortem, newest first
COMPACT_SLACK_LINES = 4096               # the log is rewritten when it has more lines than 3 per record + this
MAX_JOURNAL_LINE_BYTES = 32 * 1024 * 1024   # a longer line is corruption (a record's text fields are bounded)
_JOURNAL_FORMAT = "hopx-agent-journal"
_OUT_MAGIC = b"HOPXOUT"
_RECORD_ID = re.compile(r"\Aproc_[0-9a-f]{24}\Z")
_DIR_ID = re.compile(r"\A[0-9a-f]{32}\Z")


class _StateDirError(Exception):
    """The state directory cannot be used: not ours, not private, or held by another agent."""


def _default_state_dir(port: int, environ: Dict[str, str]) -> Optional[str]:
    """--state-dir's default: one directory per port (two agents of one
    machine never share one) under $XDG_STATE_HOME, /var/lib when writable,
    else a per-user directory in the temp dir. None for --port 0: an agent
    on a random port has no successor to share its state with."""
    if not port:
        return None
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        base = os.path.join(xdg, "hopx-agent")
    elif os.access("/var/lib", os.W_OK):
        base = "/var/lib/hopx-agent"
    else:
        import tempfile
        base = os.path.join(tempfile.gettempdir(), "hopx-agent-%d" % os.geteuid())
    return os.path.join(base, str(port))


def _private_dir(name: str, dir_fd: Optional[int] = None) -> int:
    """Create ``name`` (0700) if missing and open it; refuse a symlink, a
    directory of another user or one others may write to (tightened to 0700
    when it is ours). Returns its descriptor."""
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise _StateDirError("cannot open %s: %s (a symlink or not a directory?)" % (name, exc.strerror)) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise _StateDirError("%s belongs to uid %d, not to this agent (uid %d)" % (name, st.st_uid, os.geteuid()))
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)
    return fd


def _crc_line(payload: Dict[str, Any]) -> bytes:
    """One journal line: the CRC-32 of the JSON, a space, the JSON (ASCII, so no newline inside)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(data), data)


def _parse_line(line: bytes) -> Optional[Dict[str, Any]]:
    """The JSON object of one journal line, or None when its checksum or JSON is wrong."""
    if len(line) < 11 or line[8:9] != b" " or len(line) > MAX_JOURNAL_LINE_BYTES:
        return None
    data = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(data):
            return None
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class _StateDir:
    """The agent's state directory, opened and held (see the section comment).
    Every file operation goes through the directory descriptors, so that the
    path cannot be swapped under the agent once it was checked."""

    def __init__(self, path: str, fds: Dict[str, int], lock_fd: int, dir_id: str) -> None:
        self.path = path
        self.fd, self.out_fd, self.aside_fd = fds["."], fds["out"], fds["aside"]
        self.lock_fd = lock_fd            # the flock lives on it; an upgrade's exec keeps it (handed over)
        self.dir_id = dir_id
        self._warned = 0                  # set-aside warnings logged at this start (capped)

    @classmethod
    def open(cls, path: str, *, lock_fd: Optional[int] = None) -> "_StateDir":
        """Open (creating it 0700) and lock the directory; ``lock_fd`` is the
        lock an upgraded agent inherited. _StateDirError when unusable."""
        path = os.path.abspath(path)
        parent, leaf = os.path.split(path)
        os.makedirs(parent, 0o700, exist_ok=True)
        parent_fd = None
        if os.path.basename(parent).startswith("hopx-agent"):   # the default's base: ours and private too
            parent_fd = _private_dir(parent)
        try:
            fds = {".": _private_dir(leaf if parent_fd is not None else path, dir_fd=parent_fd)}
        finally:
            if parent_fd is not None:
                os.close(parent_fd)
        try:
            lock_fd = cls._lock(fds["."]) if lock_fd is None else cls._check_lock(fds["."], lock_fd)
            for sub in ("out", "aside"):
                fds[sub] = _private_dir(sub, dir_fd=fds["."])
            state = cls(path, fds, lock_fd, "")
            state.dir_id = state._read_dir_id()
            return state
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise

    @staticmethod
    def _lock(dirfd: int) -> int:
        import fcntl
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise _StateDirError("in use by another agent (pid %s)" % holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return fd

    @staticmethod
    def _check_lock(dirfd: int, lock_fd: int) -> int:
        """An inherited lock must be this directory's lock file."""
        st, fst = os.stat("lock", dir_fd=dirfd, follow_symlinks=False), os.fstat(lock_fd)
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            raise _StateDirError("the inherited lock is not this directory's")
        return lock_fd

    def _read_dir_id(self) -> str:
        """The directory's id from ``instance``, made once (a bad file is set aside)."""
        try:
            fd = os.open("instance", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
            with os.fdopen(fd, "rb") as fh:
                text = fh.read(64).decode("ascii", "replace").strip()
            if _DIR_ID.match(text):
                return text
            self.set_aside(self.fd, "instance", "not a state-dir id: orphans of a previous agent "
                                                "cannot be proven and are left alone")
        except FileNotFoundError:
            pass
        dir_id = secrets.token_hex(16)
        self.write_atomic(self.fd, "instance", [dir_id.encode("ascii") + b"\n"], sync=True)
        return dir_id

    def write_atomic(self, dirfd: int, name: str, parts: List[Any], *, sync: bool) -> int:
        """Write ``parts`` to ``name`` whole: a temp file renamed over it
        (fdatasync'ed first with ``sync``, so that a power loss leaves the old
        file or the new one, never a part). Returns the bytes written."""
        tmp = name + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
        try:
            size = _writev_all(fd, parts)
            if sync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp, dirfd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        return size

    def set_aside(self, dirfd: int, name: str, why: str) -> None:
        """Move a corrupt or foreign file to aside/ with one WARNING line; keep the newest ASIDE_KEEP."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = "%s.%s.%s" % (name, stamp, secrets.token_hex(2))
        try:
            os.rename(name, target, src_dir_fd=dirfd, dst_dir_fd=self.aside_fd)
        except OSError as exc:
            log.warning("state dir %s: cannot set %s aside (%s); removing it", self.path, name, exc)
            _unlink_quietly(name, dirfd)
            return
        self._warned += 1
        if self._warned <= 10:
            log.warning("state dir %s: %s set aside as aside/%s: %s", self.path, name, target, why)
        elif self._warned == 11:
            log.warning("state dir %s: more files set aside; see aside/", self.path)
        self._prune_aside()

    def _prune_aside(self) -> None:
        entries = []
        for name in os.listdir(self.aside_fd):
            try:
                entries.append((os.stat(name, dir_fd=self.aside_fd, follow_symlinks=False).st_mtime, name))
            except OSError:
                pass
        for _, name in sorted(entries, reverse=True)[ASIDE_KEEP:]:
            _unlink_quietly(name, self.aside_fd)

    def usage(self) -> int:
        """Bytes the directory's files use (journal, out, aside)."""
        total = 0
        for dirfd in (self.fd, self.out_fd, self.aside_fd):
            for name in os.listdir(dirfd):
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    total += st.st_size
        return total

    def close(self) -> None:
        """Release the directory (and its lock: another agent may take it)."""
        for fd in (self.out_fd, self.aside_fd, self.fd, self.lock_fd):
            _close_quietly(fd)


def _writev_all(fd: int, parts: List[Any]) -> int:
    """writev until every byte of ``parts`` is written (regular files may write short)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]
    return total


def _unlink_quietly(name: str, dirfd: Optional[int] = None) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


# -- a record as the journal keeps it ---------------------------------------------------------
#
# A record's state is a flat JSON object of the fields below (the names of
# the record JSON where there is one). The journal's "rec" lines, the merged
# result of loading, and the records an upgrade hands over are all this
# shape, checked by one table.

_STATE_FIELDS: Dict[str, Tuple[type, ...]] = {
    "id": (str,), "seq": (int,), "execution_id": (str,), "name": (str, type(None)),
    "kind": (str,), "language": (str, type(None)), "command": (str, type(None)),
    "timeout": (int, float), "working_dir": (str,), "idle_timeout": (int, float, type(None)),
    "stdin": (bool,), "created": (int, float), "tempfile": (str, type(None)),
    "status": (str,), "pid": (int, type(None)), "started": (int, float, type(None)),
    "starttime": (int, type(None)), "boot_id": (str, type(None)),
    "fseq": (int, type(None)), "reason": (str, type(None)), "exit_code": (int, type(None)),
    "signal": (str, type(None)), "ended": (int, float, type(None)), "duration": (int, float, type(None)),
    "error": (str, type(None)), "usage": (list, type(None)), "stragglers": (list,),
    "extra": (dict,), "stdout_bytes": (int,), "stderr_bytes": (int,),
    "idempotency": (list, type(None)), "kill_reason": (str, type(None)), "cgroups": (list,),
    "pty": (list, type(None)), "limits": (dict, type(None)), "user": (dict, type(None)), "cg_usage": (dict,),
}
_STATE_DEFAULTS: Dict[str, Any] = {
    "name": None, "language": None, "command": None, "idle_timeout": None, "stdin": False,
    "tempfile": None, "pid": None, "started": None, "starttime": None, "boot_id": None, "fseq": None,
    "reason": None, "exit_code": None, "signal": None, "ended": None, "duration": None, "error": None,
    "usage": None, "stragglers": [], "extra": {}, "stdout_bytes": 0, "stderr_bytes": 0,
    "idempotency": None, "kill_reason": None, "cgroups": [], "pty": None, "limits": None, "user": None,
    "cg_usage": {},
}
_STATE_STATUSES = ("queued", "running", "completed", "failed")


def _check_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A record state with every field present and of its type; ValueError otherwise."""
    full = dict(_STATE_DEFAULTS)
    full.update((k, v) for k, v in state.items() if k in _STATE_FIELDS)
    for key, kinds in _STATE_FIELDS.items():
        if key not in full:
            raise ValueError("field %s missing" % key)
        value = full[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError("field %s is %r" % (key, type(value).__name__))
    if not _RECORD_ID.match(full["id"]) or full["status"] not in _STATE_STATUSES:
        raise ValueError("bad id or status")
    usage = full["usage"]
    if usage is not None and (len(usage) != 3 or not all(isinstance(u, (int, float)) for u in usage)):
        raise ValueError("bad usage")
    if not all(isinstance(p, int) for p in full["stragglers"]):
        raise ValueError("bad stragglers")
    if not all(isinstance(d, str) for d in full["cgroups"]):
        raise ValueError("bad cgroups")
    limits = full["limits"] or {}
    if not all(k in _LIMIT_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
               for k, v in limits.items()):
        raise ValueError("bad limits")
    user = full["user"]
    if user is not None and not (isinstance(user.get("name"), str) and isinstance(user.get("home"), str)
                                 and all(isinstance(user.get(k), int) for k in ("uid", "gid"))
                                 and isinstance(user.get("groups"), list)
                                 and all(isinstance(g, int) for g in user["groups"])):
        raise ValueError("bad user")
    return full


def _record_state(rec: _ProcessRecord) -> Dict[str, Any]:
    """The record as a journal state (call with ``rec.cond`` held)."""
    launch = rec.launch
    usage = rec.rusage
    return {
        "id": rec.id, "seq": rec.seq, "execution_id": rec.execution_id, "name": launch.name,
        "kind": launch.kind, "language": launch.language, "command": launch.command,
        "timeout": launch.timeout, "working_dir": launch.cwd, "idle_timeout": launch.idle_timeout,
        "stdin": launch.stdin, "created": rec.created, "tempfile": launch.tempfile,
        "status": rec.status, "pid": rec.pid, "started": rec.started,
        "starttime": rec.starttime, "boot_id": rec.boot_id,
        "fseq": rec.fseq or None, "reason": rec.reason, "exit_code": rec.exit_code,
        "signal": rec.signal, "ended": rec.ended, "duration": rec.duration, "error": rec.error,
        "usage": None if usage is None else [usage.ru_utime, usage.ru_stime, usage.ru_maxrss],
        "stragglers": sorted(rec.stragglers), "extra": dict(rec.extra),
        "stdout_bytes": rec.stdout.total, "stderr_bytes": rec.stderr.total,
        "idempotency": rec.idempotency, "kill_reason": rec.kill_reason, "cgroups": list(rec.cgroups),
        "pty": list(launch.pty) if launch.pty else None, "cg_usage": dict(rec.usage),
        "limits": _limits_state(launch.limits), "user": _user_state(launch.user),
    }


def _start_state(rec: _ProcessRecord) -> Dict[str, Any]:
    """What is known of a record when it starts (call with ``rec.cond`` held):
    a shorter line than the whole state, on the request's path."""
    launch = rec.launch
    return {
        "id": rec.id, "seq": rec.seq, "execution_id": rec.execution_id, "name": launch.name,
        "kind": launch.kind, "language": launch.language, "command": launch.command,
        "timeout": launch.timeout, "working_dir": launch.cwd, "idle_timeout": launch.idle_timeout,
        "stdin": launch.stdin, "created": rec.created, "tempfile": launch.tempfile, "status": rec.status,
        "pid": rec.pid, "started": rec.started, "starttime": rec.starttime, "boot_id": rec.boot_id,
        "pty": list(launch.pty) if launch.pty else None, "cgroups": list(rec.cgroups),
        "limits": _limits_state(launch.limits), "user": _user_state(launch.user),
    }


def _limits_state(limits: Any) -> Optional[Dict[str, Any]]:
    given = limits.given() if limits is not None else {}
    return given or None


def _user_state(user: Any) -> Optional[Dict[str, Any]]:
    if user is None:
        return None
    return {"name": user.name, "uid": user.uid, "gid": user.gid, "groups": list(user.groups), "home": user.home}


def _user_of(state: Optional[Dict[str, Any]]) -> Any:
    if not state:
        return None
    return _RunAs(str(state["name"]), int(state["uid"]), int(state["gid"]),
                  tuple(int(g) for g in state["groups"]), str(state["home"]))


def _restored_buffer(cap: int, total: int, data: bytes) -> _OutputBuffer:
    """An output buffer that holds ``data`` as the newest bytes of ``total`` written."""
    buf = _OutputBuffer(cap)
    buf.append(data[len(data) - cap:] if cap and len(data) > cap else data)
    buf.total = max(total, buf.held)
    return buf


def _restore_record(state: Dict[str, Any], cap: int, out: bytes = b"", err: bytes = b"") -> _ProcessRecord:
    """A record rebuilt from its state and retained output, with no child:
    a finished one as a restart loads it (an upgrade adds the rest)."""
    launch = _Launch(argv=[], cwd=state["working_dir"], env={}, kind=state["kind"],
                     language=state["language"], command=state["command"], name=state["name"],
                     timeout=state["timeout"], stdin=state["stdin"], tempfile=state["tempfile"],
                     idle_timeout=state["idle_timeout"],
                     pty=tuple(state["pty"]) if state["pty"] and len(state["pty"]) == 2 else None,
                     limits=_LimitValues(**state["limits"]) if state["limits"] else None,
                     user=_user_of(state["user"]))
    rec = _ProcessRecord(launch, cap)
    rec.id, rec.execution_id = state["id"], state["execution_id"]
    for key in ("status", "pid", "started", "reason", "exit_code", "signal", "ended", "duration",
                "error", "created", "kill_reason", "seq", "starttime", "boot_id", "idempotency"):
        setattr(rec, key, state[key])
    rec.fseq = state["fseq"] or 0
    rec.idempotency_key = state["idempotency"][0] if state["idempotency"] else None
    rec.cgroups = list(state["cgroups"])
    rec.rusage = None if state["usage"] is None else _Usage(*state["usage"])
    rec.stragglers = set(state["stragglers"])
    rec.extra = dict(state["extra"])
    rec.usage = dict(state["cg_usage"])
    rec.reaped = True                     # never ours to signal: its pid may be anyone's now
    rec.stdin_closed = True
    rec.journaled = True
    rec.stdout = _restored_buffer(cap, state["stdout_bytes"], out)
    rec.stderr = _restored_buffer(cap, state["stderr_bytes"], err)
    return rec


def _boot_id() -> Optional[str]:
    """This boot's id: a pid and a start time name the same process only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            return fh.read(64).decode("ascii", "replace").strip() or None
    except OSError:
        return None


def _proc_identity(pid: int) -> Optional[Tuple[int, int, int]]:
    """(start time in clock ticks since boot, session id, process group) from /proc/<pid>/stat."""
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY)
        try:
            data = os.read(fd, 2048)
        finally:
            os.close(fd)
        fields = data[data.rindex(b")") + 2:].split()   # the name may hold spaces and parentheses
        return int(fields[19]), int(fields[3]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def _tail_bytes(buf: _OutputBuffer, limit: Optional[int] = None) -> bytes:
    """The newest ``limit`` bytes a buffer holds (all of them without a limit), copied."""
    start = buf.dropped if limit is None else max(buf.dropped, buf.total - limit)
    return buf._slice(start, buf.total)


class _Journal:
    """The records' journal in a state directory (see the section comment).

    created/ran/ended/changed/forget are called by the process manager at
    each step of a record's life, never with the registry lock held; each
    costs one append of a short line, plus work queued for the writer thread.
    A failing disk never fails a request: the journal logs one WARNING per
    kind of error and the records live on in memory.
    """

    def __init__(self, state: _StateDir, *, checkpoint_s: float = CHECKPOINT_S) -> None:
        self.state = state
        self.checkpoint_s = checkpoint_s
        self.boot_id = _boot_id()
        self._lock = threading.Lock()   # guards _fd, _lines, _unsynced: held across one append write(2), never an fsync
        self._fd = -1
        self._lines = 0                 # lines in the log since it was last rewritten
        self._unsynced = False          # lines appended since the last fdatasync
        self._cond = threading.Condition(threading.Lock())  # guards every field below
        self._tasks: "collections.OrderedDict[str, Tuple[str, Any]]" = collections.OrderedDict()
        self._live: Dict[str, Any] = {}         # running records -> totals at their last checkpoint
        self._records = 0                       # records the journal holds (for the compaction rule)
        self._next_ckpt = 0.0                   # monotonic time of the next checkpoint round
        self._busy = False                      # the writer is doing a batch
        self._doing: List[str] = []             # the ids of that batch (an upgrade hands them on)
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._errors: set = set()               # error kinds already logged

    # -- the log ---------------------------------------------------------------------

    def _open_log(self) -> None:
        self._fd = os.open("journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600,
                           dir_fd=self.state.fd)

    def _append(self, payload: Dict[str, Any]) -> None:
        line = _crc_line(payload)
        try:
            with self._lock:
                os.write(self._fd, line)   # O_APPEND: one line, whole, at the end
                self._lines += 1
                self._unsynced = True
        except OSError as exc:
            self._failed("append", exc)

    def _failed(self, kind: str, exc: BaseException) -> None:
        if kind not in self._errors:
            self._errors.add(kind)
            log.warning("journal %s: cannot %s (%s); records stay in memory, a restart may lose them",
                        self.state.path, kind, exc)

    def _header(self) -> Dict[str, Any]:
        return {"format": _JOURNAL_FORMAT, "version": JOURNAL_VERSION, "dir": self.state.dir_id,
                "agent": __version__, "written": time.time()}

    # -- events of a record's life (the manager's hooks) -----------------------------

    def created(self, rec: _ProcessRecord) -> None:
        """A record exists (queued, or running once spawned): before its id is answered."""
        with rec.cond:
            self._note_spawn(rec)
            state = _record_state(rec) if rec.finished else _start_state(rec)
            running = rec.status == "running"
            rec.journaled = True       # a queued one's spawn is journaled from now on (ran())
        state["e"] = "new"
        self._append(state)
        with self._cond:
            self._records += 1
            if running:
                self._watch_locked(rec)

    def ran(self, rec: _ProcessRecord) -> None:
        """A queued record was spawned (call with ``rec.cond`` held)."""
        self._note_spawn(rec)
        self._append({"e": "run", "id": rec.id, "pid": rec.pid, "started": rec.started,
                      "starttime": rec.starttime, "boot_id": rec.boot_id, "status": rec.status,
                      "tempfile": rec.launch.tempfile, "cgroups": list(rec.cgroups)})
        with self._cond:
            self._watch_locked(rec)

    def _watch_locked(self, rec: _ProcessRecord) -> None:
        """Checkpoint a running record from now on. The writer is woken only
        when it slept without a timeout (no record ran): a start never pays
        for a thread switch otherwise."""
        if not self._live:
            self._start_locked()
            self._cond.notify_all()
        self._live[rec.id] = (rec, 0, 0)

    def _note_spawn(self, rec: _ProcessRecord) -> None:
        """The leader's start time, read while it is unreaped (so the pid is surely its own)."""
        if rec.pid is not None and not rec.reaped and rec.starttime is None:
            stat = _proc_identity(rec.pid)
            rec.starttime, rec.boot_id = (stat[0] if stat else None), self.boot_id

    def ended(self, rec: _ProcessRecord) -> None:
        """A record became final: its outcome is appended before anyone can
        see it (call with ``rec.cond`` held), its output goes to the writer."""
        state = _record_state(rec)
        state["e"] = "rec"
        self._append(state)
        self._queue(rec.id, "final", rec)

    def changed(self, rec: _ProcessRecord) -> None:
        """``extra`` (a webhook's delivery) or the Idempotency-Key changed after the start."""
        with rec.cond:
            payload = {"e": "set", "id": rec.id, "extra": dict(rec.extra), "idempotency": rec.idempotency}
        self._append(payload)

    def output_dropped(self, rec_id: str) -> None:
        """The output budget took this finished record's output: its out file goes too."""
        self._queue(rec_id, "unlink", None)

    def forget(self, ids: Iterable[str]) -> None:
        """Records evicted by retention."""
        ids = list(ids)
        if not ids:
            return
        self._append({"e": "gone", "ids": ids})
        with self._cond:
            self._records -= len(ids)
        for rec_id in ids:
            self._queue(rec_id, "unlink", None)

    def _queue(self, rec_id: str, kind: str, rec: Any) -> None:
        with self._cond:
            self._tasks.pop(rec_id, None)      # the newest task of a record supersedes the older
            self._tasks[rec_id] = (kind, rec)
            self._live.pop(rec_id, None)
            self._start_locked()
            self._cond.notify_all()

    # -- the writer thread -----------------------------------------------------------

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="hopx-journal", daemon=True)
            self._thread.start()

    def _next_batch(self) -> Optional[Tuple[List[Tuple[str, str, Any]], List[Tuple[str, Any]]]]:
        """Wait for tasks or a checkpoint that is due (only while records run:
        an idle agent's writer sleeps without a timeout); None once stopped."""
        with self._cond:
            while True:
                now = time.monotonic()
                due = bool(self._live) and now >= self._next_ckpt
                if self._tasks or due or self._stopped:
                    break
                self._cond.wait(self._next_ckpt - now if self._live else None)
            if self._stopped and not self._tasks:
                return None
            tasks = [(rid, kind, rec) for rid, (kind, rec) in self._tasks.items()]
            self._tasks.clear()
            self._doing = [rid for rid, _, _ in tasks]
            live = list(self._live.items()) if due else []
            if due or not self._live:
                self._next_ckpt = now + self.checkpoint_s
            self._busy = True
            return tasks, live

    def _run(self) -> None:
        while True:
            try:
                batch = self._next_batch()
                if batch is None:
                    return
                for rec_id, kind, rec in batch[0]:
                    self._do(rec_id, kind, rec)
                for rec_id, entry in batch[1]:
                    self._checkpoint(rec_id, entry)
                self._sync()       # group commit: one fdatasync for the whole batch
                self._maybe_compact()
            except Exception:      # the journal must never die silently: log and go on
                log.exception("journal writer failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._doing = []
                    self._cond.notify_all()

    def _do(self, rec_id: str, kind: str, rec: Any) -> None:
        try:
            if kind == "unlink":
                _unlink_quietly(rec_id + ".out", self.state.out_fd)
            elif kind == "final":
                self._write_output(rec, final=True)
        except OSError as exc:
            self._failed("write output", exc)

    def _write_output(self, rec: _ProcessRecord, *, final: bool, limit: Optional[int] = None) -> Tuple[int, int]:
        """The record's retained output (or its tail, for a running one) to out/<id>.out."""
        with rec.cond:
            out, err = _tail_bytes(rec.stdout, limit), _tail_bytes(rec.stderr, limit)
            totals = rec.stdout.total, rec.stderr.total
        if not out and not err:
            _unlink_quietly(rec.id + ".out", self.state.out_fd)
            return totals
        meta = json.dumps({"id": rec.id, "final": final, "stdout_bytes": totals[0], "stderr_bytes": totals[1],
                           "stdout_len": len(out), "stderr_len": len(err)}).encode("ascii")
        crc = zlib.crc32(err, zlib.crc32(out, zlib.crc32(meta)))
        head = b"%s %d %d %08x\n" % (_OUT_MAGIC, JOURNAL_VERSION, len(meta), crc)
        self.state.write_atomic(self.state.out_fd, rec.id + ".out", [head, meta, out, err], sync=final)
        return totals

    def _checkpoint(self, rec_id: str, entry: Tuple[Any, int, int]) -> None:
        rec, out_total, err_total = entry
        with rec.cond:
            if rec.finished or (rec.stdout.total, rec.stderr.total) == (out_total, err_total):
                return
        try:
            totals = self._write_output(rec, final=False, limit=CHECKPOINT_TAIL_BYTES)
        except OSError as exc:
            self._failed("write a checkpoint", exc)
            return
        with self._cond:
            if rec_id in self._live:       # it may have ended meanwhile: its final write comes next
                self._live[rec_id] = (rec, totals[0], totals[1])

    def _sync(self) -> None:
        """The log's new lines and the out files' renames reach the disk."""
        with self._lock:
            fd, unsynced, self._unsynced = self._fd, self._unsynced, False
        if fd < 0:
            return
        try:
            if unsynced:
                os.fdatasync(fd)
            os.fsync(self.state.out_fd)
        except OSError as exc:
            self._failed("sync", exc)

    def flush(self, timeout: float) -> bool:
        """Wait until the writer has done every queued task (True) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._tasks or self._busy) and self._thread is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop the writer (its queue done, bounded) and release the state directory."""
        self.stop(timeout)
        self.state.close()

    def pending(self) -> List[str]:
        """Ids whose task the writer has not done or not finished (an upgrade
        hands them on: the exec may cut a write in its middle, which leaves
        only a temp file, and the successor does it again)."""
        with self._cond:
            return list(self._doing) + list(self._tasks)

    def stop(self, timeout: float) -> None:
        """Finish the queued work (bounded), sync, end the thread, close the log."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        if thread is None or not thread.is_alive():
            self._sync()
            with self._lock:
                _close_quietly(self._fd)
                self._fd = -1

    # -- compaction --------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        with self._cond:
            records = self._records
        with self._lock:
            lines = self._lines
        if lines > 3 * records + COMPACT_SLACK_LINES:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the log as one line per record it holds. The slow part
        (reading, merging, writing, fsync) runs without the lock; under it
        only the lines appended meanwhile are copied and the files swapped."""
        try:
            size = os.fstat(self._fd).st_size
            states, _ = _JournalReader(self.state).read_log(limit=size, report=False)
            parts = [_crc_line(self._header())] + [_crc_line(dict(s, e="rec")) for s in states]
            tmp = os.open("journal.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW,
                          0o600, dir_fd=self.state.fd)
        except OSError as exc:
            self._failed("compact", exc)
            return
        try:
            _writev_all(tmp, parts)
            os.fdatasync(tmp)
            with self._lock:
                tail = self._read_from(size)
                _writev_all(tmp, [tail])
                os.rename("journal.tmp", "journal", src_dir_fd=self.state.fd, dst_dir_fd=self.state.fd)
                old, self._fd = self._fd, tmp
                self._lines = len(parts) + tail.count(b"\n")
            os.close(old)
            os.fsync(self.state.fd)
            with self._cond:
                self._records = len(states)
        except OSError as exc:
            _close_quietly(tmp)
            self._failed("compact", exc)

    def _read_from(self, offset: int) -> bytes:
        fd = os.open("journal", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.fd)
        try:
            chunks = []
            while True:
                chunk = os.pread(fd, 1 << 20, offset)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)

    # -- loading -----------------------------------------------------------------------

    def load(self) -> List[Dict[str, Any]]:
        """The records of the journal, checked, in creation order (see _JournalReader.load)."""
        return _JournalReader(self.state).load()

    def rewrite(self, states: List[Dict[str, Any]]) -> None:
        """Start a fresh log holding exactly ``states`` (after a load and its
        recovery), then keep it open for appends."""
        parts = [_crc_line(self._header())]
        parts += [_crc_line(dict({k: v for k, v in s.items() if not k.startswith("_")}, e="rec"))
                  for s in states]
        self.state.write_atomic(self.state.fd, "journal", parts, sync=True)
        os.fsync(self.state.fd)
        self._open_log()
        with self._lock:
            self._lines = len(parts)
        with self._cond:
            self._records = len(states)

    def reopen(self, records: int) -> None:
        """An upgraded agent goes on with its predecessor's log (the handover,
        not the log, tells it the records)."""
        self._open_log()
        lines = 0
        fd = os.open("journal", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.fd)
        with os.fdopen(fd, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                lines += chunk.count(b"\n")
        with self._lock:
            self._lines = lines
        with self._cond:
            self._records = records

    def adopted(self, recs: List[_ProcessRecord], pending: List[str]) -> None:
        """After an upgrade: checkpoint the running records again, and do the
        output writes the predecessor had queued but not done."""
        by_id = {rec.id: rec for rec in recs}
        for rec in recs:
            with rec.cond:
                running = not rec.finished and rec.status == "running"
            if running:
                with self._cond:
                    self._watch_locked(rec)
        for rec_id in pending:
            rec = by_id.get(rec_id)
            self._queue(rec_id, "final" if rec is not None and rec.finished else "unlink", rec)

    def write_final_output(self, state: Dict[str, Any], out: bytes, err: bytes) -> None:
        """At start: a record made final by recovery keeps its checkpointed output as final."""
        if not out and not err:
            _unlink_quietly(state["id"] + ".out", self.state.out_fd)
            return
        rec = _restore_record(state, max(len(out), len(err), 1), out, err)
        self._write_output(rec, final=True)


def _output_matches(state: Dict[str, Any], meta: Optional[Dict[str, Any]]) -> bool:
    """Output belongs to a state when it ends where the state's counts end
    (a final record), or when it is the checkpoint of one still running
    (whose counts then become the checkpoint's: all that is known)."""
    if meta is None:
        return False
    if state["status"] in _FINAL_STATUSES:
        return meta["final"] and (meta["stdout_bytes"], meta["stderr_bytes"]) == \
            (state["stdout_bytes"], state["stderr_bytes"])
    if meta["final"]:
        return False
    state["stdout_bytes"], state["stderr_bytes"] = meta["stdout_bytes"], meta["stderr_bytes"]
    return True


class _ForeignJournal(Exception):
    """The journal was written by another format or for another directory."""


def _merge_line(merged: Dict[str, Dict[str, Any]], obj: Optional[Dict[str, Any]]) -> bool:
    """Apply one journal line to the states; False when it is not a valid event."""
    if obj is None:
        return False
    event, rec_id = obj.pop("e", None), obj.get("id")
    if event == "gone":
        ids = obj.get("ids")
        if not isinstance(ids, list):
            return False
        for gone in ids:
            if isinstance(gone, str):
                merged.pop(gone, None)
        return True
    if not isinstance(rec_id, str):
        return False
    if event in ("new", "rec"):
        merged[rec_id] = obj
    elif event in ("run", "set") and rec_id in merged:
        state = merged[rec_id]
        if event == "set":
            state["extra"] = obj.get("extra", {})
            state["idempotency"] = obj.get("idempotency")
        elif state.get("status") not in _FINAL_STATUSES:   # an outcome already read stands
            state.update(obj)
    elif event not in ("run", "set"):
        return False
    return True


class _JournalReader:
    """Reads a state directory's journal and output files, checking each:
    what a cold start loads (and what compaction merges)."""

    def __init__(self, state: _StateDir) -> None:
        self.state = state

    def load(self) -> List[Dict[str, Any]]:
        """The records of the journal, merged and checked, in creation order,
        each with ``_out``/``_err``: the retained output bytes found for it.
        A foreign, damaged or truncated file is reported and set aside; the
        start goes on with what could be read. Leaves the log rewritten and open."""
        try:
            states, damaged = self.read_log(limit=None, report=True)
        except _ForeignJournal as exc:
            self.state.set_aside(self.state.fd, "journal", str(exc))
            states, damaged = [], False
        if damaged:     # keep a copy for a post-mortem; the rewrite below drops what was unreadable
            self._copy_aside("journal", "lines with a wrong checksum or length were skipped")
        outputs = self._load_outputs({s["id"] for s in states})
        for state in states:
            out, err, meta = outputs.get(state["id"], (b"", b"", None))
            state["_out"], state["_err"] = (out, err) if _output_matches(state, meta) else (b"", b"")
        return states

    def read_log(self, *, limit: Optional[int], report: bool) -> Tuple[List[Dict[str, Any]], bool]:
        """Merge the log's lines into states (creation order). Returns (states, damaged)."""
        try:
            fd = os.open("journal", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.fd)
        except FileNotFoundError:
            return [], False
        with os.fdopen(fd, "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit)
        lines = data.split(b"\n")
        truncated = lines.pop() != b""           # no newline at the end: a write cut short
        if not lines:
            if truncated and report:
                raise _ForeignJournal("no complete header line")
            return [], False
        header = _parse_line(lines[0])
        if header is None or header.get("format") != _JOURNAL_FORMAT:
            raise _ForeignJournal("not a hopx-agent journal")
        if header.get("version") != JOURNAL_VERSION or header.get("dir") != self.state.dir_id:
            raise _ForeignJournal("a journal of format %r for directory %r (this agent writes %d for %s)"
                                  % (header.get("version"), header.get("dir"), JOURNAL_VERSION, self.state.dir_id))
        merged: "collections.OrderedDict[str, Dict[str, Any]]" = collections.OrderedDict()
        bad = sum(1 for line in lines[1:] if not _merge_line(merged, _parse_line(line)))
        if report and truncated:
            log.warning("journal %s: the last line was cut short (a crash mid-write); it is ignored",
                        self.state.path)
        if report and bad:
            log.warning("journal %s: %d damaged lines skipped", self.state.path, bad)
        states = []
        for state in merged.values():
            try:
                states.append(_check_state(state))
            except ValueError as exc:
                bad += 1
                if report:
                    log.warning("journal %s: record %s skipped: %s", self.state.path, state.get("id"), exc)
        states.sort(key=lambda s: s["seq"])
        return states, bad > 0

    def _copy_aside(self, name: str, why: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.fd)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        self.state.write_atomic(self.state.fd, name + ".damaged", [data], sync=False)
        self.state.set_aside(self.state.fd, name + ".damaged", why)

    def _load_outputs(self, wanted: set) -> Dict[str, Tuple[bytes, bytes, Dict[str, Any]]]:
        """Every out file, checked; a damaged or foreign one is set aside, one of no record removed."""
        found = {}
        for name in os.listdir(self.state.out_fd):
            rec_id, _, suffix = name.partition(".")
            if suffix != "out" or rec_id not in wanted:
                _unlink_quietly(name, self.state.out_fd)      # a temp file, or output of an evicted record
                continue
            try:
                found[rec_id] = self._read_output(name, rec_id)
            except (OSError, ValueError) as exc:
                self.state.set_aside(self.state.out_fd, name, str(exc))
        return found

    def _read_output(self, name: str, rec_id: str) -> Tuple[bytes, bytes, Dict[str, Any]]:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.out_fd)
        with os.fdopen(fd, "rb") as fh:
            head = fh.readline(128).split()
            if len(head) != 4 or head[0] != _OUT_MAGIC or head[1] != b"%d" % JOURNAL_VERSION:
                raise ValueError("not an output file of this version")
            meta_len, crc = int(head[2]), int(head[3], 16)
            meta_raw = fh.read(meta_len)
            meta = json.loads(meta_raw)
            if not isinstance(meta, dict) or meta.get("id") != rec_id:
                raise ValueError("the output of another record")
            lengths = meta["stdout_len"], meta["stderr_len"]
            out, err = fh.read(lengths[0]), fh.read(lengths[1])
            if (len(out), len(err)) != lengths or fh.read(1):
                raise ValueError("length does not match (cut short?)")
        if zlib.crc32(err, zlib.crc32(out, zlib.crc32(meta_raw))) != crc:
            raise ValueError("checksum does not match")
        for key in ("stdout_bytes", "stderr_bytes"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
                raise ValueError("bad %s" % key)
        meta["final"] = bool(meta.get("final"))
        return out, err, meta


# ============================================================================
# Durability: orphans of a previous agent
# ============================================================================
#
# After a crash (kill -9, the OOM killer) the dead agent's children live on,
# re-parented to init, with no timeout anyone enforces. A restarted agent on
# the same state directory ends them before it serves (TERM, grace, KILL)
# and makes each of their records final: failed, reason "agent_restart", so
# a client polling one sees it end. A process is proven an orphan, never
# guessed; each proof is made through a pidfd opened before the check and
# found alive after it, so the pid cannot have been reused in between:
#   - it carries HOPX_AGENT_STATE=<this directory's id> in its environment;
#   - or it is a leader the journal names: same pid and same start time
#     (clock ticks since boot, /proc/<pid>/stat) in the same boot;
#   - or it is in the session of such a journaled leader, proven as above
#     and still alive and leading it after the check (every child of the
#     agent leads its own session; a marker alone never extends to a session:
#     anyone who saw it could put it on a process of a session not ours);
#   - or it is in a cgroup the journal names for one of those records, in a
#     runs directory of the agent (issue 15): only the cgroup's owner can move
#     a process in, so whatever is there is the dead agent's.
# Signals go through the pidfds: they reach the proven process or nobody.

AGENT_RESTART_REASON = "agent_restart"   # api.md §5 reason of a record whose agent died under it
ORPHAN_EXIT_WAIT_S = 1.0                 # after the SIGKILLs, wait this long for the orphans to be gone


class _Orphan:
    """A process proven to be left by a previous agent of this state directory."""

    __slots__ = ("pid", "pidfd", "record_id", "sid")

    def __init__(self, pid: int, pidfd: int, record_id: Optional[str], sid: int) -> None:
        self.pid, self.pidfd, self.record_id, self.sid = pid, pidfd, record_id, sid


def _env_item(environ: bytes, name: str) -> Optional[str]:
    """The value of ``name`` in a /proc/<pid>/environ blob, or None."""
    prefix = name.encode("ascii") + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("ascii", "replace")
    return None


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except OSError:
        return False


def _prove_orphan(pid: int, dir_id: str, leaders: Dict[int, Tuple[int, str]]) -> Optional[_Orphan]:
    """The process as an _Orphan when it carries the marker or is a journaled
    leader (same start time); None otherwise or when it went away meanwhile."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    environ = _read_environ(pid)
    stat = _proc_identity(pid)
    record_id = None
    if _env_item(environ, STATE_DIR_ENV) == dir_id:
        record_id = _env_item(environ, PROCESS_ID_ENV)
    elif stat is not None and pid in leaders and leaders[pid][0] == stat[0]:
        record_id = leaders[pid][1]
    else:
        os.close(pidfd)
        return None
    if stat is None or not _pidfd_alive(pidfd):
        os.close(pidfd)
        return None
    return _Orphan(pid, pidfd, record_id, stat[1])


def _prove_session_member(pid: int, anchors: Dict[int, _Orphan]) -> Optional[_Orphan]:
    """A process in the session of a proven leader (which must still lead it
    and be alive afterwards): it inherits that leader's record."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    stat = _proc_identity(pid)
    anchor = anchors.get(stat[1]) if stat else None
    if anchor is not None and _pidfd_alive(pidfd):
        again = _proc_identity(anchor.pid)
        if again is not None and again[1] == anchor.sid and _pidfd_alive(anchor.pidfd):
            return _Orphan(pid, pidfd, anchor.record_id, anchor.sid)
    os.close(pidfd)
    return None


def _find_orphans(dir_id: str, leaders: Dict[int, Tuple[int, str]]) -> List[_Orphan]:
    """Every process proven to be left by a previous agent of ``dir_id``.
    ``leaders``: pid -> (start time, record id) of the journal's running records."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        log.warning("no pidfds (Linux 5.3+, Python 3.9+): orphans of a previous agent cannot be proven "
                    "and are left alone")
        return []
    me = os.getpid()
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
    except OSError:
        return []
    found: Dict[int, _Orphan] = {}
    for pid in pids:
        orphan = _prove_orphan(pid, dir_id, leaders)
        if orphan is not None:
            found[pid] = orphan
    anchors = {o.pid: o for o in found.values() if o.sid == o.pid and o.pid in leaders}
    for pid in pids:
        if pid not in found:
            member = _prove_session_member(pid, anchors)
            if member is not None:
                found[pid] = member
    return list(found.values())


def _in_cgroup(pid: int, directory: str) -> bool:
    """``pid`` is in the cgroup at ``directory`` (as /proc/<pid>/cgroup names it)."""
    try:
        with open("/proc/%d/cgroup" % pid) as fh:
            paths = _parse_proc_cgroup(fh.read()).values()
    except OSError:
        return False
    return any(len(path) > 1 and directory.endswith(path) for path in paths)


def _cgroup_orphans(states: List[Dict[str, Any]], known: set) -> List[_Orphan]:
    """The processes in the cgroups of records a crash left running (issue 15):
    a cgroup the journal names, in a runs directory of the agent, holds only
    the dead agent's children (moving a process into it needs the cgroup's
    owner), whatever their environment. Frozen ones (a v1 kill cut by the
    crash) are thawed first: a frozen process never dies of a signal."""
    found = []
    for state in states:
        for directory in state["cgroups"]:
            if CGROUP_RUNS_PREFIX not in directory or not os.path.isdir(directory):
                continue
            for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                try:
                    with open(os.path.join(directory, name), "w") as fh:
                        fh.write(value)
                except OSError:
                    pass
            for pid in _pids_in(directory):
                if pid in known:
                    continue
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    continue
                stat = _proc_identity(pid)
                if stat is not None and _in_cgroup(pid, directory) and _pidfd_alive(pidfd):
                    found.append(_Orphan(pid, pidfd, state["id"], stat[1]))
                    known.add(pid)
                else:
                    os.close(pidfd)
    return found


def _end_orphans(orphans: List[_Orphan], grace: float) -> Dict[Optional[str], str]:
    """TERM every orphan, KILL those left after ``grace``, wait (bounded) for
    them to be gone; closes their pidfds. Returns, per record id, the last
    signal its processes needed."""
    endings: Dict[Optional[str], str] = {}
    pending = {o.pidfd: o for o in orphans}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, ORPHAN_EXIT_WAIT_S)):
        for orphan in pending.values():
            try:
                signal.pidfd_send_signal(orphan.pidfd, sig)
                endings[orphan.record_id] = signal.Signals(sig).name
            except OSError:
                pass
        _wait_orphans_gone(pending, time.monotonic() + wait)
        if not pending:
            break
    for orphan in orphans:
        _close_quietly(orphan.pidfd)
    if pending:
        log.warning("%d orphans of a previous agent survived SIGKILL (uninterruptible sleep?)", len(pending))
    return endings


def _wait_orphans_gone(pending: Dict[int, Any], deadline: float) -> None:
    """Remove from ``pending`` each pidfd whose process exits before ``deadline``."""
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            pending.pop(fd, None)


def _code_file_prefix(dir_id: str) -> str:
    """Temp code files of an agent with a state directory are named after it,
    so a restarted agent can find the ones its predecessor left."""
    return "hopx-%s-" % dir_id[:12]


def _sweep_code_files(dir_id: str, tempdir: str, journaled: Iterable[Optional[str]]) -> int:
    """Remove the temp code files a dead agent left (named with ``dir_id``,
    regular, our own): those of the temp dir and those the journal names."""
    prefix = _code_file_prefix(dir_id)
    try:
        paths = {os.path.join(tempdir, n) for n in os.listdir(tempdir) if n.startswith(prefix)}
    except OSError:
        paths = set()
    paths.update(p for p in journaled if p and os.path.basename(p).startswith(prefix))
    removed = 0
    for path in paths:
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def _recover(states: List[Dict[str, Any]], dir_id: str, boot_id: Optional[str], grace: float,
             tempdir: str) -> Dict[str, int]:
    """At a start after a crash: end the orphans, remove the temp files, and
    make every record that was queued or running final (agent_restart).
    Changes ``states`` in place; returns counts for the log line."""
    unfinished = [s for s in states if s["status"] not in _FINAL_STATUSES]
    leaders = {s["pid"]: (s["starttime"], s["id"]) for s in unfinished
               if s["pid"] and s["starttime"] is not None and s["boot_id"] == boot_id}
    orphans = _find_orphans(dir_id, leaders)
    orphans += _cgroup_orphans(unfinished, {o.pid for o in orphans})
    endings = _end_orphans(orphans, grace) if orphans else {}
    now = time.time()
    for state in unfinished:
        _finish_after_restart(state, endings.get(state["id"]), state["boot_id"] not in (None, boot_id), now)
    removed = _sweep_code_files(dir_id, tempdir, [s["tempfile"] for s in states])
    return {"orphans": len(orphans), "records": len(unfinished), "files": removed,
            "unknown": sum(1 for o in orphans if o.record_id not in {s["id"] for s in states})}


def _finish_after_restart(state: Dict[str, Any], ending: Optional[str], rebooted: bool, now: float) -> None:
    """A record whose agent died under it: failed, agent_restart, and what became of its process."""
    if state["status"] == "queued":
        why = "it was still queued and never ran"
    elif rebooted:
        why = "the machine restarted, and the process with it"
    elif ending is not None:
        why = "its process was still running and was ended with %s" % ending
    else:
        why = "its process had exited meanwhile; its exit status is lost"
    state.update(status="failed", reason=AGENT_RESTART_REASON, exit_code=None, signal=None,
                 ended=now, error="the agent restarted after it stopped unexpectedly; " + why,
                 kill_reason=AGENT_RESTART_REASON,
                 duration=round(max(0.0, now - state["started"]), 6) if state["started"] else 0.0)
    state["tempfile"] = None
    state["_recovered"] = True




def _attach_journal(manager: Any, journal: _Journal) -> None:
    """Wire a journal into a process manager: the registry tells it each
    step, the spawner marks every child with the state dir's id, code files
    are named after it."""
    manager.registry.journal = journal
    manager.spawner.markers[STATE_DIR_ENV] = journal.state.dir_id
    manager.launcher.code_prefix = _code_file_prefix(journal.state.dir_id)


def _restore_records(manager: Any, states: List[Dict[str, Any]]) -> None:
    """The records a restart loaded, into the manager (in their order; retention applies)."""
    cap = manager.config.max_output_bytes
    recs = [_restore_record(state, cap, state["_out"], state["_err"]) for state in states]
    for rec in recs:
        manager.prepare(rec)
    manager.registry.adopt(recs, [], {})


def _open_journal(config: AgentConfig, *, lock_fd: Optional[int] = None) -> _Journal:
    """The journal of ``config.state_dir`` (opened and locked), not loaded yet."""
    assert config.state_dir is not None
    try:
        return _Journal(_StateDir.open(config.state_dir, lock_fd=lock_fd))
    except OSError as exc:
        raise _StateDirError(str(exc)) from None


def _load_journal(journal: _Journal, grace: float) -> List[Dict[str, Any]]:
    """A cold start with a state directory: the previous agent's records,
    its orphans ended and its records made final, the log rewritten. Returns
    the records' states (with their output) for ProcessManager.restore()."""
    import tempfile
    started = time.monotonic()
    states = journal.load()
    counts = _recover(states, journal.state.dir_id, journal.boot_id, grace, tempfile.gettempdir())
    for state in states:
        if state.get("_recovered"):
            journal.write_final_output(state, state["_out"], state["_err"])
    journal.rewrite(states)
    if states or counts["orphans"] or counts["files"]:
        log.info("journal %s: %d records loaded; %d left running or queued by a crash made final, "
                 "%d orphans ended (%d of no record), %d temp files removed, in %.0f ms",
                 journal.state.path, len(states), counts["records"], counts["orphans"], counts["unknown"],
                 counts["files"], (time.monotonic() - started) * 1000)
    return states


# ============================================================================
# Durability: upgrade in place
# ============================================================================
#
# SIGHUP (or POST /admin/restart) replaces the running agent by the file on
# disk, and nothing is lost. The same process execs the new version, so each
# child stays its child (waited for, reaped, signalled as before); what must
# outlive the exec is handed over in an anonymous memory file (memfd): the
# records with their output, and the descriptors kept open across exec (the
# listening socket, each running child's pipes, the state lock).
#
#  1. Pre-check: a child imports the new file and runs its _handover_check on
#     a preview of the handover. Any failure there (syntax error, exception,
#     a file too old to adopt) ends the upgrade: the agent serves on untouched.
#  2. Quiesce: the transport stops accepting (the listening socket stays
#     open: the kernel queues new connections), lets requests in flight
#     finish (bounded) and closes idle connections; the pipe readers park,
#     each between two reads, so what a child wrote since waits in its pipe;
#     the callbacks of the exit watcher and the watchdog wait at a gate.
#  3. Hand over: every record (its fields, its output, the offset where
#     reading stopped, its deadlines on the monotonic clock, which exec keeps)
#     into the memfd; then execve(python, the file, the same arguments).
#  4. The new version checks the whole handover and rebuilds its state
#     before it starts a thread or reads a byte; a failure up to there
#     re-execs the previous version (whose source the handover carries) on
#     the same handover. Once ready it resumes each reader at its offset (no
#     gap, no duplicate), watches each leader through a new pidfd (an exit
#     during the exec left a zombie: its status is not lost), re-arms the
#     deadlines, and serves on the inherited socket.

HANDOVER_ENV = "HOPX_AGENT_HANDOVER"     # the memfd's number, for the exec'd successor only
FALLBACK_ENV = "HOPX_AGENT_FALLBACK"     # set when the previous version is re-exec'd after a failed adoption
SOURCE_ENV = "HOPX_AGENT_SOURCE"         # the file on disk, when the running code came from elsewhere
HANDOVER_VERSION = 1                     # the handover document's format; a successor refuses another
UPGRADE_CHECK_TIMEOUT_S = 30.0           # the pre-check child may take this long (import and check)
UPGRADE_PARK_S = 2.0                     # readers and callbacks must reach their gate within this
_HANDOVER_FORMAT = "hopx-agent-handover"
_HANDOVER_MAGIC = b"HOPXHANDOVER"


class _UpgradeRefused(Exception):
    """The upgrade did not happen; the running agent serves on."""


class _HandoverWriter:
    """Builds the handover in a memfd: byte blobs written as they come (so
    the output is held twice at most, in the buffers and here, never thrice),
    referred to by [offset, length] from a JSON document written last, and
    the descriptors it names (made inheritable). A ``dry`` one writes and
    changes nothing: its document is the preview the pre-check child gets."""

    def __init__(self, *, dry: bool = False) -> None:
        self.dry = dry
        self.doc: Dict[str, Any] = {"format": _HANDOVER_FORMAT, "version": HANDOVER_VERSION,
                                    "from_version": __version__, "written": time.time(),
                                    "monotonic": time.monotonic()}
        self._size = 0
        self.fds: List[int] = []          # every descriptor handed over: the successor closes them once ready
        self.doc["fds"] = self.fds
        self._fd = -1 if dry else os.memfd_create("hopx-handover", 0)   # no MFD_CLOEXEC: the successor's

    def blob(self, data: Any) -> List[int]:
        ref = [self._size, len(data)]
        if len(data) and not self.dry:
            _writev_all(self._fd, [data])
        self._size += len(data)
        return ref

    def fd(self, fd: int) -> int:
        if not self.dry:
            os.set_inheritable(fd, True)
        self.fds.append(fd)
        return fd

    def seal(self) -> int:
        """The document and a trailer after the blobs; the memfd (inheritable) positioned at 0."""
        doc = json.dumps(self.doc, separators=(",", ":")).encode("ascii")
        trailer = (b"%s %d %d %d" % (_HANDOVER_MAGIC, HANDOVER_VERSION, self._size, len(doc))).ljust(63) + b"\n"
        _writev_all(self._fd, [doc, trailer])
        os.lseek(self._fd, 0, os.SEEK_SET)
        return self._fd

    def release(self) -> None:
        """The upgrade failed: descriptors back to close-on-exec, the memfd closed."""
        for fd in self.fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        if self._fd >= 0:
            _close_quietly(self._fd)
            self._fd = -1


class _HandoverReader:
    """Reads a handover memfd: [blobs][document][64-byte trailer]."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        if size < 64:
            raise ValueError("not a handover (too short)")
        parts = os.pread(fd, 64, size - 64).split()
        if len(parts) != 4 or parts[0] != _HANDOVER_MAGIC:
            raise ValueError("not a handover")
        if parts[1] != b"%d" % HANDOVER_VERSION:
            raise ValueError("a handover of format %s (this agent reads %d)"
                             % (parts[1].decode("ascii", "replace"), HANDOVER_VERSION))
        self._blob_size, doc_len = int(parts[2]), int(parts[3])
        if self._blob_size + doc_len + 64 != size:
            raise ValueError("the handover's size does not match")
        self.doc = json.loads(os.pread(fd, doc_len, self._blob_size))

    def take(self, ref: Any) -> bytes:
        """A blob's bytes (never consumed: a fallback reads the same handover again)."""
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, int) for x in ref)):
            raise ValueError("a bad blob reference")
        offset, length = ref
        if offset < 0 or length < 0 or offset + length > self._blob_size:
            raise ValueError("a blob outside the handover")
        data = os.pread(self.fd, length, offset) if length else b""
        if len(data) != length:
            raise ValueError("a blob cut short")
        return data

    def close(self) -> None:
        _close_quietly(self.fd)


def _claim_fd(fd: Any) -> int:
    """A duplicate of a descriptor the handover names. The successor works
    on duplicates and leaves the inherited ones as they are until it is ready
    (_seal_fds), so that a fallback to the previous version still finds them
    all, whatever the successor's objects did (a socket object collected
    closes its descriptor)."""
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3:
        raise ValueError("bad descriptor %r" % (fd,))
    return os.dup(fd)                  # EBADF if the predecessor did not really hand it over


def _seal_fds(doc: Dict[str, Any]) -> None:
    """The successor is ready: the inherited descriptors are closed (it has its duplicates)."""
    for fd in doc.get("fds") or []:
        if isinstance(fd, int) and not isinstance(fd, bool) and fd >= 3:
            _close_quietly(fd)


_UPGRADE_CHECK_PROGRAM = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("hopx_agent_successor", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module          # dataclasses look their module up while it executes
spec.loader.exec_module(module)
check = getattr(module, "_handover_check", None)
if check is None:
    raise SystemExit("this file cannot take over a running agent (no _handover_check)")
answer = check(json.load(sys.stdin), sys.argv[2:])
sys.stdout.write("\nHOPX-UPGRADE-CHECK " + json.dumps(answer) + "\n")
"""


def _check_successor(path: str, preview: Dict[str, Any], argv: List[str],
                     spawn: Callable[..., subprocess.Popen], timeout: float = UPGRADE_CHECK_TIMEOUT_S) -> Dict[str, Any]:
    """Run the new file's _handover_check on ``preview`` in a child; its answer,
    or _UpgradeRefused with the reason (the child's last words). ``spawn`` is
    Popen-like: the agent's spawner, so its subreaper never takes this child."""
    if not os.path.isfile(path):
        raise _UpgradeRefused("%s is not a file" % path)
    proc = spawn([sys.executable, "-c", _UPGRADE_CHECK_PROGRAM, path] + list(argv),
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(json.dumps(preview).encode("ascii"), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise _UpgradeRefused("the new file's check took longer than %gs" % timeout) from None
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        if line.startswith("HOPX-UPGRADE-CHECK "):
            answer = json.loads(line[len("HOPX-UPGRADE-CHECK "):])
            if proc.returncode == 0 and isinstance(answer, dict) and answer.get("ok") is True:
                return answer
            break
    words = err.decode("utf-8", "replace").strip().splitlines()
    raise _UpgradeRefused("the new file failed its check: %s" % (words[-1] if words else "exit %s" % proc.returncode))


def _successor_argv(path: str, argv: List[str]) -> List[str]:
    """The command line of the new version: the same interpreter and flags,
    the file on disk, the same arguments. An agent started as ``-m hopx_agent``
    stays one when the new file is where that found this one: it keeps
    starting from cached bytecode, without the script form's parse tree."""
    flags = list(getattr(sys, "orig_argv", [])[1:])
    module = getattr(globals().get("__spec__"), "name", None)      # "hopx_agent" under -m, else None
    same_file = os.path.abspath(path) == os.path.abspath(globals().get("__file__") or "")
    for i in range(len(flags) - 1):
        if module and same_file and flags[i:i + 2] == ["-m", module]:
            return [sys.executable] + flags[:i + 2] + list(argv)
    if module and same_file and not hasattr(sys, "orig_argv"):   # Python 3.9: the flags are not known
        return [sys.executable, "-m", module] + list(argv)
    script = flags.index(sys.argv[0]) if sys.argv[0] in flags else None
    flags = flags[:script] if script is not None else []
    return [sys.executable] + flags + [path] + list(argv)


def _exec_successor(path: str, argv: List[str], handover_fd: int, extra: Optional[Dict[str, str]] = None) -> None:
    """execve the new version with the handover; returns only if exec failed (OSError raised)."""
    env = dict(os.environ)
    env.pop(FALLBACK_ENV, None)
    env[HANDOVER_ENV] = str(handover_fd)
    env.update(extra or {})
    os.execve(sys.executable, _successor_argv(path, argv), env)


def _exec_previous(source: bytes, path: str, argv: List[str], handover_fd: int) -> None:
    """The new version could not adopt: run the previous one (its source came
    with the handover) on the same handover. Returns only if exec failed."""
    fd = os.memfd_create("hopx-agent-previous", 0)
    _writev_all(fd, [source])
    os.lseek(handover_fd, 0, os.SEEK_SET)
    env = dict(os.environ)
    env.update({HANDOVER_ENV: str(handover_fd), FALLBACK_ENV: "1", SOURCE_ENV: path})
    os.execve(sys.executable, [sys.executable, "/proc/self/fd/%d" % fd] + list(argv), env)


def _take_handover_env(environ: Dict[str, str]) -> Optional[int]:
    """The handover memfd's number, removed from the environment (no child may inherit it)."""
    value = environ.pop(HANDOVER_ENV, None)
    os.environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError("%s=%r is not a descriptor" % (HANDOVER_ENV, value))
    return int(value)


def _check_handover_doc(doc: Any) -> Dict[str, Any]:
    """The handover document, checked for format and version (ValueError otherwise)."""
    if not isinstance(doc, dict) or doc.get("format") != _HANDOVER_FORMAT:
        raise ValueError("not a hopx-agent handover")
    if doc.get("version") != HANDOVER_VERSION:
        raise ValueError("a handover of format %r; this version reads %d" % (doc.get("version"), HANDOVER_VERSION))
    return doc


UPGRADE_DRAIN_S = 0.5                    # requests in flight may finish this long before the exec


def _own_source(path: str) -> Optional[bytes]:
    """The running version's source, read at start: the file on disk may be
    replaced later, and a successor that cannot adopt re-execs this."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _usage_list(usage: Any) -> Optional[List[float]]:
    return None if usage is None else [usage.ru_utime, usage.ru_stime, usage.ru_maxrss]


def _confinement_state(conf: Any) -> Optional[Dict[str, Any]]:
    """What an upgrade's successor needs of a running child's confinement
    (issue 15) to end it and read its usage: its cgroup's directories."""
    if conf is None or conf.cgroup is None or conf.cgroup.removed:
        return None
    cgroup = conf.cgroup
    return {"version": cgroup.version, "dirs": dict(cgroup.dirs), "proc_path": list(cgroup.proc_path),
            "swap": cgroup.swap, "name": conf.name, "usage": dict(conf.usage)}


def _adopted_confinement(state: Optional[Dict[str, Any]], limits: Any, user: Any) -> Any:
    """The successor's side: a confinement on the same cgroup (the runs
    directory it is in stays until a cold start sweeps it, empty)."""
    if not state:
        return None
    cls = _ExecCgroupV2 if state["version"] == "cgroup_v2" else _ExecCgroupV1
    cgroup = cls({str(k): str(v) for k, v in state["dirs"].items()}, tuple(state["proc_path"]))
    cgroup.swap = bool(state.get("swap", True))
    conf = _Confinement(limits or _LimitValues(), user, oom=(None, False), cgroup=cgroup, tree=None,
                        name=str(state["name"]), setpriv=lambda: None)
    conf.usage = dict(state.get("usage") or {})
    return conf


def _hand_over_record(rec: _ProcessRecord, writer: _HandoverWriter, watchdog: _Watchdog) -> Dict[str, Any]:
    """A record as its successor takes it over (call with ``rec.cond`` held):
    its state and output, and for one not final its descriptors (the readers
    are parked: each stream's offset is its total), its exit if the leader
    was reaped already, and its deadlines on the monotonic clock."""
    if rec.status == "queued" and not writer.dry:
        rec.launch.prepare()        # its code file, now: the successor gets a complete argv
    state = _record_state(rec)
    state["_out"] = writer.blob(_tail_bytes(rec.stdout))
    state["_err"] = writer.blob(_tail_bytes(rec.stderr))
    for hook in rec.on_finish:
        if hasattr(hook, "hand_over"):
            state["_webhook"] = hook.hand_over()
    if rec.status == "queued":      # it has yet to run: what to run (never journaled: env may hold secrets)
        state["_launch"] = {"argv": rec.launch.argv, "env": rec.launch.env}
    if rec.finished or rec.status == "queued":
        return state
    stdin = rec.popen.stdin if rec.popen is not None and not rec.stdin_closed else None
    exit_info = rec.exit_info
    state["_run"] = {
        "fds": {name: writer.fd(fd) for name, fd in rec.fds.items()},
        "stdin": writer.fd(stdin.fileno()) if stdin is not None else None,
        "reaped": rec.reaped, "open_streams": rec.open_streams,
        "exit_info": None if exit_info is None else [exit_info[0], _usage_list(exit_info[1])],
        "started_mono": rec.started_mono, "last_output": rec.last_output,
        "pty_eof": list(rec.pty_eof) if rec.pty_eof is not None else None,
        "confinement": _confinement_state(rec.confinement),
        "deadlines": {"timeout": watchdog.pending(rec.timer), "idle": watchdog.pending(rec.idle_timer),
                      "escalate": watchdog.pending(rec.timers.get("escalate")),
                      "drain": watchdog.pending(rec.timers.get("drain"))},
    }
    return state


_RUN_FIELDS: Dict[str, Tuple[type, ...]] = {
    "fds": (dict,), "stdin": (int, type(None)), "reaped": (bool,), "open_streams": (int,),
    "exit_info": (list, type(None)), "started_mono": (int, float, type(None)),
    "last_output": (int, float, type(None)), "deadlines": (dict,),
}


def _check_handed_record(state: Any) -> Dict[str, Any]:
    """One record of a handover, checked like a journal state plus its run-time part."""
    if not isinstance(state, dict):
        raise ValueError("a record that is not an object")
    full = _check_state(state)
    for key in ("_out", "_err"):
        ref = state.get(key)
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, int) for x in ref)):
            raise ValueError("bad %s of %s" % (key, full["id"]))
        full[key] = ref
    run = state.get("_run")
    if full["status"] == "running" and not isinstance(run, dict):
        raise ValueError("running record %s without its run-time state" % full["id"])
    if run is not None:
        for key, kinds in _RUN_FIELDS.items():
            if not isinstance(run.get(key), kinds):
                raise ValueError("bad %s of %s" % (key, full["id"]))
        full["_run"] = run
    if isinstance(state.get("_webhook"), dict):
        full["_webhook"] = state["_webhook"]
    if full["status"] == "queued":
        launch = state.get("_launch")
        if not (isinstance(launch, dict) and isinstance(launch.get("argv"), list) and launch["argv"]
                and all(isinstance(a, str) for a in launch["argv"]) and isinstance(launch.get("env"), dict)):
            raise ValueError("queued record %s without what to run" % full["id"])
        full["_launch"] = launch
    return full


def _parse_handover(doc: Any) -> Dict[str, Any]:
    """Everything a successor will rely on, checked before it touches anything."""
    doc = _check_handover_doc(doc)
    for key, kinds in (("listen_fd", (int,)), ("records", (list,)), ("queue", (list,)), ("agent", (dict,)),
                       ("families", (dict,)), ("fds", (list,))):
        if not isinstance(doc.get(key), kinds):
            raise ValueError("handover without a valid %s" % key)
    doc["records"] = [_check_handed_record(r) for r in doc["records"]]
    doc.setdefault("connections", [])
    for conn in doc["connections"]:
        if not (isinstance(conn, dict) and isinstance(conn.get("fd"), int) and isinstance(conn.get("buf"), list)
                and isinstance(conn.get("idle_s"), (int, float)) and isinstance(conn.get("addr"), (list, type(None)))
                and isinstance(conn.get("head_s"), (int, float, type(None)))):
            raise ValueError("a connection the handover does not describe well")
    ids = {r["id"] for r in doc["records"]}
    if not all(isinstance(i, str) and i in ids for i in doc["queue"]):
        raise ValueError("the queue names records the handover does not hold")
    return doc


class _Upgrader:
    """The running agent's upgrade in place (see the section comment): the
    pre-check, the quiesce, the handover and the exec. run() returns only
    when the upgrade did not happen (the agent serves on), with the reason."""

    def __init__(self, server: Any, path: str, argv: List[str], source: Optional[bytes]) -> None:
        self.server = server
        self.path = path
        self.argv = list(argv)
        self.source = source
        self._lock = threading.Lock()      # one upgrade at a time (SIGHUP and /admin/restart may race)
        self._gates: List[Any] = []
        self.request: Callable[[], None] = lambda: None   # set by the main loop: run() there, soon

    def check(self) -> Dict[str, Any]:
        """The new file's pre-check on a preview of the handover; _UpgradeRefused when it fails."""
        preview = _HandoverWriter(dry=True)
        self._hand_over(preview)
        spawner = self.server.manager.spawner
        env = dict(os.environ)
        env.pop(SECRET_ENV, None)           # the check needs no secret; no child ever gets it
        started: List[Any] = []

        def spawn(argv: List[str], **pipes: Any) -> subprocess.Popen:
            # Through the spawner: its subreaper must not take this child's exit status.
            started.append(spawner.spawn(_ChildSpec(argv=argv, cwd=os.getcwd(), env=env, **pipes)))
            return started[-1]

        try:
            return _check_successor(self.path, preview.doc, self.argv, spawn=spawn)
        finally:
            for proc in started:
                spawner.untrack(proc.pid)

    def run(self) -> str:
        if not self._lock.acquire(blocking=False):
            return "an upgrade is already under way"
        try:
            return self._run()
        finally:
            self._lock.release()

    def _run(self) -> str:
        started = time.monotonic()
        try:
            answer = self.check()
        except _UpgradeRefused as exc:
            log.error("upgrade refused, serving on as %s: %s", __version__, exc)
            return str(exc)
        checked = time.monotonic()
        writer = _HandoverWriter()
        try:
            self._quiesce()
            self._hand_over(writer)
            fd = writer.seal()
            log.warning("upgrading in place from %s to %s (%s): checked in %.0f ms, handed over %d records in %.0f ms",
                        __version__, answer.get("version"), self.path, (checked - started) * 1000,
                        len(writer.doc["records"]), (time.monotonic() - checked) * 1000)
            _exec_successor(self.path, self.argv, fd)
            raise OSError("exec returned")            # not reached: execve does not return on success
        except Exception as exc:
            writer.release()
            log.exception("upgrade failed before the exec, serving on as %s", __version__)
            self._resume()
            return "the upgrade failed before the exec: %s" % exc

    def _quiesce(self) -> None:
        """No request in flight, no callback running, no reader reading (bounded; RuntimeError otherwise)."""
        srv, lifecycle = self.server, self.server.manager.lifecycle
        srv.manager.interrupt_waits(True)         # long polls (?wait=) answer now
        srv.hub.pause(UPGRADE_DRAIN_S)
        families = [f for f in srv.families if hasattr(f, "prepare_upgrade")]
        for family in families:                   # what is not handed over ends now (contexts' kernels)
            family.prepare_upgrade()
        if families:
            srv.hub.pause(UPGRADE_DRAIN_S)        # the calls that ended with it answer
        gates = []
        for gate in (lifecycle.watchdog.gate, lifecycle.exits.gate):
            if not gate.acquire(timeout=UPGRADE_PARK_S):
                for held in gates:
                    held.release()
                raise RuntimeError("a timer or exit callback did not finish within %gs" % UPGRADE_PARK_S)
            gates.append(gate)
        self._gates = gates
        if not lifecycle.parking.park(UPGRADE_PARK_S):
            raise RuntimeError("the output readers did not stop within %gs" % UPGRADE_PARK_S)

    def _resume(self) -> None:
        """Undo _quiesce: readers restarted where they parked, callbacks released, serving again."""
        manager = self.server.manager
        manager.lifecycle.parking.unpark()
        for rec in manager.registry.all():
            manager.lifecycle.read_streams(rec)
        for gate in self._gates:
            gate.release()
        self._gates = []
        for family in self.server.families:
            if hasattr(family, "resume_upgrade"):
                family.resume_upgrade()
        self.server.hub.resume()
        manager.interrupt_waits(False)
        self.server.start_accepting()

    def _hand_over(self, writer: _HandoverWriter) -> None:
        srv = self.server
        manager = srv.manager
        registry = manager.registry
        records, queue, extra = registry.hand_over()
        docs = []
        for rec in records:
            with rec.cond:
                docs.append(_hand_over_record(rec, writer, manager.watchdog))
        journal = registry.journal
        writer.doc.update({
            "listen_fd": writer.fd(srv.socket.fileno()),
            "lock_fd": writer.fd(journal.state.lock_fd) if journal is not None else None,
            "journal_pending": journal.pending() if journal is not None else [],
            "agent": {"started": srv.metrics.started, "started_mono": srv.metrics.started_mono,
                      "metrics": srv.metrics.snapshot(),
                      "secret": base64.b64encode(srv.config.secret).decode("ascii") if srv.config.secret else None,
                      "env": manager.launcher.env_store(), "registry": extra},
            "records": docs, "queue": queue, "families": {}, "connections": srv.hub.hand_over(writer),
            "source": writer.blob(self.source or b""),
        })
        for family in srv.families:
            if hasattr(family, "hand_over"):
                writer.doc["families"][family.handover_name] = family.hand_over(writer)


def _durability_info(server: Any) -> Dict[str, Any]:
    """What /info says of the journal and of upgrades in place."""
    journal = server.manager.registry.journal
    return {"journal": journal is not None, "state_dir": journal.state.path if journal is not None else None,
            "disk_bytes": journal.state.usage() if journal is not None else 0,
            "upgrade_in_place": server.upgrader is not None}


def _adopt_record(state: Dict[str, Any], manager: Any, blobs: Dict[str, bytes]) -> _ProcessRecord:
    """A record handed over, rebuilt; one not final gets its descriptors, its
    child (tracked again), its deadlines, readers and an exit watch."""
    cap = manager.config.max_output_bytes
    rec = _restore_record(state, cap, blobs.get(state["id"] + ":out", b""), blobs.get(state["id"] + ":err", b""))
    if state.get("_launch"):               # queued: it runs when its turn comes
        rec.launch.argv, rec.launch.env = list(state["_launch"]["argv"]), dict(state["_launch"]["env"])
        rec.reaped, rec.stdin_closed = False, not rec.launch.stdin
    run = state.get("_run")
    if run is None:
        return rec
    rec.reaped, rec.open_streams = run["reaped"], run["open_streams"]
    rec.started_mono, rec.last_output = run["started_mono"], run["last_output"]
    rec.fds = {name: _claim_fd(fd) for name, fd in run["fds"].items() if name in ("stdout", "stderr")}
    rec.popen = _AdoptedChild(rec.pid, _claim_fd(run["stdin"]) if run["stdin"] is not None else None)
    if isinstance(run.get("pty_eof"), list):
        rec.pty_eof = bytes(run["pty_eof"])
    rec.confinement = _adopted_confinement(run.get("confinement"), rec.launch.limits, rec.launch.user)
    rec.stdin_closed = run["stdin"] is None
    if run["exit_info"] is not None:
        status, usage = run["exit_info"]
        rec.exit_info = (status, None if usage is None else _Usage(*usage))
    rec.journaled = True
    return rec


class _AdoptedChild:
    """What the lifecycle uses of a Popen, for a child its predecessor started."""

    def __init__(self, pid: Optional[int], stdin_fd: Optional[int]) -> None:
        self.pid = pid
        self.stdin = os.fdopen(stdin_fd, "wb", buffering=0) if stdin_fd is not None else None
        self.returncode: Optional[int] = None


def _rearm(rec: _ProcessRecord, run: Dict[str, Any], manager: Any) -> None:
    """A running record's deadlines, readers and exit watch, in the successor."""
    lifecycle, now = manager.lifecycle, time.monotonic()
    deadlines = run["deadlines"]

    def delay(name: str) -> Optional[float]:
        at = deadlines.get(name)
        return max(0.0, at - now) if isinstance(at, (int, float)) else None

    if delay("timeout") is not None:
        rec.timer = lifecycle.watchdog.schedule(delay("timeout"), lambda: lifecycle.on_timeout(rec))
    if delay("idle") is not None:
        rec.idle_timer = lifecycle.watchdog.schedule(delay("idle"), lambda: lifecycle.on_idle(rec))
    if delay("escalate") is not None:
        lifecycle.schedule_escalation(rec, delay("escalate"))
    if rec.pid is not None and not rec.reaped:
        manager.spawner.adopt(rec.pid)
    lifecycle.watch(rec)
    if rec.exit_info is not None:          # reaped before the exec: drained, or waiting for its pipes
        if rec.open_streams == 0:
            lifecycle.finish(rec)
        elif delay("drain") is not None:
            lifecycle.schedule_drain(rec, delay("drain"))


def _adopt_agent(doc: Dict[str, Any], reader: _HandoverReader,
                 manager: Any) -> List[Tuple[_ProcessRecord, Dict[str, Any]]]:
    """The successor's side, after _parse_handover: the records and the
    agent's state into ``manager``. Starts nothing and consumes nothing, so
    that a failure here can still hand the same handover to the previous
    version; _resume_adopted() then starts the readers, watches and timers."""
    refs = {}
    for state in doc["records"]:
        refs[state["id"] + ":out"], refs[state["id"] + ":err"] = state["_out"], state["_err"]
    blobs = {key: reader.take(ref) for key, ref in refs.items()}
    agent = doc["agent"]
    manager.launcher.env_set(agent.get("env") or {}, replace=True)
    adopted = [(_adopt_record(state, manager, blobs), state) for state in doc["records"]]
    manager.registry.adopt([rec for rec, _ in adopted], doc["queue"], agent.get("registry") or {})
    for rec, _ in adopted:
        manager.prepare(rec)
    return adopted


def _resume_adopted(manager: Any, adopted: List[Tuple[_ProcessRecord, Dict[str, Any]]],
                    pending: List[str]) -> None:
    """The successor is committed: each running record resumes (a failure
    is logged and costs that record only), webhooks go on, the journal too."""
    for rec, state in adopted:
        try:
            if state.get("_webhook"):
                _Webhook.adopt(manager, rec, state["_webhook"])
            if state.get("_run") is not None:
                _rearm(rec, state["_run"], manager)
        except Exception:
            log.exception("upgrade: record %s could not be resumed", rec.id)
    journal = manager.registry.journal
    if journal is not None:
        journal.adopted([rec for rec, _ in adopted], pending)


# ============================================================================
# HTTP transport: requests, replies and routes
# ============================================================================

_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")           # RFC 9110 §5.6.2
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")          # CTLs other than tab
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_VERSION_RE = re.compile(r"HTTP/1\.[01]")


class _ClientGone(Exception):
    """The client closed the connection; there is nobody to answer."""


class _DeadlineReader:
    """Socket reads bounded by one deadline for a whole request, so that a
    client dribbling a byte a second cannot hold a thread (a per-recv timeout
    would never fire)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline: Optional[float] = None

    def recv(self, size: int) -> bytes:
        while self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("request deadline passed")
            # settimeout() costs a syscall: change it only when the one in force
            # could overshoot the deadline by more than half a second; one that
            # is shorter (left by an earlier phase) just means another round.
            current = self._sock.gettimeout()
            if not current or current > remaining + 0.5:
                self._sock.settimeout(remaining)
            try:
                return self._sock.recv(size)
            except socket.timeout:
                self._sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        while True:   # no deadline (a WebSocket): another thread's write timeout is not ours
            try:
                return self._sock.recv(size)
            except (socket.timeout, BlockingIOError):
                continue


class _ConnReader:
    """The buffered reading side of one connection, as http.server's rfile:
    the bytes the accept loop already read come first, then the socket
    through the deadline reader. What is left unread after a request (a
    pipelined next request) goes back to the accept loop with the connection."""

    def __init__(self, raw: _DeadlineReader, prefix: bytes = b"") -> None:
        self._raw = raw
        self._buf = bytearray(prefix)

    def _fill(self, size: int = 65536) -> bool:
        data = self._raw.recv(max(size, 65536))
        if not data:
            return False
        self._buf += data
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buf[:size])
        del self._buf[:size]            # O(1) at the front of a bytearray
        return data

    def readline(self, limit: int = -1) -> bytes:
        searched = 0
        while True:
            end = len(self._buf) if limit < 0 else min(len(self._buf), limit)
            found = self._buf.find(b"\n", searched, end)
            if found >= 0:
                return self._take(found + 1)
            if 0 <= limit <= len(self._buf):
                return self._take(limit)
            searched = end
            if not self._fill():
                return self._take(len(self._buf))

    def read(self, size: int) -> bytes:
        while len(self._buf) < size and self._fill(size - len(self._buf)):
            pass
        return self._take(min(size, len(self._buf)))

    def read1(self, size: int) -> bytes:
        if not self._buf:
            self._fill(size)
        return self._take(min(size, len(self._buf)))

    def leftover(self) -> bytes:
        """What was read from the socket and not consumed: it belongs to the next request."""
        return self._take(len(self._buf))

    def close(self) -> None:
        self._buf = bytearray()


def _no_stream_body(size: int = 0) -> Iterator[bytes]:
    raise AgentError("this endpoint does not stream its request body")


class _Request:
    """One parsed request: the endpoints' only view of HTTP.

    The transport gives it callables besides the parsed head:
    ``client_gone()`` says whether the client hung up (synchronous runs end
    their process then); ``long_wait()`` says the endpoint is about to block
    for long (a synchronous run, a long poll), so the request leaves the
    request-thread slots; and on ``body="stream"`` routes ``read_body(size)``
    yields the body in chunks of at most ``size`` bytes, sending
    ``100 Continue`` first when the client asked for it, so a request refused
    before its body is read gets its final answer instead.
    """

    __slots__ = ("method", "target", "path", "query", "headers", "body", "request_id", "version",
                 "close", "claims", "route", "body_read", "content_length", "client_gone", "read_body",
                 "long_wait", "body_left", "_json")

    def __init__(self) -> None:
        self.method, self.target, self.path, self.version = "", "", "", "HTTP/1.1"
        self.query: Dict[str, List[str]] = {}
        self.headers: Dict[str, List[str]] = {}
        self.body = b""
        self.request_id = ""
        self.close = True
        self.claims: Optional[Dict[str, Any]] = None
        self.body_read = False       # the body (if any) is off the wire: the connection can be reused
        self.content_length = 0
        self.body_left: Optional[int] = None      # a streamed body's bytes still unread, once reading began
        self.route = "unmatched"
        self.client_gone: Callable[[], bool] = lambda: False
        self.read_body: Callable[..., Iterator[bytes]] = _no_stream_body
        self.long_wait: Callable[[], bool] = lambda: False
        self._json: Optional[Dict[str, Any]] = None


    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name)
        return values[0] if values else None

    def param(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Dict[str, Any]:
        """The body as a JSON object ({} when empty), or a 400."""
        if self._json is None:
            if not self.body.strip():
                self._json = {}
            else:
                try:
                    value = _strict_json(self.body)
                except (ValueError, RecursionError) as exc:
                    raise BadRequest("body is not valid JSON: %s" % _short(exc), code="INVALID_JSON")
                if not isinstance(value, dict):
                    raise BadRequest("body must be a JSON object")
                self._json = value
        return self._json


def _query_flag(req: _Request, name: str, default: bool) -> bool:
    value = req.param(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise BadRequest("query parameter %r must be true or false" % name)


def _query_offset(req: _Request, name: str) -> Optional[int]:
    value = req.param(name)
    if value is None or value == "":
        return None
    if not _is_digits(value) or len(value) > 18:
        raise BadRequest("query parameter %r must be a non-negative integer" % name)
    return int(value)


# -- what an endpoint may return besides a dict (a 200 JSON answer) ------------


class _Reply:
    """A complete answer other than a plain 200 JSON object. ``body`` may be a
    list of byte strings (a listing's records), sent without joining them."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: Any = b"", content_type: Optional[str] = "application/json",
                 headers: Optional[Dict[str, str]] = None) -> None:
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = headers or {}


class _SendFile:
    """``count`` bytes of an open file from ``offset``, sent with
    socket.sendfile (zero copy); the transport closes the file."""

    __slots__ = ("file", "offset", "count", "status", "content_type", "headers")

    def __init__(self, file: Any, offset: int, count: int, *, status: int = 200,
                 content_type: str = "application/octet-stream", headers: Optional[Dict[str, str]] = None) -> None:
        self.file, self.offset, self.count, self.status = file, offset, count, status
        self.content_type, self.headers = content_type, headers or {}


class _Chunks:
    """A body written as it is produced (a tar, an event stream); the
    connection closes at its end, which is how the client sees the end."""

    __slots__ = ("chunks", "status", "content_type", "headers")

    def __init__(self, chunks: Iterable[bytes], *, status: int = 200,
                 content_type: str = "application/octet-stream", headers: Optional[Dict[str, str]] = None) -> None:
        self.chunks, self.status, self.content_type = chunks, status, content_type
        self.headers = headers or {}


class _Upgrade:
    """A WebSocket: the transport sends 101 and runs ``session(ws)`` on the
    connection's thread until it returns; the connection then closes."""

    __slots__ = ("session", "accept", "on_refused")

    def __init__(self, session: Callable[["_WebSocket"], None],
                 on_refused: Optional[Callable[[], None]] = None) -> None:
        self.session = session
        self.accept = ""             # Sec-WebSocket-Accept, filled in by the transport
        self.on_refused = on_refused   # run when the upgrade is refused after all (too many streams)


# -- routes ---------------------------------------------------------------------

_Route = collections.namedtuple("_Route", "method pattern segments fn auth body websocket")


def _route(method: str, pattern: str, fn: Callable[..., Any], *, auth: bool = True,
           body: str = "json", websocket: bool = False) -> _Route:
    """One route: ``{name}`` in the pattern matches one path segment (``{name*}``
    the rest of the path) and is passed to ``fn(srv, req, name=...)``. ``auth``:
    True (a valid token needed), False, or "optional" (``req.claims`` says). ``body``: "json" (read whole, at most
    MAX_BODY_BYTES, before the endpoint runs) or "stream" (the endpoint reads
    it with ``req.read_body``; no size limit but its own). Matched segment by
    segment, not by a regex: nothing to compile at import, and less per request."""
    segments = tuple(pattern.split("/"))
    if segments[0] or segments[1].startswith("{"):    # the server finds routes by their first segment
        raise ValueError("a route starts with / and a literal segment: %r" % pattern)
    return _Route(method, pattern, segments, fn, auth, body, websocket)


def _match_route(segments: Tuple[str, ...], parts: List[str]) -> Optional[Dict[str, str]]:
    """The path parameters (still %-encoded) when the path's ``parts`` (split
    on "/") fit the route's ``segments``, else None. A ``{name}`` takes one
    non-empty part; a final ``{name*}`` all the rest, slashes included."""
    params: Dict[str, str] = {}
    for i, segment in enumerate(segments):
        if segment.startswith("{"):
            if segment.endswith("*}"):
                rest = "/".join(parts[i:])
                if not rest:
                    return None
                params[segment[1:-2]] = rest
                return params
            if i >= len(parts) or not parts[i]:
                return None
            params[segment[1:-1]] = parts[i]
        elif i >= len(parts) or parts[i] != segment:
            return None
    return params if len(parts) == len(segments) else None


class _Metrics:
    """Request counters per route and status class, for /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the counters
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.requests: Dict[str, int] = collections.Counter()
        self.errors: Dict[str, int] = collections.Counter()

    def observe(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route] += 1
            if status >= 400:
                self.errors[route] += 1

    def snapshot(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        with self._lock:
            return dict(self.requests), dict(self.errors)

    @property
    def uptime(self) -> float:
        return round(time.monotonic() - self.started_mono, 3)


# ============================================================================
# HTTP transport: WebSocket (RFC 6455) and Server-Sent Events
# ============================================================================

WS_MAX_MESSAGE_BYTES = 1024 * 1024    # larger client frames or messages are refused (close 1009)
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 §1.3
_WS_CONT, _WS_TEXT, _WS_BINARY, _WS_CLOSE, _WS_PING, _WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
SSE_HEARTBEAT_S = 15.0                # a comment line this often keeps proxies from timing out


def _websocket_accept(req: _Request) -> str:
    """Check an upgrade request (RFC 6455 §4.2.1); the Sec-WebSocket-Accept value, or 426/400."""
    key = req.header("sec-websocket-key") or ""
    if (req.header("upgrade") or "").lower() != "websocket" or "upgrade" not in (req.header("connection") or "").lower():
        raise AgentError("this endpoint needs a WebSocket upgrade", status=426, code="INVALID_REQUEST",
                         headers={"Upgrade": "websocket"})
    if req.header("sec-websocket-version") != "13":
        raise AgentError("WebSocket version 13 is required", status=426, code="INVALID_REQUEST",
                         headers={"Sec-WebSocket-Version": "13"})
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise BadRequest("invalid Sec-WebSocket-Key")
    return base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode("ascii")


class _WsClosed(Exception):
    """The WebSocket is closed (by either side, or by a protocol error)."""


class _WebSocket:
    """The server side of RFC 6455 over an upgraded connection: unmasks and
    reassembles client messages, answers pings and closes, sends frames."""

    def __init__(self, sock: socket.socket, rfile: Any, reader: _DeadlineReader) -> None:
        self.sock, self.rfile, self._reader = sock, rfile, reader
        # Frames from the session and the reader thread must not interleave;
        # sendall holds it, bounded by the socket's write timeout.
        self._send_lock = threading.Lock()
        self.gone = False            # the client closed or vanished
        self._closing = False        # we sent our close frame
        self._thread: Optional[threading.Thread] = None

    def _read_exact(self, size: int) -> bytes:
        data = self.rfile.read(size) if size else b""
        if len(data) < size:
            raise _WsClosed("connection closed")
        return data

    def _read_frame(self) -> Tuple[bool, int, bytes]:
        first, second = self._read_exact(2)
        fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        if first & 0x70:
            self.fail(1002, "reserved bits set (no extension was negotiated)")
        if not second & 0x80:
            self.fail(1002, "client frames must be masked")
        if opcode not in (_WS_CONT, _WS_TEXT, _WS_BINARY, _WS_CLOSE, _WS_PING, _WS_PONG):
            self.fail(1002, "unknown opcode %d" % opcode)
        if length == 126:
            length = int.from_bytes(self._read_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._read_exact(8), "big")
        if opcode >= _WS_CLOSE and (length > 125 or not fin):
            self.fail(1002, "control frames must be short and unfragmented")
        if length > WS_MAX_MESSAGE_BYTES:
            self.fail(1009, "frame larger than %d bytes" % WS_MAX_MESSAGE_BYTES)
        mask = self._read_exact(4)
        payload = self._read_exact(length)
        if length:   # unmask with one big-integer XOR instead of a loop per byte
            key = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
        return fin, opcode, payload

    def recv_message(self, timeout: Optional[float] = None) -> Tuple[int, bytes]:
        """The next text or binary message, reassembled; control frames are
        answered here. With ``timeout``, socket.timeout when none arrives in time."""
        self._reader.deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._recv_message()
        finally:
            self._reader.deadline = None

    def recv_json(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The next message as a JSON object, or None when it is not one."""
        opcode, message = self.recv_message(timeout)
        try:
            value = _strict_json(message) if opcode == _WS_TEXT else None
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    def _recv_message(self) -> Tuple[int, bytes]:
        parts: List[bytes] = []
        kind = None
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == _WS_PING:
                self.send(_WS_PONG, payload)
                continue
            if opcode == _WS_PONG:
                continue
            if opcode == _WS_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                self.gone = True
                if not self._closing:
                    self.close(code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1002)
                raise _WsClosed("closed by the client")
            if (opcode == _WS_CONT) == (kind is None):
                self.fail(1002, "unexpected continuation frame" if kind is None else "expected a continuation frame")
            kind = kind if kind is not None else opcode
            parts.append(payload)
            if sum(len(p) for p in parts) > WS_MAX_MESSAGE_BYTES:
                self.fail(1009, "message larger than %d bytes" % WS_MAX_MESSAGE_BYTES)
            if fin:
                message = b"".join(parts)
                if kind == _WS_TEXT:
                    try:
                        message.decode("utf-8")
                    except UnicodeDecodeError:
                        self.fail(1007, "text message is not UTF-8")
                return kind, message

    def send(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = bytes([0x80 | opcode, size])
        elif size < 65536:
            head = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")
        with self._send_lock:
            try:
                self.sock.settimeout(WRITE_TIMEOUT_S)
                self.sock.sendall(head + payload)
            except OSError:
                self.gone = True
                raise _WsClosed("connection lost") from None

    def send_json(self, message: Dict[str, Any]) -> None:
        self.send(_WS_TEXT, json.dumps(message).encode("utf-8"))

    def close(self, code: int, reason: str = "") -> None:
        if not self._closing:
            self._closing = True
            self.send(_WS_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:120])

    def fail(self, code: int, reason: str) -> None:
        """Close with a protocol error code and stop reading."""
        try:
            self.close(code, reason)
        finally:
            self.gone = True
        raise _WsClosed(reason)

    def error(self, code: int, message: str, error_code: str) -> None:
        """A bad execute request: an error message, then close."""
        self.send_json({"type": "error", "error": message, "message": message, "code": error_code})
        self.close(code, message[:100])

    def start_reader(self, name: str, on_gone: Callable[[], None],
                     on_message: Optional[Callable[[int, bytes], None]] = None) -> None:
        """Read the client's frames on a thread of its own: pings and closes
        are answered, messages go to ``on_message`` (ignored without one), and
        ``on_gone`` runs once the client has closed or vanished."""
        def run() -> None:
            try:
                while True:
                    opcode, message = self.recv_message()
                    if on_message is not None:
                        on_message(opcode, message)
            except (_WsClosed, OSError, ValueError):
                pass
            except Exception:
                log.exception("WebSocket reader failed")
            self.gone = True
            try:
                on_gone()
            except Exception:
                log.exception("WebSocket close handling failed")
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """After our close frame: give the client a moment to answer, then drop the connection."""
        if self._thread is not None:
            self._thread.join(1.0)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(1.0)


def _sse_event(kind: str, payload: Any, event_id: Optional[str] = None) -> str:
    """One Server-Sent Event (a JSON payload on one data line)."""
    head = "id: %s\n" % event_id if event_id is not None else ""
    return "%sevent: %s\ndata: %s\n\n" % (head, kind, json.dumps(payload))


_SSE_HEARTBEAT = b": heartbeat\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ============================================================================
# HTTP transport: connections (one accept loop, a pool of request threads)
# ============================================================================

HEAD_DEADLINE_S = 10.0                # from a request's first byte to the end of its head
MAX_REQUEST_THREADS = 64              # requests handled at once; more wait, their heads read, for one
REQUEST_THREADS_KEPT = 4              # idle request threads kept ready; the others end when idle
REQUEST_THREAD_IDLE_S = 5.0           # a request thread beyond those ends after this long idle
MAX_STREAMS = 256                     # streams (SSE, WebSocket, transfers) at once, apart from requests
MAX_HEAD_BUFFER_BYTES = MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES + 8   # then the parser says 414/431


class _Conn:
    """A client connection and what the accept loop has read from it."""

    __slots__ = ("sock", "addr", "buf", "idle_since", "head_since", "seq", "waiting")

    def __init__(self, sock: socket.socket, addr: Any, seq: int) -> None:
        self.sock, self.addr, self.seq = sock, addr, seq
        self.waiting = False                   # its request is a long wait (?wait=): an upgrade wakes it
        self.buf = bytearray()
        self.idle_since = time.monotonic()     # sent nothing of its next request since then
        self.head_since: Optional[float] = None   # when the head now being read began

    def head_complete(self) -> bool:
        """A whole request head (or more than a head may be) has arrived."""
        start = 0
        while start < min(len(self.buf), 8) and self.buf[start] in b"\r\n":
            start += 1                       # stray CRLFs before a request (RFC 9112 §2.2)
        return (self.buf.find(b"\n\r\n", start) >= 0 or self.buf.find(b"\n\n", start) >= 0
                or len(self.buf) > MAX_HEAD_BUFFER_BYTES)


def _await_next_head(conn: _Conn, timeout: float) -> bool:
    """After an answer on a kept-alive connection: True when the next request
    head arrives within ``timeout`` (kept in ``conn.buf``). A client that sends
    its next request at once (a poll loop, the SDK's calls in a row) then skips
    two thread hand-offs and a wake-up of the hub (~0.3 ms of a 0.6 ms answer);
    the others go back to the hub ``timeout`` later."""
    if conn.buf and conn.head_complete():          # pipelined: already read
        return True
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return False
        try:
            data = conn.sock.recv(65536)
        except OSError:
            return False                           # the hub sees the error again, and drops it
        if not data:
            return False                           # closed: the hub sees the EOF again
        if not conn.buf:
            conn.head_since = time.monotonic()
        conn.buf += data
        if conn.head_complete():
            return True


def _refusal(status: int, exc: AgentError) -> bytes:
    """A complete answer for a connection that gets no thread (503 at the cap, 408)."""
    request_id = secrets.token_hex(8)
    body = _json_bytes(exc.to_json(request_id=request_id))
    reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    head = ("HTTP/1.1 %d %s\r\nServer: hopx-agent/%s\r\nX-Request-ID: %s\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            % (status, reason, __version__, request_id, len(body)))
    return head.encode("ascii") + body


class _RequestThreads:
    """The threads that handle requests whose head has arrived: at most
    MAX_REQUEST_THREADS at once, reused, a few kept idle. A thread whose
    request becomes a stream leaves the pool (release()), so streams never
    take request slots."""

    def __init__(self, run: Callable[[_Conn], None], limit: int = MAX_REQUEST_THREADS) -> None:
        self._run = run
        self._limit = limit
        self._cond = threading.Condition()   # guards every field below
        self._pending: collections.deque = collections.deque()
        self._threads = 0                    # pool threads alive (busy or idle)
        self._idle = 0
        self._seq = 0
        self._stopped = False
        self._local = threading.local()      # .released: this thread left the pool for a stream

    def submit(self, conn: _Conn) -> bool:
        """Queue a connection for a thread; False when no thread exists nor can be started."""
        with self._cond:
            self._pending.append(conn)
            if self._idle >= len(self._pending) or self._threads >= self._limit:
                self._cond.notify()
                return True
            self._threads += 1
            self._seq += 1
            name = "hopx-request-%d" % self._seq
        try:
            threading.Thread(target=self._work, name=name, daemon=True).start()
            return True
        except RuntimeError:      # no thread to be had (pid or memory limits): say so, not a reset
            with self._cond:
                self._threads -= 1
                if self._threads or conn not in self._pending:
                    return True   # another thread will take it
                self._pending.remove(conn)
            log.warning("cannot start a thread for a request: answering 503")
            return False

    def release(self) -> None:
        """The calling pool thread's request became a stream: it no longer counts."""
        if getattr(self._local, "released", True):
            return
        self._local.released = True
        with self._cond:
            self._threads -= 1
            need = bool(self._pending) and self._idle == 0 and self._threads < self._limit
        if need:                  # requests are waiting: a new thread takes over the slot
            self._grow()

    def _grow(self) -> None:
        with self._cond:
            self._threads += 1
            self._seq += 1
            name = "hopx-request-%d" % self._seq
        try:
            threading.Thread(target=self._work, name=name, daemon=True).start()
        except RuntimeError:
            with self._cond:
                self._threads -= 1

    def _next(self) -> Optional[_Conn]:
        with self._cond:
            while not self._pending:
                if self._stopped:
                    self._threads -= 1
                    return None
                self._idle += 1
                notified = self._cond.wait(None if self._threads <= REQUEST_THREADS_KEPT else REQUEST_THREAD_IDLE_S)
                self._idle -= 1
                if not notified and not self._pending and self._threads > REQUEST_THREADS_KEPT:
                    self._threads -= 1
                    return None
            return self._pending.popleft()

    def _work(self) -> None:
        me = threading.current_thread()
        idle_name = me.name
        while True:
            conn = self._next()
            if conn is None:
                return
            self._local.released = False
            me.name = "hopx-http-%d" % conn.seq      # a busy request thread, by its connection
            try:
                self._run(conn)
            except Exception:
                log.exception("request thread failed")
            finally:
                me.name = idle_name
            if self._local.released:                 # it served a stream: the pool replaced it
                return

    def stop(self) -> List[_Conn]:
        """Idle threads end; returns the connections still waiting for one."""
        with self._cond:
            self._stopped = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return pending


class _Hub:
    """The accept loop: one thread and one selector hold every connection that
    is idle or still sending its request head, so an idle or slow client
    costs no thread; a connection gets a request thread only once a whole
    head has arrived, and comes back here between kept-alive requests.

    At the cap (``max_connections``, streams not counted) the connection
    idle the longest is closed for the new one; with none idle the new one
    gets 503. Heads must arrive within HEAD_DEADLINE_S (408), idle kept-alive
    connections close after KEEPALIVE_IDLE_S.
    """

    def __init__(self, server: "_AgentServer") -> None:
        self._server = server
        self._lock = threading.Lock()        # guards _returned, _streams, _active, _seq
        self._returned: List[_Conn] = []     # connections handed back by request threads
        self._active = 0                     # connections with a request thread (not streams)
        self._streams = 0
        self._waits = 0                      # of the streams, the long waits (an upgrade lets them answer)
        self._paused = threading.Condition(self._lock)   # notified as requests end (an upgrade waits)
        self._seq = 0
        # fd -> connection held by the loop: changed by its thread only (under _lock, for counts())
        self._held: Dict[int, _Conn] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._keep = False                   # the loop ends for an upgrade: keep the connections
        self.threads = _RequestThreads(server.handle_connection)

    # -- called from request threads ---------------------------------------------

    def give_back(self, conn: _Conn, *, stream: bool) -> None:
        """A kept-alive connection whose request is answered (``stream``: it
        had left the request slots): wait for its next head here."""
        conn.idle_since, conn.head_since = time.monotonic(), None
        with self._lock:
            self._count_end(conn, stream)
            self._returned.append(conn)
        self._wake()

    def may_linger(self) -> bool:
        """Whether a request thread may wait a moment for its connection's next
        request: not once the loop stops (shutdown, or an upgrade waits for the
        requests to end), nor past half the connection cap, where a lingering
        connection could not be closed to make room for a new one."""
        with self._lock:
            used = self._active + len(self._held) + len(self._returned)
        return not self._stop.is_set() and 2 * used < self._server.config.max_connections

    def closed(self, conn: _Conn, *, stream: bool) -> None:
        with self._lock:
            self._count_end(conn, stream)
        self._wake()

    def _count_end(self, conn: _Conn, stream: bool) -> None:
        if stream:
            self._streams -= 1
        else:
            self._active -= 1
        if conn.waiting:
            conn.waiting = False
            self._waits -= 1
        self._paused.notify_all()

    def to_stream(self, conn: _Conn, *, capped: bool) -> bool:
        """The connection's request becomes a stream (or a long wait): it leaves
        the request slots and the connection cap. False over MAX_STREAMS."""
        with self._lock:
            if capped and self._streams >= MAX_STREAMS:
                return False
            self._active -= 1
            self._streams += 1
            if not capped:               # a long wait, not a stream: it answers when woken
                conn.waiting = True
                self._waits += 1
        self.threads.release()
        self._wake()
        return True

    def counts(self) -> Dict[str, int]:
        with self._lock:
            reading = sum(1 for conn in self._held.values() if conn.buf)
            return {"active": self._active, "streams": self._streams, "reading": reading,
                    "idle": len(self._held) - reading}

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:           # full (a wake-up is pending anyway) or closed at shutdown
            pass

    # -- the loop ------------------------------------------------------------------

    def run(self, listener: socket.socket, poll_interval: float) -> None:
        self._stop.clear()
        self._done.clear()
        selector = selectors.DefaultSelector()
        try:
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._take_returned(selector)    # kept by a refused upgrade, or handed over by the predecessor
            while not self._stop.is_set():
                timeout = max(0.0, min(poll_interval, self._next_deadline() - time.monotonic()))
                for key, _ in selector.select(timeout):
                    if key.data == "accept":
                        self._accept(selector, listener)
                    elif key.data == "wake":
                        self._take_returned(selector)
                    else:
                        self._readable(selector, key.data)
                self._expire(selector)
        finally:
            for conn in list(self._held.values()):
                if self._keep:           # paused for an upgrade: the connection stays, for the next loop
                    with self._lock:
                        self._returned.append(conn)
                else:
                    self._drop(selector, conn)
            with self._lock:
                self._held.clear()
            selector.close()
            self._done.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        self._done.wait(timeout)
        for conn in self.threads.stop():     # heads read, never answered: close them
            _close_socket(conn.sock)

    # -- an upgrade in place (durability): the connections go to the successor ----

    def pause(self, timeout: float) -> bool:
        """Stop the loop, keeping every connection (the listening socket stays
        open: the kernel queues new ones), and wait up to ``timeout`` for the
        requests under way and the long waits (woken by then) to answer.
        True when none is left."""
        deadline = time.monotonic() + timeout
        self._keep = True
        self._stop.set()
        self._wake()
        self._done.wait(timeout)
        with self._lock:
            return self._paused.wait_for(lambda: not self._active and not self._waits,
                                         max(0.0, deadline - time.monotonic()))

    def hand_over(self, writer: Any) -> List[Dict[str, Any]]:
        """The connections held while paused (idle ones, and those with part of
        a head), as the successor's hub takes them."""
        with self._lock:
            conns = list(self._held.values()) + self._returned
        now = time.monotonic()
        return [{"fd": writer.fd(c.sock.fileno()), "addr": list(c.addr) if isinstance(c.addr, tuple) else None,
                 "buf": writer.blob(bytes(c.buf)), "idle_s": now - c.idle_since,
                 "head_s": None if c.head_since is None else now - c.head_since} for c in conns]

    def adopt(self, items: List[Tuple[socket.socket, Any, bytes, float, Optional[float]]]) -> None:
        """Connections a predecessor handed over: (socket, address, what was read
        of the next head, idle since, head since), held from now on."""
        conns = []
        for sock, addr, buf, idle_since, head_since in items:
            with self._lock:
                self._seq += 1
                seq = self._seq
            conn = _Conn(sock, addr, seq)
            conn.buf, conn.idle_since, conn.head_since = bytearray(buf), idle_since, head_since
            conns.append(conn)
        with self._lock:
            self._returned.extend(conns)
        self._wake()

    def resume(self) -> None:
        """The upgrade did not happen: the loop holds the same connections again."""
        self._keep = False

    def close(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _accept(self, selector: Any, listener: socket.socket) -> None:
        self._take_returned(selector)        # so that idle kept-alive ones can make room at the cap
        for _ in range(64):                  # a burst at a time; the rest on the next round
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:           # EMFILE and the like: log, keep serving the others
                log.warning("accept failed: %s", exc)
                return
            with self._lock:
                self._seq += 1
                seq = self._seq
            if self._full() and not self._evict_idle(selector):
                self._refuse(sock, 503, Unavailable("too many open connections (max %d)"
                                                    % self._server.config.max_connections))
                continue
            sock.setblocking(False)
            conn = _Conn(sock, addr, seq)
            self._hold(selector, conn)

    def _full(self) -> bool:
        with self._lock:      # connections handed back but not yet held count too
            return self._active + len(self._held) + len(self._returned) >= self._server.config.max_connections

    def _evict_idle(self, selector: Any) -> bool:
        """Close the connection idle the longest (it has sent nothing since its last answer)."""
        idle = [c for c in self._held.values() if not c.buf]
        if not idle:
            return False
        self._drop(selector, min(idle, key=lambda c: c.idle_since))
        return True

    def _hold(self, selector: Any, conn: _Conn) -> None:
        if conn.buf and conn.head_since is None:
            conn.head_since = time.monotonic()
        with self._lock:
            self._held[conn.sock.fileno()] = conn
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.head_complete():             # a pipelined request came back with its connection
            self._dispatch(selector, conn)

    def _drop(self, selector: Any, conn: _Conn) -> None:
        with self._lock:
            self._held.pop(conn.sock.fileno(), None)
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        _close_socket(conn.sock)

    def _take_returned(self, selector: Any) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:       # BlockingIOError: drained
            pass
        with self._lock:
            returned, self._returned = self._returned, []
        for conn in returned:
            conn.sock.setblocking(False)
            self._hold(selector, conn)

    def _readable(self, selector: Any, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                         # the client closed (or reset) its side
            self._drop(selector, conn)
            return
        if not conn.buf:
            conn.head_since = time.monotonic()
        conn.buf += data
        if conn.head_complete():
            self._dispatch(selector, conn)

    def _dispatch(self, selector: Any, conn: _Conn) -> None:
        """Hand a connection with a whole head to a request thread."""
        selector.unregister(conn.sock)
        conn.sock.setblocking(True)
        with self._lock:
            self._held.pop(conn.sock.fileno(), None)
            self._active += 1
        if not self.threads.submit(conn):
            with self._lock:
                self._active -= 1
            self._refuse(conn.sock, 503, Unavailable("no thread is available to serve the request"))

    def _refuse(self, sock: socket.socket, status: int, exc: AgentError) -> None:
        """A short answer on a fresh or idle socket: its send buffer takes it at once."""
        try:
            sock.setblocking(False)
            sock.send(_refusal(status, exc))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _close_socket(sock)

    def _next_deadline(self) -> float:
        deadline = time.monotonic() + 60.0
        head_s = min(HEAD_DEADLINE_S, self._server.config.request_deadline)
        for conn in self._held.values():
            due = conn.head_since + head_s if conn.buf and conn.head_since else conn.idle_since + KEEPALIVE_IDLE_S
            deadline = min(deadline, due)
        return deadline

    def _expire(self, selector: Any) -> None:
        now = time.monotonic()
        head_s = min(HEAD_DEADLINE_S, self._server.config.request_deadline)
        for conn in list(self._held.values()):
            if conn.buf and conn.head_since is not None and now >= conn.head_since + head_s:
                with self._lock:
                    self._held.pop(conn.sock.fileno(), None)
                selector.unregister(conn.sock)
                self._refuse(conn.sock, 408, AgentError("request head not received in time", status=408,
                                                        code="INVALID_REQUEST"))
            elif not conn.buf and now >= conn.idle_since + KEEPALIVE_IDLE_S:
                self._drop(selector, conn)


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# ============================================================================
# HTTP transport: the handler (reading, routing, answering) and the server
# ============================================================================

ERROR_DRAIN_BYTES = 64 * 1024 * 1024   # after an error mid-upload, discard up to this much of the rest
TRANSFER_IDLE_S = 60.0                # a streamed upload that moves no byte for this long is dropped


_JSON_TYPES = ("application/json",)
_STREAM_TYPES = ("application/octet-stream", "multipart/form-data")


def _host_of(value: str) -> Tuple[str, str]:
    """(host, port) of a Host header or an origin's authority, lower case."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host.lower(), rest.lstrip(":")
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host.lower(), port


def _is_local_host(host: str, bound: str) -> bool:
    """The bound address, a loopback name or a loopback address; behind a
    wildcard bind any IP literal too (DNS rebinding needs a host name)."""
    import ipaddress
    if host == bound.lower() or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or bound in ("0.0.0.0", "::", "")


def _check_local_request(req: _Request, srv: "_AgentServer", route: Optional[_Route], length: int) -> None:
    """Under --no-auth, refuse what a web page in a browser could send (as
    Jupyter does): a foreign Host (DNS rebinding), a foreign Origin (CSRF,
    WebSockets included) and bodies of a type a cross-site form may send."""
    host_header = req.header("host")
    if host_header is not None and not _is_local_host(_host_of(host_header)[0], srv.config.host):
        raise AgentError("Host %r is not this agent's address (--no-auth serves local clients only)"
                         % host_header[:100], status=403, code="FORBIDDEN")
    origin = req.header("origin")
    if origin is not None:
        scheme, _, authority = origin.partition("://")
        if scheme not in ("http", "https") or host_header is None or authority.lower() != host_header.lower():
            raise AgentError("cross-origin request from %r refused (--no-auth)" % origin[:100],
                             status=403, code="FORBIDDEN")
    if length:
        kind = (req.header("content-type") or "").split(";")[0].strip().lower()
        allowed = _STREAM_TYPES if route is not None and route.body == "stream" else _JSON_TYPES
        if kind not in allowed:
            raise AgentError("Content-Type %r refused under --no-auth: send %s" % (kind or "(none)", " or ".join(allowed)),
                             status=415, code="UNSUPPORTED_MEDIA_TYPE")


def _parse_head(rfile: Any, req: _Request, line: bytes) -> None:
    """Request line and headers, strictly (api.md §10); the body is read later."""
    req.request_id = secrets.token_hex(8)
    if len(line) > MAX_REQUEST_LINE_BYTES or not line.endswith(b"\n"):
        raise AgentError("request line too long", status=414, code="INVALID_REQUEST")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0].encode("latin-1")) \
            or not _VERSION_RE.fullmatch(parts[2]):
        raise BadRequest("malformed request line")
    req.method, req.target, req.version = parts
    if req.target.startswith("/"):      # origin-form (RFC 9112 §3.2.1): "//x/y" is a path too
        path, _, query = req.target.partition("?")
        path = path.partition("#")[0]
    else:                               # absolute-form, as sent to proxies
        try:
            split = urllib.parse.urlsplit(req.target)
        except ValueError:
            raise BadRequest("malformed request target") from None
        if split.scheme not in ("http", "https"):
            raise BadRequest("malformed request target")
        path, query = split.path or "/", split.query
    req.path = path[:-1] if len(path) > 1 and path.endswith("/") else path
    _read_header_lines(rfile, req)
    rid = req.header("x-request-id")
    if rid is not None and _REQUEST_ID_RE.fullmatch(rid):
        req.request_id = rid
    connection = (req.header("connection") or "").lower()
    req.close = "close" in connection or (req.version == "HTTP/1.0" and "keep-alive" not in connection)
    try:
        req.query = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise BadRequest("too many query parameters") from None


def _read_header_lines(rfile: Any, req: _Request) -> None:
    """Header lines up to the empty one, strictly (RFC 9112 §5)."""
    total = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE_BYTES + 1)
        if not line:
            raise _ClientGone()
        total += len(line)
        if len(line) > MAX_HEADER_LINE_BYTES or total > MAX_HEADER_BYTES \
                or len(req.headers) > MAX_HEADERS:
            req.close = True
            raise AgentError("request header fields too large", status=431, code="INVALID_REQUEST")
        if line in (b"\r\n", b"\n"):
            return
        name, sep, value = line.rstrip(b"\r\n").partition(b":")
        value = value.strip(b" \t")
        # No obs-fold, no space before the colon, no control characters (RFC 9112 §5).
        if not sep or not _TOKEN_RE.fullmatch(name) or _BAD_VALUE_RE.search(value):
            req.close = True
            raise BadRequest("malformed header line")
        req.headers.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))


def _content_length(req: _Request, limit: Optional[int]) -> int:
    """The body's length: one Content-Length of digits, at most ``limit`` (413); no Transfer-Encoding (501)."""
    if "transfer-encoding" in req.headers:
        req.close = True
        raise AgentError("Transfer-Encoding is not supported; send Content-Length",
                         status=501, code="INVALID_REQUEST")
    values = req.headers.get("content-length")
    if not values:
        return 0
    if len(values) != 1 or not _is_digits(values[0]):
        req.close = True
        raise BadRequest("invalid Content-Length")
    length = int(values[0])
    if limit is not None and length > limit:
        req.close = True
        raise AgentError("request body larger than %d bytes" % limit,
                         status=413, code="PAYLOAD_TOO_LARGE")
    return length


class _ResponseWriter:
    """The writing side of one connection: every answer in one write (or a
    scatter-gather sendmsg of its parts), files with sendfile, streamed bodies,
    and the linger before a close after an error."""

    def __init__(self, sock: socket.socket, server_version: str, date: Callable[[], str]) -> None:
        self.connection = sock
        self.server_version = server_version
        self.date = date

    def write(self, data: bytes) -> None:
        try:
            # sendall's timeout bounds the whole answer: it must be the full
            # WRITE_TIMEOUT_S, not a shorter one left by a read.
            if self.connection.gettimeout() != WRITE_TIMEOUT_S:
                self.connection.settimeout(WRITE_TIMEOUT_S)
            self.connection.sendall(data)
        except OSError:
            raise _ClientGone() from None

    def head(self, req: _Request, status: int, content_type: Optional[str], headers: Dict[str, str],
              length: Optional[int]) -> bytes:
        """Status line and headers; without ``length`` the body runs until the connection closes."""
        reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
        lines = ["HTTP/1.1 %d %s" % (status, reason), "Server: " + self.server_version,
                 "Date: " + self.date(), "X-Request-ID: " + (req.request_id or secrets.token_hex(8))]
        if status not in (204, 304):
            lines.append("Content-Type: %s" % (content_type or "application/json"))
            if length is not None:
                lines.append("Content-Length: %d" % length)
        lines.extend("%s: %s" % item for item in headers.items())
        if req.close or length is None:
            lines.append("Connection: close")
        elif req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, req: _Request, status: int, body: Any, content_type: Optional[str],
              headers: Dict[str, str]) -> None:
        parts = body if isinstance(body, (list, tuple)) else [body]
        head = self.head(req, status, content_type, headers, sum(len(p) for p in parts))
        try:
            if req.method == "HEAD" or status in (204, 304):
                self.write(head)
            elif len(parts) == 1 and len(parts[0]) < 65536:
                self.write(head + parts[0])          # one write: no Nagle stall, no second copy to speak of
            else:
                self.write_parts([head] + list(parts))
        except _ClientGone:
            req.close = True

    def write_parts(self, parts: List[bytes]) -> None:
        """Several byte strings in as few system calls as possible, never joined
        (a big answer is not copied once more to be sent)."""
        if not hasattr(self.connection, "sendmsg"):
            for part in parts:
                self.write(part)
            return
        views = collections.deque(memoryview(p) for p in parts if p)
        try:
            self.connection.settimeout(WRITE_TIMEOUT_S)
            while views:
                sent = self.connection.sendmsg(list(itertools.islice(views, 0, 512)))
                while sent and views:
                    first = views[0]
                    if sent >= len(first):
                        sent -= len(first)
                        views.popleft()
                    else:
                        views[0] = first[sent:]
                        sent = 0
        except OSError:
            raise _ClientGone() from None

    def send_file(self, req: _Request, reply: _SendFile) -> None:
        """Head, then the file by socket.sendfile (zero copy where the OS has it)."""
        try:
            self.write(self.head(req, reply.status, reply.content_type, reply.headers, reply.count))
            if req.method == "HEAD" or not reply.count:
                return
            self.connection.settimeout(WRITE_TIMEOUT_S)   # per send: an inactivity bound, not a total
            try:
                sent = self.connection.sendfile(reply.file, reply.offset, reply.count)
            except OSError:
                raise _ClientGone() from None
            if sent < reply.count:      # the file shrank under us: the framing is broken, close
                req.close = True
        finally:
            reply.file.close()

    def send_chunks(self, req: _Request, reply: _Chunks) -> None:
        """Head without a length, then each chunk as it comes; the close ends the body."""
        req.close = True
        try:
            self.write(self.head(req, reply.status, reply.content_type, reply.headers, None))
            for chunk in reply.chunks:
                if chunk:
                    self.write(chunk)
        finally:
            close = getattr(reply.chunks, "close", None)
            if close is not None:
                close()

    def linger(self) -> None:
        """Before closing after an error, discard briefly what the client still
        sends (at most 1 MiB, 1 s): closing with unread data makes the kernel
        send a RST, which can destroy the answer before the client reads it."""
        deadline = time.monotonic() + 1.0
        budget = 1024 * 1024
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while budget > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.connection.recv(65536)
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads requests strictly (api.md §10), finds the route, authenticates,
    calls the endpoint, and answers every request, errors included, with JSON
    in one write, or hands the connection to a stream. Knows no endpoint."""

    protocol_version = "HTTP/1.1"
    server_version = "hopx-agent/" + __version__
    sys_version = ""
    server: "_AgentServer"

    # -- connection set-up ------------------------------------------------------

    again = False                        # finish() found the next request on the connection: serve it

    def setup(self) -> None:
        self._conn: _Conn = self.request
        self.connection = self._conn.sock
        self._stream = False             # the request became a stream (or a long wait): see _become_stream
        try:
            # Headers and body go out in one write anyway; this also covers the
            # 100-continue interim answer (no 40 ms Nagle/delayed-ACK stalls).
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._reader = _DeadlineReader(self.connection)
        self.out = _ResponseWriter(self.connection, self.server_version, self.date_time_string)
        self.rfile = _ConnReader(self._reader, bytes(self._conn.buf))
        self._conn.buf = bytearray()

    def handle(self) -> None:
        self.handle_one_request()        # one request; the hub holds the connection between requests

    def finish(self) -> None:
        """Give a kept-alive connection back to the hub (with what was read of
        the next request), or close it."""
        hub, conn = self.server.hub, self._conn
        if not self.close_connection:
            conn.buf = bytearray(self.rfile.leftover())
            conn.head_since = time.monotonic() if conn.buf else None   # the next request's clock, not this one's
            if not self._stream and hub.may_linger() and _await_next_head(conn, KEEPALIVE_LINGER_S):
                self.again = True        # the next request is here: served on this thread, not via the hub
                return
            hub.give_back(conn, stream=self._stream)
            return
        self.rfile.close()
        _close_socket(self.connection)
        hub.closed(conn, stream=self._stream)

    def _become_stream(self, *, capped: bool) -> bool:
        """This request will hold its connection for long (a stream, a transfer,
        a long wait): it leaves the request slots. False over MAX_STREAMS."""
        if not self._stream:
            self._stream = self.server.hub.to_stream(self._conn, capped=capped)
        return self._stream

    def log_message(self, format: str, *args: Any) -> None:  # http.server's stderr logging, silenced
        log.debug("http: " + format, *args)

    # -- one request ------------------------------------------------------------

    def handle_one_request(self) -> None:
        self.close_connection = True
        started = self._conn.head_since or time.monotonic()   # the request deadline runs from its first byte
        self._reader.deadline = started + self.server.config.request_deadline
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
            skipped = 0
            while line in (b"\r\n", b"\n") and skipped < 4:   # RFC 9112 §2.2: tolerate stray CRLF
                line, skipped = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1), skipped + 1
        except (OSError, ValueError):
            return
        if not line:
            return
        req = _Request()
        req.client_gone = self._client_gone
        req.long_wait = functools.partial(self._become_stream, capped=False)
        try:
            status = self._answer(req, self._respond(req, line))
        except _ClientGone:
            return
        self.server.metrics.observe(req.route, status)
        if req.close and status >= 400:
            self.out.linger()
        log.debug("%s %s %s -> %d in %.1f ms", self.client_address[0], req.method,
                  req.path + ("?" + ",".join(sorted(req.query)) if req.query else ""),   # names only: no token
                  status, (time.monotonic() - started) * 1000)
        self.close_connection = req.close

    def _respond(self, req: _Request, line: bytes) -> Any:
        """The one error boundary: every outcome becomes a _Reply, or the
        stream answer (_SendFile, _Chunks, _Upgrade) an endpoint returned."""
        try:
            _parse_head(self.rfile, req, line)
            result = self._dispatch(req)
            if isinstance(result, (_Reply, _SendFile, _Chunks, _Upgrade)):
                return result
            return _Reply(200, _json_bytes(result))
        except AgentError as exc:
            self._drain_body(req)
            # Unread body bytes would be taken for the next request: close instead.
            if exc.status >= 500 or exc.status in (408, 413, 414, 431) or not req.body_read:
                req.close = True
            return self._error_reply(req, exc)
        except socket.timeout:
            req.close = True
            return self._error_reply(req, AgentError("request not received in time", status=408,
                                                     code="INVALID_REQUEST"))
        except (_ClientGone, ConnectionError):
            raise _ClientGone() from None
        except Exception:
            log.exception("internal error on %s %s", req.method, req.path)
            req.close = True
            return self._error_reply(req, AgentError("internal error"))

    @staticmethod
    def _discard(result: Any) -> None:
        """Release what an answer that will not be sent holds (a file, a generator)."""
        if isinstance(result, _SendFile):
            result.file.close()
        elif isinstance(result, _Chunks) and hasattr(result.chunks, "close"):
            result.chunks.close()
        elif isinstance(result, _Upgrade) and result.on_refused is not None:
            result.on_refused()

    def _error_reply(self, req: _Request, exc: AgentError) -> _Reply:
        return _Reply(exc.status, _json_bytes(exc.to_json(request_id=req.request_id, path=req.path)),
                      headers=exc.headers)

    def _answer(self, req: _Request, result: Any) -> int:
        """Write what _respond decided; returns the status for the metrics."""
        if not isinstance(result, _Reply) and not self._become_stream(capped=True):
            self._discard(result)
            req.close = True
            result = self._error_reply(req, Unavailable("too many open streams (max %d)" % MAX_STREAMS))
        if isinstance(result, _Reply):
            self.out.send(req, result.status, result.body, result.content_type, result.headers)
            return result.status
        try:
            if isinstance(result, _SendFile):
                self.out.send_file(req, result)
            elif isinstance(result, _Chunks):
                self._reader.deadline = None
                self.out.send_chunks(req, result)
            else:
                self._run_websocket(req, result)
        except _ClientGone:
            raise
        except Exception:     # the head is out: nothing to answer, only to log and close
            log.exception("streaming the answer to %s %s failed", req.method, req.path)
            req.close = True
        return 101 if isinstance(result, _Upgrade) else result.status

    def _read_body(self, req: _Request, length: int) -> None:
        if not length:
            req.body_read = True
            return
        if (req.header("expect") or "").lower() == "100-continue":
            self.out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        if len(body) < length:
            raise _ClientGone()
        req.body = body
        req.body_read = True

    def _body_chunks(self, req: _Request, size: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """A streamed body in chunks, each read within TRANSFER_IDLE_S of the last."""
        if req.body_read:
            return
        if req.body_left is None:           # the first read of this body
            if (req.header("expect") or "").lower() == "100-continue":
                self.out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.body_left = req.content_length
        while req.body_left:
            self._reader.deadline = time.monotonic() + TRANSFER_IDLE_S
            data = self.rfile.read1(min(size, req.body_left))
            if not data:
                raise _ClientGone()
            req.body_left -= len(data)
            yield data
        req.body_read = True

    def _drain_body(self, req: _Request) -> None:
        """After an error in the middle of a streamed body (a full disk): read
        and discard the rest, up to ERROR_DRAIN_BYTES, so the client, still
        sending, reads the answer instead of a reset and the connection lives on."""
        if req.body_left is None or req.body_read or req.body_left > ERROR_DRAIN_BYTES:
            return
        try:
            for _ in self._body_chunks(req):
                pass
        except (OSError, _ClientGone):
            pass

    # -- routing ----------------------------------------------------------------

    def _dispatch(self, req: _Request) -> Any:
        """Route, authenticate, read the body, call the endpoint; 404/405 on no match."""
        method = "GET" if req.method == "HEAD" else req.method
        parts = req.path.split("/")
        matches = [(route, found) for route, found in
                   ((route, _match_route(route.segments, parts)) for route in self.server.routes_for(parts))
                   if found is not None]
        chosen = next((m for m in matches if m[0].method == method), None)
        streaming = chosen is not None and chosen[0].body == "stream"
        req.content_length = length = _content_length(req, None if streaming else MAX_BODY_BYTES)
        if not length:
            req.body_read = True
        if not self.server.config.auth:
            _check_local_request(req, self.server, chosen[0] if chosen else None, length)
        if not matches or all(route.auth is True for route, _ in matches):
            self._authenticate(req)
        elif chosen is not None and chosen[0].auth == "optional":
            self._authenticate_optional(req)
        if streaming:
            if not self._become_stream(capped=True):
                raise Unavailable("too many open streams (max %d)" % MAX_STREAMS)
            req.read_body = functools.partial(self._body_chunks, req)
        else:
            self._read_body(req, length)
        if chosen is None:
            if matches:
                allowed = sorted({r.method for r, _ in matches} | ({"HEAD"} if any(r.method == "GET" for r, _ in matches) else set()))
                raise AgentError("method %s not allowed on %s" % (req.method, req.path), status=405,
                                 code="METHOD_NOT_ALLOWED", headers={"Allow": ", ".join(allowed)})
            raise NotFound("no such endpoint: %s" % req.path)
        route, found = chosen
        if (req.header("upgrade") or "").lower() == "websocket" and not route.websocket:
            raise BadRequest("WebSocket upgrades are offered on %s only" % ", ".join(
                r.pattern for r in self.server.routes if r.websocket))
        accept = _websocket_accept(req) if route.websocket else None
        req.route = route.pattern
        params = {k: urllib.parse.unquote(v) for k, v in found.items()}
        result = route.fn(self.server, req, **params)
        if isinstance(result, _Upgrade):
            result.accept = accept
        return result

    def _authenticate(self, req: _Request) -> None:
        config = self.server.config
        if not config.auth:
            return
        value = req.header("authorization")
        if not value or not value.strip():
            raise AuthError("authentication required: send Authorization: Bearer <token>",
                            code="AUTHENTICATION_REQUIRED")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("invalid token: expected the Bearer scheme")
        req.claims = verify_jwt(token.strip(), config.secret or b"", algorithms=config.algorithms,
                                leeway=config.leeway, audience=config.audience, issuer=config.issuer)

    def _authenticate_optional(self, req: _Request) -> None:
        """A route that answers everyone but tells more with a valid token:
        ``req.claims`` is set when the token is valid (or auth is off), else None."""
        if not self.server.config.auth:
            req.claims = {}
            return
        try:
            self._authenticate(req)
        except AuthError:
            req.claims = None

    # -- writing ----------------------------------------------------------------

    def _run_websocket(self, req: _Request, reply: _Upgrade) -> None:
        """101, then the endpoint's session on this thread; the connection closes after it."""
        req.close = True
        self.out.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\nX-Request-ID: %s\r\n\r\n"
                     % (reply.accept, req.request_id)).encode("latin-1"))
        ws = _WebSocket(self.connection, self.rfile, self._reader)
        try:
            reply.session(ws)
        except (_WsClosed, OSError, _ClientGone):
            pass
        except Exception:
            log.exception("WebSocket session on %s failed", req.path)
            try:
                ws.close(1011, "internal error")
            except (_WsClosed, OSError):
                pass
        finally:
            ws.finish()

    # -- waiting while watching the client ----------------------------------------

    def _client_gone(self) -> bool:
        """True when the client has closed its side (EOF readable on the socket)."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(0):
                return False
            self.connection.settimeout(0)
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class _AgentServer(http.server.ThreadingHTTPServer):
    """The HTTP server: holds the agent's state (the config, the process
    manager, the metrics, the routes and each family's object) and the hub,
    the accept loop that serve_forever() runs."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, config: AgentConfig, manager: ProcessManager, routes: Iterable[_Route],
                 sock: Optional[socket.socket] = None) -> None:
        self.config = config
        self.manager = manager
        self.metrics = _Metrics()
        self.routes: Tuple[_Route, ...] = tuple(routes)
        self._routes_by_head: Dict[str, List[_Route]] = {}    # first path segment -> its routes, in order
        self._languages = _Recent(_languages_installed, LANGUAGES_CACHE_S)
        for route in self.routes:
            self._routes_by_head.setdefault(route.segments[1], []).append(route)
        # Each family's state: .features() for /health and /info, .close(deadline) at the end.
        self.families: List[Any] = []
        self.contexts: Any = None           # the contexts family (_ContextManager), made by create_server
        self.accepting: Optional[threading.Thread] = None   # the thread in serve_forever()
        self.upgrader: Optional[Any] = None   # durability: an _Upgrader when the CLI agent can upgrade in place
        if sock is None:
            super().__init__((config.host, config.port), _Handler)
        else:                             # the listening socket an upgraded agent inherited
            super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        self.hub = _Hub(self)

    def languages(self) -> Dict[str, Dict[str, Any]]:
        return self._languages.get()

    def routes_for(self, parts: List[str]) -> List[_Route]:
        """The routes a path split on "/" may match: those with its first segment
        (every pattern starts with a literal one)."""
        return self._routes_by_head.get(parts[1] if len(parts) > 1 else "", [])

    def start_accepting(self) -> None:
        """serve_forever() on a thread of its own (again, after a refused upgrade)."""
        self.accepting = threading.Thread(target=self.serve_forever, name="hopx-http-accept", daemon=True)
        self.accepting.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and serve until shutdown() (as socketserver's, on the hub)."""
        self.hub.run(self.socket, poll_interval)

    def shutdown(self) -> None:
        """Stop accepting and close the connections waiting in the hub; requests
        under way finish on their threads."""
        self.hub.stop()

    def server_close(self) -> None:
        """Close the listening socket, then each family's state (watchers and
        other sessions are woken and end; kernels and shells are killed), within one
        shared deadline."""
        super().server_close()
        self.hub.close()
        deadline = time.monotonic() + max(5.0, self.config.kill_grace + 2.0)
        for family in self.families:
            try:
                family.close(deadline)
            except Exception:
                log.exception("closing %s failed", type(family).__name__)

    def handle_connection(self, conn: _Conn) -> None:
        """On a request thread: one request on ``conn`` (the handler gives the
        connection back to the hub or closes it)."""
        try:
            while self.RequestHandlerClass(conn, conn.addr, self).again:
                pass
        except Exception:
            self.handle_error(conn.sock, conn.addr)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)



class _AgentServer6(_AgentServer):
    address_family = socket.AF_INET6


# ============================================================================
# Endpoints: system (health, information, the machine, caches, desktop)
# ============================================================================

# What the execution family serves; each family adds its own (api.md §15:
# every boolean is true exactly when that family answers).
_BASE_FEATURES = {"code_execution": True, "background_jobs": True, "websocket_streaming": True,
                  "system_metrics": True, "file_operations": False, "terminal_access": False,
                  "rich_output": False, "ipython_kernel": False,
                  "background": True, "sync": True, "async_webhooks": True, "commands": True,
                  "sse_stream": True, "websocket_stream": True, "stdin": True, "signals": True,
                  "idempotency_keys": True, "idle_timeout": True}
_DESKTOP_PROGRAMS = (("xvfb", "Xvfb"), ("xdotool", "xdotool"), ("tigervnc-standalone-server", "Xvnc"),
                     ("wmctrl", "wmctrl"), ("imagemagick", "convert"))


def _features(srv: "_AgentServer") -> Dict[str, Any]:
    """The same map in /health and /info."""
    features: Dict[str, Any] = dict(_BASE_FEATURES)
    features["resource_limits"] = srv.manager.limits.features()

    for family in srv.families:
        features.update(family.features())
    features["languages"] = [name for name, spec in srv.languages().items() if spec["available"]]
    return features


def _health(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return {"status": "healthy", "version": __version__, "uptime": srv.metrics.uptime,
            "features": _features(srv), "timestamp": _rfc3339(time.time())}


def _ping(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return {"message": "pong", "timestamp": _rfc3339(time.time())}


def _endpoint_map(srv: "_AgentServer") -> Dict[str, str]:
    return {"%s %s" % (route.method, route.pattern): route.fn.__name__.strip("_") for route in srv.routes}


def _info(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """Without a valid token: name, version, features, languages and the endpoint
    map; with one, also the machine, paths and limits."""
    languages = srv.languages()
    if req.claims is None:
        return {"agent": "hopx_agent", "version": __version__, "agent_version": __version__,
                "supported_languages": [name for name, spec in languages.items() if spec["available"]],
                "features": _features(srv), "endpoints": _endpoint_map(srv), "timestamp": _rfc3339(time.time())}
    import platform  # only /info needs it
    config = srv.config
    return {"agent": "hopx_agent", "version": __version__, "agent_version": __version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "os": platform.system().lower(), "arch": platform.machine(),
            "hostname": socket.gethostname(), "uptime": srv.metrics.uptime,
            "workdir": config.workdir, "auth": "jwt" if config.auth else "disabled",
            "languages": languages,
            "supported_languages": [name for name, spec in languages.items() if spec["available"]],
            "limits": config.limits(), "start_time": _rfc3339(srv.metrics.started),
            "features": _features(srv), "endpoints": _endpoint_map(srv),
            "durability": _durability_info(srv), "timestamp": _rfc3339(time.time())}


def _root(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """GET /: name, version and the endpoint map, keyed by a name for each route."""
    endpoints: Dict[str, str] = {}
    for route in srv.routes:
        name = route.fn.__name__.strip("_")
        if name in endpoints:     # one function on several routes: name the others by their path
            name = re.sub(r"[{}]", "", route.pattern.strip("/")).replace("/", "_") or "root"
            if name in endpoints:
                name += "_" + route.method.lower()
        endpoints[name] = "%s %s" % (route.method, route.pattern)
    return {"name": "hopx_agent", "agent": "hopx_agent", "version": __version__,
            "endpoints": endpoints, "timestamp": _rfc3339(time.time())}


def _system_usage() -> Dict[str, Any]:
    """Load and memory of the machine, from /proc where it exists."""
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    memory: Dict[str, Any] = {}
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh if len(line.split()) >= 2}
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
        memory = {"total_mb": round(total / 1024, 1), "available_mb": round(available / 1024, 1),
                  "usage_percent": round(100.0 * (total - available) / total, 1) if total else 0.0}
    except (OSError, ValueError):
        pass
    return {"cpu": {"count": cpus, "load_1m": load, "usage_percent": round(min(100.0, 100.0 * load / cpus), 1)},
            "memory": memory}


def _memory_limit_mb() -> Optional[float]:
    """The memory limit of our own cgroup (v2 memory.max, v1 memory.limit_in_bytes), if any."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    candidates = []
    for _, controllers, path in (parts for parts in lines if len(parts) == 3):
        if controllers == "":
            candidates.append("/sys/fs/cgroup%s/memory.max" % path.rstrip("/"))
        elif "memory" in controllers.split(","):
            candidates.append("/sys/fs/cgroup/memory%s/memory.limit_in_bytes" % path.rstrip("/"))
    for candidate in candidates:
        try:
            with open(candidate) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if _is_digits(value) and int(value) < 1 << 60:    # v1 says "unlimited" with a huge number
            return int(value) / (1024 * 1024)
    return None


def _hardware(workdir: str) -> Dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh
                          if line.lower().startswith(("model name", "hardware", "cpu model"))), "")
    except OSError:
        pass
    memory_mb = _system_usage()["memory"].get("total_mb")
    limit = _memory_limit_mb()
    if limit is not None and (memory_mb is None or limit < memory_mb):
        memory_mb = round(limit, 1)
    try:
        disk = shutil.disk_usage(workdir)
        disk_mb, free_mb = round(disk.total / (1024 * 1024), 1), round(disk.free / (1024 * 1024), 1)
    except OSError:
        disk_mb = free_mb = None
    return {"cpu_cores": os.cpu_count() or 1, "cpu_model": model, "memory_mb": memory_mb,
            "machine_memory_mb": _system_usage()["memory"].get("total_mb"),
            "disk_mb": disk_mb, "disk_free_mb": free_mb}


def _network(detailed: bool) -> Dict[str, Any]:
    """Interface names; with a token, also the host name and IPv4 addresses."""
    try:
        names = sorted(name for _, name in socket.if_nameindex())
    except (OSError, AttributeError):
        names = []
    if not detailed:
        return {"interfaces": [{"name": name} for name in names]}
    interfaces = []
    for name in names:
        entry: Dict[str, Any] = {"name": name, "ipv4": None}
        try:
            import fcntl
            import struct
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            entry["ipv4"] = socket.inet_ntoa(packed[20:24])
        except (OSError, ImportError):
            pass
        interfaces.append(entry)
    return {"hostname": socket.gethostname(), "interfaces": interfaces}


def _system(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """GET /system: the machine as the agent sees it (a token adds addresses and paths)."""
    import platform
    detailed = req.claims is not None
    features = _features(srv)
    return {"os": {"name": platform.system().lower(), "release": platform.release(),
                   "arch": platform.machine(), "python": platform.python_version()},
            "hardware": _hardware(srv.config.workdir), "network": _network(detailed),
            "capabilities": {name: value for name, value in features.items()},
            "uptime": srv.metrics.uptime, "timestamp": _rfc3339(time.time())}


def _cache_stats(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return dict(srv.manager.registry.cache.stats(), timestamp=_rfc3339(time.time()))


def _cache_clear(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return dict(srv.manager.registry.cache.clear(), timestamp=_rfc3339(time.time()))


def _desktop(srv: "_AgentServer", req: _Request, action: str) -> Any:
    """/desktop/*: this agent has no desktop; the SDK turns this 501 into DesktopNotAvailableError."""
    missing = [package for package, program in _DESKTOP_PROGRAMS if shutil.which(program) is None]
    raise AgentError("desktop automation is not available: hopx_agent does not serve /desktop/%s" % action,
                     status=501, code="DESKTOP_NOT_AVAILABLE",
                     details={"missing_dependencies": missing, "endpoint": "/desktop/" + action})


_SYSTEM_ROUTES = (
    _route("GET", "/health", _health, auth=False),
    _route("GET", "/ping", _ping, auth=False),
    _route("GET", "/info", _info, auth="optional"),
    _route("GET", "/", _root, auth=False),
    _route("GET", "/system", _system, auth="optional"),
    _route("GET", "/cache/stats", _cache_stats),
    _route("POST", "/cache/clear", _cache_clear),
    _route("GET", "/desktop/{action*}", _desktop),
    _route("POST", "/desktop/{action*}", _desktop),
)

# ============================================================================
# Endpoints: execution and processes (start, run, list, read, kill, stdin, streams)
# ============================================================================

STREAM_EVENT_BYTES = 64 * 1024        # output per event at most, so a big backlog comes in pieces


def _parse_event_id(value: str) -> Dict[str, Optional[int]]:
    """A Last-Event-ID of ours: "<stdout offset>:<stderr offset>"."""
    parts = value.strip().split(":")
    if len(parts) != 2 or not all(_is_digits(p) and len(p) <= 18 for p in parts):
        raise BadRequest("Last-Event-ID must be <stdout offset>:<stderr offset>")
    return {"stdout": int(parts[0]), "stderr": int(parts[1])}


class _Follower:
    """Follows one record's output from given offsets. Woken by the record's
    condition when output arrives (no polling); many followers share the one
    buffer, so they cost no extra reads of the pipes."""

    def __init__(self, rec: _ProcessRecord, offsets: Dict[str, Optional[int]]) -> None:
        self.rec = rec
        with rec.cond:
            self.offsets = {name: rec.stream(name).dropped if offsets.get(name) is None else offsets[name]
                            for name in ("stdout", "stderr")}

    def event_id(self) -> str:
        return "%d:%d" % (self.offsets["stdout"], self.offsets["stderr"])

    def _pending(self) -> bool:
        rec = self.rec
        return rec.finished or any(rec.stream(n).end(False) > off or rec.stream(n).dropped > off
                                   for n, off in self.offsets.items())

    def next(self, timeout: float) -> Tuple[List[Tuple[str, Dict[str, Any], str]], Optional[Dict[str, Any]]]:
        """Wait up to ``timeout`` for news; returns (events, final record or None).

        Each event is (kind, payload, id), the id naming the offsets just
        after that event, so a client resuming from it misses nothing. The
        final record comes once the record is finished and every byte before
        its end has been handed out.
        """
        rec = self.rec
        events: List[Tuple[str, Dict[str, Any], str]] = []
        with rec.cond:
            with _waiting_for_output(rec, self.offsets):    # the cursor's own offsets, as it moves them
                rec.cond.wait_for(self._pending, timeout)
            final = rec.finished
            for name in ("stdout", "stderr"):
                buf = rec.stream(name)
                if self.offsets[name] < buf.dropped:   # fell out of the window: say so, never skip silently
                    gap = {"stream": name, "offset": self.offsets[name], "bytes": buf.dropped - self.offsets[name]}
                    self.offsets[name] = buf.dropped
                    events.append(("dropped", gap, self.event_id()))
                text, start, stop = buf.read(self.offsets[name], final, STREAM_EVENT_BYTES)
                if stop > start:
                    self.offsets[name] = stop
                    events.append((name, {"data": text, "offset": start}, self.event_id()))
            done = final and all(self.offsets[n] >= rec.stream(n).total for n in self.offsets)
            record = rec.to_json(output=False) if done else None
        return events, record


# -- starting -----------------------------------------------------------------


# -- endpoints: execution ---------------------------------------------------------


def _code_launch(srv: "_AgentServer", body: Dict[str, Any], default_timeout: float, max_timeout: float,
                 *, pty_ok: bool = False) -> _Launch:
    code = _required_text(body, "code", nul_ok=True)
    limits, user = srv.manager.limits.resolve(body)     # api.md §14: 400 before anything is written
    return srv.manager.code_launch(
        code, body.get("language"),
        cwd=_workdir(body), env=_env_map(body.get("env"), "env"),
        timeout=_timeout(body, default_timeout, max_timeout),
        name=_opt_text(body, "name", max_chars=MAX_NAME_CHARS), stdin=_flag(body, "stdin"),
        idle_timeout=_idle_timeout(body), pty=_pty_field(body, pty_ok), limits=limits, user=user)


def _command_launch(srv: "_AgentServer", body: Dict[str, Any], default_timeout: float, max_timeout: float,
                    *, pty_ok: bool = False) -> _Launch:
    command = _required_text(body, "command")
    args = body.get("args")
    if args is not None:
        if not isinstance(args, list):
            raise BadRequest("field 'args' must be an array of strings")
        args = [_text(arg, "args") for arg in args]
    elif not command.strip():
        raise BadRequest("field 'command' must not be empty", code="MISSING_PARAMETER")
    limits, user = srv.manager.limits.resolve(body)
    return srv.manager.command_launch(
        command, args, cwd=_workdir(body), env=_env_map(body.get("env"), "env"),
        timeout=_timeout(body, default_timeout, max_timeout),
        name=_opt_text(body, "name", max_chars=MAX_NAME_CHARS), stdin=_flag(body, "stdin"),
        idle_timeout=_idle_timeout(body), pty=_pty_field(body, pty_ok), limits=limits, user=user)


def _started(srv: "_AgentServer", rec: _ProcessRecord) -> Dict[str, Any]:
    """The answer to every background start."""
    record = srv.manager.describe(rec, output=False)
    answer = {key: record.get(key) for key in ("process_id", "execution_id", "status", "name",
                                               "kind", "pid", "started_at", "start_time",
                                               "created_at", "timeout")}
    if "queue_position" in record:
        answer["queue_position"] = record["queue_position"]
    if record["status"] in _FINAL_STATUSES:   # it could not start: say why at once
        answer.update(reason=record["reason"], exit_code=record["exit_code"], error=record.get("error"))
    return answer


def _once(srv: "_AgentServer", req: _Request, start: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """A start honouring the Idempotency-Key header, when there is one."""
    key = req.header("idempotency-key")
    if key is None:
        return start()
    if not 0 < len(key) <= 255 or not key.isprintable():
        raise BadRequest("Idempotency-Key must be 1 to 255 printable characters")
    digest = hashlib.sha256(req.path.encode() + b"\0" + req.body).hexdigest()
    return srv.manager.idempotent_start(key, digest, start)


def _execute_background(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    def start() -> Dict[str, Any]:
        launch = _code_launch(srv, req.json(), BACKGROUND_TIMEOUT_S, MAX_BACKGROUND_TIMEOUT_S, pty_ok=True)
        return _started(srv, srv.manager.start(launch))
    return _once(srv, req, start)


def _commands_background(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    def start() -> Dict[str, Any]:
        launch = _command_launch(srv, req.json(), BACKGROUND_TIMEOUT_S, MAX_BACKGROUND_TIMEOUT_S, pty_ok=True)
        return _started(srv, srv.manager.start(launch))
    return _once(srv, req, start)


def _execute_async(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return _once(srv, req, lambda: _start_async(srv, req))


_RESERVED_CALLBACK_HEADERS = ("host", "content-length", "content-type", "transfer-encoding", "connection",
                              "x-hopx-timestamp", "x-hopx-signature")


def _start_async(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    body = req.json()
    url = _required_text(body, "callback_url")
    try:
        split = urllib.parse.urlsplit(url)
        valid = url.isascii() and split.scheme in ("http", "https") and bool(split.hostname)
        split.port      # raises ValueError for a port out of range or not a number
        if valid and "[" in split.netloc:   # older Pythons let "[x]" through: check it here
            import ipaddress
            valid = ipaddress.ip_address(split.hostname or "").version == 6
    except ValueError:      # an unclosed bracket, a bad IPv6 literal, a bad port
        valid = False
    if not valid:
        raise BadRequest("callback_url must be an http or https URL")
    headers = _env_map(body.get("callback_headers"), "callback_headers")
    if any("\r" in k + v or "\n" in k + v for k, v in headers.items()):
        raise BadRequest("callback_headers must not contain line breaks")
    reserved = sorted(k for k in headers if k.lower() in _RESERVED_CALLBACK_HEADERS)
    if reserved:
        raise BadRequest("callback_headers may not set %s: the agent sets those" % ", ".join(reserved))
    secret = _opt_text(body, "callback_signature_secret")
    launch = _code_launch(srv, body, ASYNC_TIMEOUT_S, MAX_BACKGROUND_TIMEOUT_S, pty_ok=True)
    manager = srv.manager
    rec = manager.start(launch, on_finish=[_Webhook(manager, url, headers, secret)])
    answer = _started(srv, rec)
    answer.update(status="queued", process_status=answer["status"], callback_url=url)
    return answer


def _wait_final(srv: "_AgentServer", req: _Request, rec: _ProcessRecord) -> None:
    """Wait for a synchronous run; if the client goes away, end the process.
    Its timeout also counts while it waits in the queue."""
    manager = srv.manager
    deadline = time.monotonic() + rec.launch.timeout
    if not manager.wait(rec, 0.05):
        req.long_wait()
    while not manager.wait(rec, 0.25):
        if req.client_gone():
            manager.kill(rec.id, wait=False)
            raise _ClientGone()
        if time.monotonic() > deadline:
            manager.time_out(rec)


def _run_and_wait(srv: "_AgentServer", req: _Request, launch: _Launch) -> Tuple[_ProcessRecord, Dict[str, Any]]:
    rec = srv.manager.start(launch)
    _wait_final(srv, req, rec)
    with rec.cond:
        final = rec.finished
        record = rec.to_json()
    if not final:   # not reached: _wait_final returns only when final
        raise AgentError("process did not finish")
    result = {"success": record["status"] == "completed", "stdout": record["stdout"],
              "stderr": record["stderr"], "exit_code": record["exit_code"],
              "execution_time": record["execution_time"], "timestamp": _rfc3339(time.time()),
              "timed_out": record["reason"] == "timeout"}
    for key in ("process_id", "execution_id", "status", "reason", "signal", "pid", "stdout_bytes",
                "stderr_bytes", "stdout_dropped", "stderr_dropped", "error", "cpu_user_s", "cpu_system_s",
                "max_rss_kb", "memory_peak_mb", "oom_kills", "limits", "user"):

        if key in record:
            result[key] = record[key]
    return rec, result


def _execute_process(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """A synchronous run of code as a process of its own (what /execute does
    with "isolated": true, for languages other than Python, or with --python-kernel off)."""
    rec, result = _run_and_wait(srv, req, _code_launch(srv, req.json(), SYNC_TIMEOUT_S, MAX_SYNC_TIMEOUT_S))
    result["language"] = rec.launch.language
    return result


def _commands_run(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    rec, result = _run_and_wait(srv, req,
        _command_launch(srv, req.json(), SYNC_TIMEOUT_S, MAX_SYNC_TIMEOUT_S))
    result["command"] = rec.launch.command
    return result


# -- endpoints: watching and ending processes -----------------------------------------


def _list_processes(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    statuses = [s.strip() for value in req.query.get("status", []) for s in value.split(",") if s.strip()]
    unknown = [s for s in statuses if s not in _STATUSES]
    if unknown:
        raise BadRequest("unknown status %r; use one of %s" % (unknown[0], ", ".join(_STATUSES)))
    records = srv.manager.list_json(statuses=statuses or None, name=req.param("name"),
                                    output=_query_flag(req, "output", True))
    parts: List[bytes] = [b'{"processes":[']
    for n, record in enumerate(records):
        parts.extend((b",", record) if n else (record,))
    parts.append(b'],"count":%d,"timestamp":"%s"}' % (len(records), (_rfc3339(time.time()) or "").encode("ascii")))
    return _Reply(200, parts)     # the records' cached bytes, never joined into one more copy


def _get_process(srv: "_AgentServer", req: _Request, process_id: str) -> Dict[str, Any]:
    manager = srv.manager
    rec = manager.get(process_id)
    offsets = {"stdout": _query_offset(req, "stdout_offset"), "stderr": _query_offset(req, "stderr_offset")}
    given = offsets if any(v is not None for v in offsets.values()) else None
    wait = req.param("wait")
    if wait:
        try:
            seconds = float(wait)
        except ValueError:
            raise BadRequest("query parameter 'wait' must be a number of seconds") from None
        if not 0 <= seconds <= MAX_WAIT_S:
            raise BadRequest("query parameter 'wait' must be between 0 and %g" % MAX_WAIT_S)
        if seconds > 0:
            req.long_wait()
        manager.wait_for_output(rec, offsets, seconds)
    return manager.describe(rec, output=_query_flag(req, "output", True), offsets=given)


def _kill(srv: "_AgentServer", req: _Request, process_id: Optional[str] = None) -> Dict[str, Any]:
    body = req.json() if req.body else {}
    process_id = process_id or req.param("process_id") or body.get("process_id")
    if not process_id:
        raise BadRequest("missing required field 'process_id'", code="MISSING_PARAMETER")
    if not isinstance(process_id, str):
        raise BadRequest("field 'process_id' must be a string")
    sig = body.get("signal", req.param("signal"))
    return srv.manager.kill(process_id, None if sig is None else _parse_signal(sig))


def _signal(srv: "_AgentServer", req: _Request, process_id: str) -> Dict[str, Any]:
    sig = req.json().get("signal", req.param("signal"))
    if sig is None:
        raise BadRequest("missing required field 'signal'", code="MISSING_PARAMETER")
    return srv.manager.send_signal(process_id, _parse_signal(sig))


def _stdin(srv: "_AgentServer", req: _Request, process_id: str) -> Dict[str, Any]:
    body = req.json()
    eof = _flag(body, "eof")
    if body.get("data") is not None and body.get("data_base64") is not None:
        raise BadRequest("send either 'data' or 'data_base64', not both")
    if body.get("data_base64") is not None:
        try:
            data = base64.b64decode(_text(body["data_base64"], "data_base64"), validate=True)
        except ValueError:
            raise BadRequest("field 'data_base64' is not valid base64") from None
    elif body.get("data") is not None:
        data = _text(body["data"], "data", nul_ok=True).encode("utf-8")
    elif eof:
        data = b""
    else:
        raise BadRequest("missing required field 'data' (or 'data_base64', or eof: true)",
                         code="MISSING_PARAMETER")
    return srv.manager.write_stdin(process_id, data, eof)


def _stream_sse(srv: "_AgentServer", req: _Request, process_id: str) -> _Chunks:
    """Server-Sent Events: stdout/stderr/dropped events from the given
    offsets (or Last-Event-ID), a heartbeat comment when quiet, then exit."""
    rec = srv.manager.get(process_id)
    offsets = {"stdout": _query_offset(req, "stdout_offset"), "stderr": _query_offset(req, "stderr_offset")}
    if req.header("last-event-id"):
        offsets = _parse_event_id(req.header("last-event-id") or "")
    follower = _Follower(rec, offsets)

    def events() -> Iterator[bytes]:
        yield b"retry: 1000\n\n"
        while True:
            batch, record = follower.next(SSE_HEARTBEAT_S)
            out = [_sse_event(kind, payload, event_id) for kind, payload, event_id in batch]
            if record is not None:
                out.append(_sse_event("exit", record, follower.event_id()))
            yield "".join(out).encode("utf-8") if out else _SSE_HEARTBEAT
            if record is not None:
                return
    return _Chunks(events(), content_type="text/event-stream; charset=utf-8", headers=dict(_SSE_HEADERS))


def _ws_first_message(srv: "_AgentServer", ws: _WebSocket) -> Optional[Dict[str, Any]]:
    """The execute message that opens a session, or None (the client was told why)."""
    try:
        opcode, message = ws.recv_message(srv.config.request_deadline)
    except socket.timeout:
        ws.fail(1008, "no execute message received in time")
        return None
    try:
        body = _json_object(message) if opcode == _WS_TEXT else None
        if body is None or body.get("type", "execute") != "execute":
            raise BadRequest('the first message must be {"type": "execute", "code": ...}')
        return body
    except (ValueError, RecursionError) as exc:
        ws.error(1008, "invalid JSON message: %s" % _short(exc), "INVALID_JSON")
    except AgentError as exc:
        ws.error(1008 if exc.status < 500 else 1011, exc.message, exc.code)
    return None


def _ws_run_process(srv: "_AgentServer", ws: _WebSocket, body: Dict[str, Any]) -> None:
    """The execution as a process of its own, its output sent as it comes."""
    try:
        launch = _code_launch(srv, body, SYNC_TIMEOUT_S, MAX_BACKGROUND_TIMEOUT_S)
        rec = srv.manager.start(launch)
    except AgentError as exc:
        ws.error(1008 if exc.status < 500 else 1011, exc.message, exc.code)
        return

    def gone() -> None:       # a client that goes away ends its execution
        if not rec.finished:
            srv.manager.kill(rec.id, wait=False)
        with rec.cond:
            rec.cond.notify_all()        # wake the session so it sees ``gone``
    ws.start_reader("hopx-ws-%s" % rec.id[5:13], gone)
    _ws_follow(ws, rec)


def _ws_send_output(ws: _WebSocket, stream: str, data: str) -> None:
    """One piece of output as the HopX documentation names it (``stdout``/``stderr``),
    then as ``output`` with its ``stream``, the name other HopX clients read
    (the async SDK's own tests); a client handles one name or the other."""
    stamp = _rfc3339(time.time())
    ws.send_json({"type": stream, "data": data, "timestamp": stamp})
    ws.send_json({"type": "output", "stream": stream, "data": data, "timestamp": stamp})


def _ws_follow(ws: _WebSocket, rec: _ProcessRecord) -> None:
    """Send a record's output as it comes, then its result, then close."""
    follower = _Follower(rec, {"stdout": None, "stderr": None})
    while True:
        events, record = follower.next(SSE_HEARTBEAT_S)
        if ws.gone:
            return
        for kind, payload, _ in events:
            if kind == "dropped":
                ws.send_json(dict(payload, type="dropped", timestamp=_rfc3339(time.time())))
            else:
                _ws_send_output(ws, kind, payload["data"])
        if record is not None:
            ws.send_json({"type": "result", "exit_code": record["exit_code"],
                          "execution_time": record["execution_time"], "status": record["status"],
                          "reason": record["reason"], "process_id": record["process_id"]})
            ws.send_json({"type": "complete", "success": record["status"] == "completed"})
            ws.close(1000, "done")
            return


_EXECUTION_ROUTES = (
    _route("POST", "/execute/background", _execute_background),
    _route("POST", "/execute/async", _execute_async),
    _route("GET", "/execute/processes", _list_processes),
    _route("GET", "/execute/processes/{process_id}", _get_process),
    _route("GET", "/execute/processes/{process_id}/stream", _stream_sse),
    _route("DELETE", "/execute/processes/{process_id}", _kill),
    _route("POST", "/execute/kill/{process_id}", _kill),
    _route("DELETE", "/execute/kill", _kill),
    _route("POST", "/execute/kill", _kill),
    _route("POST", "/processes/{process_id}/kill", _kill),
    _route("POST", "/execute/processes/{process_id}/signal", _signal),
    _route("POST", "/execute/processes/{process_id}/stdin", _stdin),
    _route("POST", "/commands/run", _commands_run),
    _route("POST", "/commands/background", _commands_background),
)

# ============================================================================
# Endpoints: environment and metrics (the global env store, counters, /processes)
# ============================================================================


def _prom_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _proc_table() -> List[Dict[str, Any]]:
    """The machine's processes from /proc; one that vanishes mid-read is skipped."""
    try:
        import pwd
    except ImportError:  # pragma: no cover - not on Linux
        pwd = None
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError):
        uptime = 0.0
    users: Dict[int, str] = {}
    out = []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in sorted(entries, key=int):
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
            with open("/proc/%s/cmdline" % entry, "rb") as fh:
                cmdline = fh.read().replace(b"\x00", b" ").strip().decode("utf-8", "replace")
            uid = os.stat("/proc/%s" % entry).st_uid
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        if uid not in users:
            try:
                users[uid] = pwd.getpwuid(uid).pw_name if pwd else str(uid)
            except KeyError:
                users[uid] = str(uid)
        rss_pages = int(fields[21]) if len(fields) > 21 else 0
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks if len(fields) > 19 else 0.0
        age_s = uptime - int(fields[19]) / ticks if len(fields) > 19 else 0.0
        out.append({"pid": int(entry), "ppid": int(fields[1]) if len(fields) > 1 else None,
                    "name": name, "command": cmdline or "[%s]" % name, "user": users[uid],
                    "status": fields[0] if fields else "?",
                    "memory_mb": round(rss_pages * page_kb / 1024.0, 2),
                    "cpu_percent": round(100.0 * cpu_s / age_s, 1) if age_s > 0 else 0.0})
    return out


def _env_get(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return {"env_vars": srv.manager.env_snapshot()}


def _env_values(req: _Request) -> Dict[str, str]:
    body = req.json()
    return _env_map(body["env_vars"] if "env_vars" in body else body, "env_vars")


def _env_put(srv: "_AgentServer", req: _Request) -> _Reply:
    srv.manager.env_set(_env_values(req), replace=True)
    return _Reply(204, content_type=None)


def _env_patch(srv: "_AgentServer", req: _Request) -> _Reply:
    srv.manager.env_set(_env_values(req), replace=False)
    return _Reply(204, content_type=None)


def _env_delete(srv: "_AgentServer", req: _Request, name: Optional[str] = None) -> _Reply:
    keys = req.json().get("keys") if name is None else [name]
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise BadRequest("field 'keys' must be an array of strings")
    srv.manager.env_delete(keys)
    return _Reply(204, content_type=None)


def _metrics_data(srv: "_AgentServer") -> Dict[str, Any]:
    metrics = srv.metrics
    requests, errors = metrics.snapshot()
    stats = srv.manager.stats()
    return {"uptime": metrics.uptime, "uptime_seconds": metrics.uptime,
            "requests": {"total": sum(requests.values()), "by_route": requests},
            "errors": {"total": sum(errors.values()), "by_route": errors},
            "executions": {"total": stats["started"], "running": stats["running"],
                           "queued": stats["queued"], "active": stats["running"],
                           "by_status": stats["by_status"], "by_reason": stats["by_reason"]},
            "total_executions": stats["started"], "active_executions": stats["running"],
            "records_held": stats["records"], "output_bytes_held": stats["output_bytes_held"],
            "webhooks": stats["webhooks"], "system": _system_usage(),
            "process": {"count": stats["running"], "pid": os.getpid()},
            "timestamp": _rfc3339(time.time())}


def _metrics(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return _metrics_data(srv)


def _metrics_prometheus(srv: "_AgentServer", req: _Request) -> _Reply:
    data = _metrics_data(srv)
    out: List[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Iterable[Tuple[str, Any]]) -> None:
        out.extend(["# HELP hopx_agent_%s %s" % (name, help_text), "# TYPE hopx_agent_%s %s" % (name, kind)])
        out.extend("hopx_agent_%s%s %s" % (name, labels, value) for labels, value in samples)

    def by(label: str, counts: Dict[str, int]) -> List[Tuple[str, int]]:
        return [('{%s="%s"}' % (label, _prom_escape(k)), v) for k, v in sorted(counts.items())]

    metric("uptime_seconds", "gauge", "Seconds since the agent started.", [("", data["uptime"])])
    metric("requests_total", "counter", "HTTP requests answered, by route.", by("route", data["requests"]["by_route"]))
    metric("request_errors_total", "counter", "HTTP answers with status 400 or more, by route.",
           by("route", data["errors"]["by_route"]))
    metric("executions_total", "counter", "Processes accepted.", [("", data["executions"]["total"])])
    metric("executions_running", "gauge", "Processes running now.", [("", data["executions"]["running"])])
    metric("executions_queued", "gauge", "Processes waiting in the queue.", [("", data["executions"]["queued"])])
    metric("executions_finished_total", "counter", "Finished processes, by final status.",
           by("status", data["executions"]["by_status"]))
    metric("output_bytes_held", "gauge", "Bytes of process output held in memory.", [("", data["output_bytes_held"])])
    metric("webhook_deliveries_total", "counter", "Webhook deliveries, by outcome.",
           by("outcome", data["webhooks"]))
    return _Reply(200, ("\n".join(out) + "\n").encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")


def _system_processes(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    processes = _proc_table()
    return {"processes": processes, "count": len(processes), "timestamp": _rfc3339(time.time())}


_ENVIRONMENT_ROUTES = (
    _route("GET", "/env", _env_get),
    _route("PUT", "/env", _env_put),
    _route("PATCH", "/env", _env_patch),
    _route("DELETE", "/env", _env_delete),
    _route("DELETE", "/env/{name}", _env_delete),
    _route("GET", "/metrics", _metrics),
    _route("GET", "/metrics/snapshot", _metrics),
    _route("GET", "/metrics/prometheus", _metrics_prometheus),
    _route("GET", "/processes", _system_processes),
)


# ============================================================================
# Files: paths, transfers and watching
# ============================================================================
#
# The machinery of api.md §11, no HTTP: where a path may lead (_PathPolicy),
# how a file gets its new content without ever being half written
# (_AtomicWriter), how an upload is parsed while it arrives (_MultipartParser,
# _Upload), what a download sends (_DownloadPlan, _tar_stream), and how a
# directory is watched (_InotifyWatcher, _PollingWatcher). _FileService ties
# them together for the endpoints.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_TEMP_NAME = re.compile(r"\.hopx-tmp-[0-9a-f]{16}(\.c)?\Z")
_KERNEL_TMPFILE_NAME = re.compile(r"#[0-9]+\Z")    # how inotify names an O_TMPFILE inode


class FileError(AgentError):
    """A refused file operation: an api.md §11 code and details.path (the SDK reads it)."""

    def __init__(self, status: int, code: str, message: str, path: str, **details: Any) -> None:
        super().__init__(message, status=status, code=code, details=dict(details, path=path))


# errno -> (status, code, text); anything else is a 500 that names the errno
_ERRNO_ERRORS = {
    errno.ENOENT: (404, "FILE_NOT_FOUND", "no such file or directory"),
    errno.EEXIST: (409, "FILE_ALREADY_EXISTS", "file already exists"),
    errno.ENOTEMPTY: (409, "DIRECTORY_NOT_EMPTY", "directory not empty"),
    errno.EISDIR: (400, "IS_A_DIRECTORY", "is a directory"),
    errno.ENOTDIR: (400, "NOT_A_DIRECTORY", "not a directory"),
    errno.ELOOP: (400, "INVALID_PATH", "too many levels of symbolic links"),
    errno.ENAMETOOLONG: (400, "INVALID_PATH", "file name too long"),
    errno.EINVAL: (400, "INVALID_PATH", "invalid argument"),
    errno.EACCES: (403, "PERMISSION_DENIED", "permission denied"),
    errno.EPERM: (403, "PERMISSION_DENIED", "operation not permitted"),
    errno.EROFS: (403, "PERMISSION_DENIED", "read-only file system"),
    errno.ETXTBSY: (409, "CONFLICT", "text file busy"),
    errno.EBUSY: (409, "CONFLICT", "device or resource busy"),
    errno.ENOSPC: (507, "INSUFFICIENT_STORAGE", "no space left on device"),
    errno.EDQUOT: (507, "INSUFFICIENT_STORAGE", "disk quota exceeded"),
    errno.EFBIG: (413, "PAYLOAD_TOO_LARGE", "file too large"),
    errno.EMFILE: (503, "SERVICE_UNAVAILABLE", "too many open files"),
    errno.ENFILE: (503, "SERVICE_UNAVAILABLE", "too many open files in the system"),
    errno.ENXIO: (400, "INVALID_PATH", "not a regular file"),
}


def _os_failure(exc: OSError, path: str) -> AgentError:
    """The api.md §11 error for an OSError met while working on `path`."""
    status, code, text = _ERRNO_ERRORS.get(exc.errno, (500, "INTERNAL_ERROR", None))
    if text is None:
        log.warning("file operation on %s failed: %s", path, exc)
        text = os.strerror(exc.errno) if exc.errno else str(exc)
    return FileError(status, code, "%s: %s" % (text, path), path)


def _invalid_path(path: str, why: str) -> FileError:
    return FileError(400, "INVALID_PATH", "%s: %r" % (why, path[:200]), path)


def _not_allowed(path: str, why: str = "outside the allowed file roots") -> FileError:
    return FileError(403, "PATH_NOT_ALLOWED", "%s: %s" % (why, path), path)


def _normpath(path: str) -> str:
    """posixpath.normpath, with '//x' as '/x' (POSIX lets normpath keep two slashes)."""
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


def _readlink_at(dir_fd: int, name: str) -> Optional[str]:
    """The text of symlink `name` in dir_fd, or None when it is not a symlink (or gone)."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _lstat_at(dir_fd: int, name: Optional[str]) -> Optional[os.stat_result]:
    """lstat of `name` in dir_fd (of dir_fd itself when name is None); None when absent."""
    try:
        return os.fstat(dir_fd) if name is None else os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------
# Paths: the allowed roots and the walk that cannot be raced
# ----------------------------------------------------------------------------


class _Root(_Plain, frozen=True):
    real: str                   # realpath at start-up: what every walk opens
    names: Tuple[str, ...]      # the spellings a request may use for it (as configured, real)


class _Target:
    """Where a path leads: an open descriptor of the directory that holds the
    final name, and that name (None: the path is that directory itself).
    Operations use dir_fd=self.dir_fd and never follow the name."""

    __slots__ = ("dir_fd", "name", "path", "real", "root")

    def __init__(self, dir_fd: int, name: Optional[str], path: str, real: str, root: _Root) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path            # the request's path, absolute and normalised (symlinks kept)
        self.real = real            # where it leads: no symlink in it
        self.root = root

    def close(self) -> None:
        _close_quietly(self.dir_fd)
        self.dir_fd = -1

    def __enter__(self) -> "_Target":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def lstat(self) -> Optional[os.stat_result]:
        return _lstat_at(self.dir_fd, self.name)


class _MadeDirs:
    """The directories one request's walk created on its way to the target,
    in the order made (each in the one before it, or in a directory that
    existed), each as (a descriptor of its parent, its name, its (st_dev,
    st_ino)), so that a failed request can take them away again."""

    def __init__(self) -> None:
        self._made: List[Tuple[int, str, Tuple[int, int]]] = []

    def add(self, parent_fd: int, name: str, fd: int) -> None:
        st = os.fstat(fd)
        self._made.append((os.dup(parent_fd), name, (st.st_dev, st.st_ino)))

    def remove(self, busy: Callable[[Tuple[int, int]], bool]) -> int:
        """rmdir them, deepest first, through their parents' descriptors (no
        path walked again, no symlink followed): each only while its name
        still holds that very directory, it is empty and busy(key) is false
        (no temp file of another write in it); the first that stays keeps
        those above it. How many went. (Between the check and the rmdir a
        process outside the agent could swap in an empty directory of its
        own: only an empty one, and only in that instant.)"""
        removed = 0
        for parent, name, key in reversed(self._made):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                continue            # gone already: its parent may be empty now
            except OSError:
                break
            if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != key or busy(key):
                break
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                break               # not empty: something was put there, it stays (and so do its parents)
            removed += 1
        return removed

    def close(self) -> None:
        for parent, _, _ in self._made:
            _close_quietly(parent)
        self._made = []


def _default_files_roots(workdir: str) -> Tuple[str, ...]:
    """api.md §11: the working directory and the system temp directory."""
    return (workdir, tempfile.gettempdir())


class _PathPolicy:
    """Which paths a request may name, and the walk that proves where they lead.

    A path is walked from its root downwards, one openat(O_NOFOLLOW |
    O_DIRECTORY) per component relative to the previous directory's
    descriptor, so no component can be swapped for a symlink between the
    check and the use: callers get the open directory that holds the final
    name and work with dir_fd on it. A symlink met on the way is read
    (readlinkat) and its target walked again from whichever root contains it;
    a target outside every root is refused. `..` in a request is resolved
    lexically (as a shell does); inside a symlink's target it is resolved
    against the real directory holding the link.
    """

    def __init__(self, roots: Sequence[str], workdir: str, *, workspace_alias: Optional[bool] = None) -> None:
        self.workdir = _normpath(os.path.abspath(workdir))
        if workspace_alias is None:
            workspace_alias = not os.path.isdir("/workspace")
        # api.md §11: /workspace/... names the working directory on a machine without /workspace
        self.workspace_alias = workspace_alias and self.workdir != "/workspace"
        self.roots = tuple(self._root(given) for given in roots)
        if not self.roots:
            raise ValueError("at least one files root is needed")
        # longest spelling first: a root inside another root is found as itself
        self._spellings = sorted(((name, root) for root in self.roots for name in root.names),
                                 key=lambda pair: -len(pair[0]))

    def _root(self, given: str) -> _Root:
        named = _normpath(os.path.join(self.workdir, given))
        real = os.path.realpath(named)
        if not os.path.isdir(real):
            raise ValueError("files root is not a directory: %s" % given)
        return _Root(real, tuple(dict.fromkeys((named, real))))

    def normalise(self, path: Any) -> Tuple[str, str]:
        """(display, internal): the absolute normalised path for answers, and the
        same with the /workspace alias applied, for walking."""
        if not isinstance(path, str) or not path:
            raise _invalid_path("" if path is None else str(path), "path is empty")
        if "\x00" in path:
            raise _invalid_path(path, "path contains a NUL byte")
        if len(path.encode("utf-8", "surrogateescape")) > FILES_MAX_PATH_BYTES:
            raise _invalid_path(path, "path is longer than %d bytes" % FILES_MAX_PATH_BYTES)
        display = _normpath(path if path.startswith("/") else posixpath.join(self.workdir, path))
        internal = display
        if self.workspace_alias and (display == "/workspace" or display.startswith("/workspace/")):
            internal = _normpath(self.workdir + display[len("/workspace"):])
        return display, internal

    def _root_of(self, internal: str, display: str) -> Tuple[_Root, List[str]]:
        for name, root in self._spellings:
            if name == "/" or internal == name or internal.startswith(name + "/"):
                rest = internal if name == "/" else internal[len(name):]
                return root, [part for part in rest.split("/") if part]
        if internal != self.normalise(display)[1]:
            raise _not_allowed(display, "a symlink leads outside the allowed file roots")
        raise _not_allowed(display)

    def _open_root(self, root: _Root, display: str) -> int:
        """The root's directory, itself walked with O_NOFOLLOW from '/', so a root
        replaced by a symlink (or a symlinked ancestor) is refused, not followed."""
        fd = os.open("/", _DIR_FLAGS)
        try:
            for name in (part for part in root.real.split("/") if part):
                parent, fd = fd, -1
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
                finally:
                    os.close(parent)
            return fd
        except OSError as exc:
            _close_quietly(fd if fd >= 0 else None)
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _not_allowed(display, "the files root %s is no longer a plain directory" % root.real)
            raise _os_failure(exc, display)

    def locate(self, path: Any, *, follow: bool = True, create: Optional[int] = None,
               owner: Optional[Tuple[int, int]] = None, made: Optional[_MadeDirs] = None) -> _Target:
        """Walk `path`. follow: a final symlink is resolved too (read, write);
        otherwise the name itself is the target (stat, remove, move). create:
        missing directories on the way are made with this mode (and owner),
        and recorded in `made`."""
        display, internal = self.normalise(path)
        for _ in range(FILES_MAX_SYMLINKS + 1):
            found = self._walk(internal, display, follow, create, owner, made)
            if isinstance(found, _Target):
                return found
            internal = found        # a symlink was met: walk its target from the top
        raise _invalid_path(display, "too many levels of symbolic links")

    def _walk(self, internal: str, display: str, follow: bool, create: Optional[int],
              owner: Optional[Tuple[int, int]], made: Optional[_MadeDirs]) -> Any:
        root, parts = self._root_of(internal, display)
        fd = self._open_root(root, display)
        # `real` is built from directories actually opened, so it holds no
        # symlink: a link's relative text can be joined to it lexically.
        real = root.real
        try:
            for index, name in enumerate(parts):
                rest = parts[index + 1:]
                if not rest:
                    link = _readlink_at(fd, name) if follow else None
                    if link is not None:
                        return _link_target(real, link, rest, display)
                    target, fd = _Target(fd, name, display, posixpath.join(real, name), root), -1
                    return target
                step = self._step(fd, name, create, owner, made)
                if isinstance(step, str):       # a symlink: its target is walked from the top, checked anew
                    return _link_target(real, step, rest, display)
                os.close(fd)
                fd, real = step, posixpath.join(real, name)
            target, fd = _Target(fd, None, display, real, root), -1
            return target
        except OSError as exc:
            raise _os_failure(exc, display)
        finally:
            _close_quietly(fd if fd >= 0 else None)

    @staticmethod
    def _step(fd: int, name: str, create: Optional[int], owner: Optional[Tuple[int, int]],
              made: Optional[_MadeDirs] = None) -> Any:
        """Open directory `name` under fd without following it: the new fd, or a
        symlink's text for the caller to walk."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                link = _readlink_at(fd, name)
                if link is not None:
                    return link
            if exc.errno != errno.ENOENT or create is None:
                raise
        try:
            os.mkdir(name, create, dir_fd=fd)       # mkdirat never follows: a symlink there is EEXIST
        except FileExistsError:
            return _PathPolicy._step(fd, name, None, None)  # made meanwhile: open it as found (a symlink is walked)
        opened = _PathPolicy._step(fd, name, None, None)
        if isinstance(opened, int):     # (not: swapped for a symlink at once; that is walked, not ours)
            try:
                if made is not None:
                    made.add(fd, name, opened)
                if owner is not None:
                    os.fchown(opened, *owner)
            except BaseException:
                os.close(opened)
                raise
        return opened

    def open_dir(self, path: Any) -> _Target:
        """The directory `path` leads to (a final symlink followed), open, name None."""
        for _ in range(FILES_MAX_SYMLINKS + 1):
            target = self.locate(path, follow=True)
            if target.name is None:
                return target
            try:
                fd = os.open(target.name, _DIR_FLAGS, dir_fd=target.dir_fd)
            except OSError as exc:
                swapped = exc.errno in (errno.ENOTDIR, errno.ELOOP) and _readlink_at(target.dir_fd, target.name)
                target.close()
                if swapped:
                    continue        # became a symlink after the walk: walk again
                raise _os_failure(exc, target.path)
            os.close(target.dir_fd)
            target.dir_fd, target.name = fd, None
            return target
        raise _invalid_path(str(path), "too many levels of symbolic links")

    def open_file(self, path: Any, flags: int, mode: int = 0o644) -> Tuple[_Target, int]:
        """(target, fd) of what `path` leads to, opened with flags | O_NOFOLLOW;
        the path itself being a directory gives a descriptor of it."""
        # each round walks from the top: a name that became a symlink after the
        # walk (ELOOP under O_NOFOLLOW) is looked up again and checked again
        for _ in range(FILES_MAX_SYMLINKS + 1):
            target = self.locate(path, follow=True)
            if target.name is None:
                return target, os.dup(target.dir_fd)
            try:
                fd = os.open(target.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=target.dir_fd)
            except OSError as exc:
                swapped = exc.errno == errno.ELOOP and _readlink_at(target.dir_fd, target.name)
                if not swapped:
                    target.close()
                    raise _os_failure(exc, target.path)
                target.close()
                continue
            return target, fd
        raise _invalid_path(str(path), "too many levels of symbolic links")

    def holds_root(self, real: str) -> bool:
        """Whether removing or moving `real` would take an allowed root with it."""
        return any(root.real == real or root.real.startswith(real.rstrip("/") + "/") for root in self.roots)


def _link_target(real_dir: str, link: str, rest: Sequence[str], display: str) -> str:
    """The path a symlink in real_dir leads to, with what followed it in the request."""
    if not link:
        raise FileError(404, "FILE_NOT_FOUND", "empty symlink: %s" % display, display)
    return _normpath(posixpath.join(real_dir, link, *rest))


# ----------------------------------------------------------------------------
# Entries: lstat results in the shape of api.md §11
# ----------------------------------------------------------------------------


class _Entries:
    """Builds entries; caches the slow parts (owner names, time text, mode text).
    The caches are plain dicts whose single operations the GIL keeps whole; a
    racing miss only computes a value twice."""

    _MAX_CACHED = 4096

    def __init__(self) -> None:
        self._users: Dict[int, str] = {}
        self._groups: Dict[int, str] = {}
        self._modes: Dict[int, Tuple[str, str]] = {}
        self._seconds: Dict[int, str] = {}

    def _user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            self._remember(self._users, uid, name)
        return name

    def _group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is None:
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                name = str(gid)
            self._remember(self._groups, gid, name)
        return name

    def _remember(self, cache: Dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= self._MAX_CACHED:
            cache.clear()
        cache[key] = value

    def time_text(self, ns: int) -> str:
        """RFC 3339 UTC with milliseconds, as _rfc3339, for a st_mtime_ns."""
        whole, frac = divmod(ns, 1000000000)
        head = self._seconds.get(whole)
        if head is None:
            head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._remember(self._seconds, whole, head)
        return "%s.%03dZ" % (head, frac // 1000000)

    def _mode_texts(self, mode: int) -> Tuple[str, str]:
        texts = self._modes.get(mode)
        if texts is None:
            texts = (stat.filemode(mode), "%04o" % stat.S_IMODE(mode))
            self._remember(self._modes, mode, texts)
        return texts

    def entry(self, name: str, path: str, st: os.stat_result, link: Optional[str] = None) -> Dict[str, Any]:
        # the hot loop of a listing: plain dict lookups, no helper per field
        texts = self._mode_texts(st.st_mode)
        is_dir = stat.S_ISDIR(st.st_mode)
        out = {"name": name, "path": path, "size": st.st_size, "is_directory": is_dir, "is_dir": is_dir,
               "is_symlink": link is not None, "permissions": texts[0], "mode": texts[1],
               "modified_time": self.time_text(st.st_mtime_ns),
               "owner": self._users.get(st.st_uid) or self._user(st.st_uid),
               "group": self._groups.get(st.st_gid) or self._group(st.st_gid)}
        if link is not None:
            out["target"] = link
        return out

    _JSON = ('{"name":%s,"path":%s,"size":%d,"is_directory":%s,"is_dir":%s,"is_symlink":%s,"permissions":"%s",'
             '"mode":"%s","modified_time":"%s","owner":%s,"group":%s%s}')

    def entry_json(self, name: str, path: str, st: os.stat_result, link: Optional[str] = None) -> str:
        """entry() as JSON text, with no dict in between: what /files/list sends
        (10,000 of these cost half of json.dumps of the dicts)."""
        quote = json.encoder.encode_basestring_ascii
        texts = self._mode_texts(st.st_mode)
        is_dir = "true" if stat.S_ISDIR(st.st_mode) else "false"
        return self._JSON % (quote(name), quote(path), st.st_size, is_dir, is_dir,
                             "false" if link is None else "true", texts[0], texts[1],
                             self.time_text(st.st_mtime_ns),
                             quote(self._users.get(st.st_uid) or self._user(st.st_uid)),
                             quote(self._groups.get(st.st_gid) or self._group(st.st_gid)),
                             "" if link is None else ',"target":' + quote(link))


def _child_path(base: str, name: str) -> str:
    return base + name if base.endswith("/") else base + "/" + name


def _is_dir_entry(entry: "os.DirEntry[str]") -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


_BY_NAME = operator.attrgetter("name")


def _sorted_children(items: Iterable["os.DirEntry[str]"], need: int) -> List["os.DirEntry[str]"]:
    """The first `need` entries in api.md §11 order (directories first, then by
    name in code point order), holding at most about 2 x need of them: the
    list is cut back to the best `need` whenever it doubles."""
    dirs: List["os.DirEntry[str]"] = []
    files: List["os.DirEntry[str]"] = []
    for entry in items:
        # d_type from readdir: no stat until an entry is known to be in the window
        (dirs if _is_dir_entry(entry) else files).append(entry)
        if len(dirs) + len(files) >= 2 * need + 1024:
            dirs, files = _cut(dirs, files, need)
    dirs.sort(key=_BY_NAME)
    files.sort(key=_BY_NAME)
    return (dirs + files)[:need] if len(dirs) + len(files) > need else dirs + files


def _cut(dirs: List[Any], files: List[Any], need: int) -> Tuple[List[Any], List[Any]]:
    dirs.sort(key=_BY_NAME)
    dirs = dirs[:need]
    files.sort(key=_BY_NAME)
    return dirs, files[:max(0, need - len(dirs))]


class _Listing:
    """One /files/list answer: depth-first, each directory's children
    directories first then by name, the window [offset, offset + limit) of
    that order, and whether more follow. Only as many children of a directory
    as the window can still use are kept sorted (_sorted_children), and a
    directory's descriptor is open only while its subtree is walked."""

    def __init__(self, entries: _Entries, max_depth: float, offset: int, limit: int, *,
                 as_json: bool = False) -> None:
        self._entries = entries
        self._make = entries.entry_json if as_json else entries.entry   # JSON text or dicts
        self._max_depth = max_depth
        self._skip = offset
        self._want = limit + 1      # one more than asked tells whether more follow
        self._limit = limit
        self.files: List[Dict[str, Any]] = []

    def run(self, top: _Target) -> Tuple[List[Dict[str, Any]], bool]:
        stack = [(top.dir_fd, top.path, self._children(top.dir_fd), 1)]
        try:
            while stack and len(self.files) < self._want:
                fd, base, items, depth = stack[-1]
                entry = next(items, None)
                if entry is None:
                    stack.pop()
                    if fd != top.dir_fd:
                        os.close(fd)
                    continue
                sub = self._emit(fd, base, entry, depth)
                if sub is not None:
                    stack.append((sub, _child_path(base, entry.name), self._children(sub), depth + 1))
        finally:
            for fd, _, _, _ in stack:
                if fd != top.dir_fd:
                    _close_quietly(fd)
        more = len(self.files) > self._limit
        return self.files[:self._limit], more

    def _children(self, fd: int) -> Iterator["os.DirEntry[str]"]:
        # no directory can contribute more than what is still to skip plus what is still wanted
        need = self._skip + self._want - len(self.files)
        with os.scandir(fd) as it:
            return iter(_sorted_children(it, need))

    def _emit(self, fd: int, base: str, entry: "os.DirEntry[str]", depth: int) -> Optional[int]:
        """Count or record one entry; the fd of its directory when it is to be walked."""
        try:
            # os.stat with dir_fd: the same fstatat as DirEntry.stat, ~20% less overhead per call
            st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
            link = os.readlink(entry.name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
        except OSError:
            return None             # gone since the directory was read
        if self._skip:              # before the window: counted, and walked (its children may be in it)
            self._skip -= 1
        else:
            self.files.append(self._make(entry.name, _child_path(base, entry.name), st, link))
        if not stat.S_ISDIR(st.st_mode) or depth >= self._max_depth:
            return None
        try:
            return os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
        except OSError:
            return None             # replaced or unreadable: listed, not walked


# ----------------------------------------------------------------------------
# Writing: temp file beside the target, renamed over it when complete
# ----------------------------------------------------------------------------

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """rename that fails with EEXIST instead of replacing (renameat2 RENAME_NOREPLACE).
    Where the kernel, libc or file system lacks it: check, then rename (racy,
    and documented as such)."""
    func = getattr(_libc(), "renameat2", None)
    if func is not None:
        if func(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), 1) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), dst)
    if _lstat_at(dst_fd, dst) is not None:
        raise FileExistsError(errno.EEXIST, "file exists", dst)
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def _temp_name(new: bool = False) -> str:
    """A named temp file's name; `.c`: it will become a new name (watchers say created)."""
    return FILES_TEMP_PREFIX + secrets.token_hex(8) + (".c" if new else "")


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _AtomicWriter:
    """The next version of one file: written to a temp file in the target's
    directory and given the target's name only when complete, so a reader
    sees the old content or the new, never a mix, and a failure leaves
    nothing. The temp file is an O_TMPFILE inode where the kernel and file
    system have it (it has no name until linked, so even a SIGKILLed agent
    leaves nothing), else a `.hopx-tmp-<hex>` file removed on failure.

    Durability: the data is fdatasync'ed before the file gets its name, so
    after a power loss the name holds the old file or the whole new one;
    writeback is started every FILES_WRITEBACK_BYTES, so that sync is short.
    The directory is not fsync'ed: after a power loss the rename itself may
    be lost, which still leaves a whole (old) file.
    """

    use_tmpfile: Optional[bool] = None   # O_TMPFILE and /proc to link it: probed at first use

    def __init__(self, target: _Target, *, mode: Optional[int] = None, overwrite: bool = True,
                 max_bytes: Optional[int] = None, owner: Optional[Tuple[int, int]] = None) -> None:
        if target.name is None:
            raise FileError(400, "IS_A_DIRECTORY", "is a directory: %s" % target.path, target.path)
        self.path = target.path
        self.size = 0
        self._name = target.name
        self._overwrite = overwrite
        self._max_bytes = max_bytes
        self._kicked = 0
        self._temp: Optional[str] = None     # the named temp file, when not O_TMPFILE
        self._dir_fd = os.dup(target.dir_fd)
        self._fd = -1
        try:
            self._mode, self._owner = self._plan(target, mode, owner)
            self._fd = self._open_temp()
        except BaseException:
            self.abort()
            raise

    def _plan(self, target: _Target, mode: Optional[int],
              owner: Optional[Tuple[int, int]]) -> Tuple[int, Optional[Tuple[int, int]]]:
        """The new file's mode and owner: as asked, else those of the file it replaces."""
        try:
            old = target.lstat()
        except OSError as exc:
            raise _os_failure(exc, target.path)
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise FileError(400, "IS_A_DIRECTORY", "is a directory: %s" % target.path, target.path)
        if old is not None and not self._overwrite:
            raise FileError(409, "FILE_ALREADY_EXISTS", "file already exists: %s" % target.path, target.path)
        replaced = old is not None and stat.S_ISREG(old.st_mode)
        # (the name can change before commit: the placement step decides atomically, this only plans)
        if mode is None:
            mode = stat.S_IMODE(old.st_mode) if replaced else 0o644
        if replaced and owner is None and os.geteuid() == 0:
            owner = (old.st_uid, old.st_gid)    # root rewriting a user's file keeps it theirs
        return mode, owner

    def _open_temp(self) -> int:
        if _AtomicWriter.use_tmpfile is None:
            _AtomicWriter.use_tmpfile = bool(_O_TMPFILE) and os.path.isdir("/proc/self/fd")
        if _AtomicWriter.use_tmpfile:
            try:
                return os.open(".", _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
            except OSError as exc:
                if exc.errno == errno.EPERM and os.fstat(self._dir_fd).st_nlink == 0:
                    # what O_TMPFILE says in a directory removed since the walk
                    raise FileError(404, "FILE_NOT_FOUND", "directory removed meanwhile: %s" % self.path, self.path)
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EPERM):
                    raise _os_failure(exc, self.path)
        self._temp = _temp_name()
        try:
            # O_EXCL: a name planted in advance (even a symlink) is never opened, only refused
            return os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            self._temp = None
            raise _os_failure(exc, self.path)

    def write(self, data: Any) -> None:
        """Append data to the new version (ENOSPC -> 507, over max_bytes -> 413)."""
        size = self.size + len(data)
        if self._max_bytes is not None and size > self._max_bytes:
            raise FileError(413, "PAYLOAD_TOO_LARGE", "upload is larger than %d bytes: %s"
                            % (self._max_bytes, self.path), self.path, max_upload_bytes=self._max_bytes)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise _os_failure(exc, self.path)
        self.size = size
        if size - self._kicked >= FILES_WRITEBACK_BYTES:
            self._kick_writeback()

    def _kick_writeback(self) -> None:
        """Start writeback of what was written since the last kick, and drop the
        window before it from the cache (it is on its way to the disk by now)."""
        start = max(0, self._kicked - FILES_WRITEBACK_BYTES)
        try:
            os.posix_fadvise(self._fd, start, self.size - start, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        self._kicked = self.size

    def adopt(self, target: _Target) -> "_AtomicWriter":
        """This (complete) content, for another target: on the same file system
        the temp file moves there (this writer, retargeted); otherwise it is
        copied to a new writer and this one dropped. On failure both are."""
        try:
            if target.name is not None and os.fstat(target.dir_fd).st_dev == os.fstat(self._dir_fd).st_dev:
                return self._move_to(target)
            other = _AtomicWriter(target, overwrite=self._overwrite, max_bytes=self._max_bytes, owner=self._owner)
        except BaseException:
            self.abort()
            raise
        try:
            other._copy_from(self._fd, self.size)
        except BaseException:
            other.abort()
            raise
        finally:
            self.abort()
        return other

    def _move_to(self, target: _Target) -> "_AtomicWriter":
        mode, owner = self._plan(target, None, self._owner)
        new_dir = os.dup(target.dir_fd)
        if self._temp is not None:
            temp = _temp_name()
            try:
                os.rename(self._temp, temp, src_dir_fd=self._dir_fd, dst_dir_fd=new_dir)
            except BaseException:
                os.close(new_dir)
                raise
            self._temp = temp
        os.close(self._dir_fd)
        self._dir_fd, self._name, self.path = new_dir, target.name, target.path
        self._mode, self._owner = mode, owner
        return self

    def _copy_from(self, src: int, size: int) -> None:
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(self._fd, src, offset, min(size - offset, 1 << 30))
            except OSError as exc:
                raise _os_failure(exc, self.path)
            if not sent:
                raise FileError(500, "INTERNAL_ERROR", "staged upload shrank: %s" % self.path, self.path)
            offset += sent
        self.size = size

    def commit(self) -> int:
        """Give the new version its name; the size written."""
        try:
            os.fchmod(self._fd, self._mode)      # exact, whatever the umask
            if self._owner is not None:
                os.fchown(self._fd, *self._owner)
            # delayed allocation reports ENOSPC here, not at write(): still a 507 with nothing left
            os.fdatasync(self._fd)
            self._place()
        except OSError as exc:
            self.abort()
            if exc.errno == errno.EEXIST:
                raise FileError(409, "FILE_ALREADY_EXISTS", "file already exists: %s" % self.path, self.path)
            raise _os_failure(exc, self.path)
        except BaseException:
            self.abort()
            raise
        self.abort()                # closes; nothing left to remove
        return self.size

    def _place(self) -> None:
        """A new name is linked (no-replace: watchers see `created`); an
        existing one is replaced by rename (watchers see `modified`)."""
        if self._temp is None:
            source, src_fd, follow = "/proc/self/fd/%d" % self._fd, None, True
        else:
            source, src_fd, follow = self._temp, self._dir_fd, False
        try:
            # linkat never replaces: this is what makes overwrite=false race-free
            os.link(source, self._name, src_dir_fd=src_fd, dst_dir_fd=self._dir_fd, follow_symlinks=follow)
        except FileExistsError:
            if not self._overwrite:
                raise
            if self._temp is None:      # an O_TMPFILE needs a name of its own before rename can use it
                self._temp = _temp_name()
                os.link(source, self._temp, dst_dir_fd=self._dir_fd, follow_symlinks=True)
            # rename replaces the name itself, never what a symlink there points to
            os.rename(self._temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._temp = None
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK) or self._temp is None:
                raise
            self._rename_into_place()   # a file system without hard links
            return
        os.unlink(self._temp, dir_fd=self._dir_fd) if self._temp is not None else None
        self._temp = None

    def _rename_into_place(self) -> None:
        if self._overwrite:
            os.rename(self._temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        else:
            _rename_noreplace(self._dir_fd, self._temp, self._dir_fd, self._name)
        self._temp = None

    def abort(self) -> None:
        """Close, and remove the temp file if it has a name. Idempotent."""
        if self._temp is not None and self._dir_fd >= 0:
            try:
                os.unlink(self._temp, dir_fd=self._dir_fd)
            except OSError:
                pass
            self._temp = None
        _close_quietly(self._fd if self._fd >= 0 else None)
        _close_quietly(self._dir_fd if self._dir_fd >= 0 else None)
        self._fd = self._dir_fd = -1

    def __enter__(self) -> "_AtomicWriter":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is not None:
            self.abort()


FILES_WRITE_WALKS = 3       # walks to a write's directory when it is removed meanwhile (a clean-up's race)


class _DirClaims:
    """The directories where a write, upload or move of this agent has its
    temp file (or copy) now. An O_TMPFILE does not make a directory look
    non-empty, so without this a failed request's clean-up could rmdir a
    directory another request is about to link its file into."""

    def __init__(self) -> None:
        # guards _held; claims and clean-ups exclude each other (the rmdirs run under it: no waits)
        self._lock = threading.Lock()
        self._held: Dict[Tuple[int, int], int] = {}

    def claim(self, dir_fd: int) -> Optional[Tuple[int, int]]:
        """Hold the directory open as dir_fd; None if it was removed since the walk."""
        with self._lock:
            st = os.fstat(dir_fd)
            if st.st_nlink == 0:
                return None
            key = (st.st_dev, st.st_ino)
            self._held[key] = self._held.get(key, 0) + 1
            return key

    def release(self, key: Tuple[int, int]) -> None:
        with self._lock:
            left = self._held.pop(key) - 1
            if left:
                self._held[key] = left

    def remove(self, made: _MadeDirs) -> None:
        """A failed request's clean-up: what its walk made, unless held (or not empty)."""
        with self._lock:
            made.remove(self._held.__contains__)


class _WriteSite:
    """Where one write, upload or move puts its result: enter() walks there,
    making the missing parents (recorded in a _MadeDirs) and claiming the
    directory reached; end(failed) drops the claims and, when the request
    failed, removes the directories its own walk made, so that a failed
    write or an aborted upload leaves nothing behind, not even those."""

    def __init__(self, claims: _DirClaims) -> None:
        self._claims = claims
        self._made = _MadeDirs()
        self._keys: List[Tuple[int, int]] = []

    def enter(self, walk: Callable[..., _Target]) -> _Target:
        """walk(made=...) -> the target; walked again when its directory went meanwhile."""
        for attempt in range(1, FILES_WRITE_WALKS + 1):
            try:
                target = walk(made=self._made)
            except FileError as exc:
                # with parents made on the way, a 404 means a directory went mid-walk: walk again
                if exc.code != "FILE_NOT_FOUND" or attempt == FILES_WRITE_WALKS:
                    raise
                continue
            key = self._claims.claim(target.dir_fd)
            if key is not None:
                self._keys.append(key)
                return target
            target.close()
        raise FileError(404, "FILE_NOT_FOUND", "directory removed meanwhile: %s" % target.path, target.path)

    def end(self, failed: bool) -> None:
        """Idempotent; after the request's temp file is gone (a named one keeps its directory)."""
        for key in self._keys:
            self._claims.release(key)
        self._keys = []
        if failed:
            self._claims.remove(self._made)
        self._made.close()


def _append(target: _Target, fd: int, data: bytes) -> int:
    """Append to an open file in place (a log grows; copying it is no answer);
    on failure it is cut back to its old size. The size afterwards."""
    try:
        before = os.fstat(fd).st_size
    except OSError as exc:
        raise _os_failure(exc, target.path)
    try:
        _write_all(fd, data)
        os.fdatasync(fd)
        return os.fstat(fd).st_size
    except OSError as exc:
        try:
            os.ftruncate(fd, before)
        except OSError:
            pass
        raise _os_failure(exc, target.path)


def _rmtree_at(parent_fd: int, name: str) -> None:
    """rm -rf of directory `name` in parent_fd, every step with dir_fd and no
    symlink followed (a directory swapped for a link is unlinked, not entered)."""
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    stack = [(top, os.scandir(top), parent_fd, name)]
    try:
        while stack:
            fd, items, parent, own = stack[-1]
            sub = None
            for entry in items:
                sub = _rm_entry(fd, entry)
                if sub is not None:
                    stack.append((sub, os.scandir(sub), fd, entry.name))
                    break
            if sub is None:
                stack.pop()
                items.close()
                os.close(fd)
                os.rmdir(own, dir_fd=parent)
    finally:
        for fd, items, _, _ in stack:
            items.close()
            _close_quietly(fd)


def _rm_entry(fd: int, entry: "os.DirEntry[str]") -> Optional[int]:
    """Unlink one entry, or open it (a directory) for the caller to empty first."""
    try:
        if entry.is_dir(follow_symlinks=False):
            try:
                return os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
        os.unlink(entry.name, dir_fd=fd)
    except FileNotFoundError:
        pass
    return None


def _copy_tree_at(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """cp -a of `src` (a file, symlink or directory; nothing followed) to the new
    name `dst`, for moves across file systems. The caller removes a partial copy."""
    st = os.stat(src, dir_fd=src_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src, dir_fd=src_fd), dst, dir_fd=dst_fd)
        return
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700, dir_fd=dst_fd)
        sfd = os.open(src, _DIR_FLAGS, dir_fd=src_fd)
        dfd = os.open(dst, _DIR_FLAGS, dir_fd=dst_fd)
        try:
            with os.scandir(sfd) as items:
                for entry in items:
                    _copy_tree_at(sfd, entry.name, dfd, entry.name)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(sfd)
            os.close(dfd)
        return
    if not stat.S_ISREG(st.st_mode):
        return                      # fifos, sockets, devices are not carried across
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=src_fd)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        try:
            while os.sendfile(dfd, sfd, None, FILES_CHUNK_BYTES * 64):
                pass
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fdatasync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


# ----------------------------------------------------------------------------
# Uploads: multipart/form-data parsed as it arrives
# ----------------------------------------------------------------------------


def _header_params(value: str) -> Tuple[str, Dict[str, str]]:
    """`form-data; name="file"; filename="a b.txt"` -> ("form-data", {...}).
    Quoted strings may escape with a backslash; RFC 5987 `name*=UTF-8''...`
    values are decoded and win over the plain ones."""
    head, _, rest = value.partition(";")
    params: Dict[str, str] = {}
    pattern = re.compile(r'\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*(?:;|$)')
    for key, raw in pattern.findall(rest):
        key = key.lower()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key.endswith("*"):
            charset, _, encoded = raw.partition("''")
            try:
                params[key[:-1]] = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                continue
        else:
            params.setdefault(key, raw.strip())
    return head.strip().lower(), params


def _multipart_boundary(content_type: str) -> Optional[str]:
    """The boundary of a multipart/form-data Content-Type, or None if it is not one."""
    kind, params = _header_params(content_type or "")
    if kind != "multipart/form-data":
        return None
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise BadRequest("multipart/form-data needs a boundary of 1 to 200 characters")
    return boundary


class _MultipartParser:
    """A streaming multipart/form-data parser (RFC 7578 / RFC 2046 §5.1):
    feed() it chunks of any size, get back events:

        ("part", {"name": ..., "filename": ..., "content_type": ...})
        ("data", memoryview)       # the current part's bytes, in order
        ("end", None)              # the current part is complete

    A delimiter cut across two chunks is found: up to len(delimiter) - 1
    bytes of a chunk are held back until the next one says whether they
    start one. Memory is one chunk plus that tail, whatever the body's size.
    """

    _PREAMBLE, _AFTER, _HEADERS, _BODY, _DONE = range(5)

    def __init__(self, boundary: str) -> None:
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._state = self._PREAMBLE
        self._buf = b"\r\n"         # the body's first delimiter has no CRLF before it
        self.done = False

    def feed(self, chunk: bytes) -> List[Tuple[str, Any]]:
        self._buf = self._buf + chunk if self._buf else bytes(chunk)
        events: List[Tuple[str, Any]] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """The body ended: anything but a complete closing delimiter is a 400."""
        if self._state != self._DONE:
            raise BadRequest("multipart body ended before its closing boundary")

    def _step(self, events: List[Tuple[str, Any]]) -> bool:
        """Advance one state; False when more input is needed."""
        if self._state == self._BODY:
            return self._body(events)
        if self._state == self._PREAMBLE:
            found = self._buf.find(self._delim)
            if found < 0:
                self._buf = self._buf[-(len(self._delim) - 1):]
                return False
            self._buf, self._state = self._buf[found + len(self._delim):], self._AFTER
            return True
        if self._state == self._AFTER:
            return self._after_delimiter()
        if self._state == self._HEADERS:
            return self._headers(events)
        self._buf = b""             # the epilogue is ignored
        return False

    def _after_delimiter(self) -> bool:
        """`--` closes the body; else optional padding, then CRLF and a part."""
        if len(self._buf) < 2:
            return False
        if self._buf[:2] == b"--":
            self._state, self._buf, self.done = self._DONE, b"", True
            return False
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 256:
                raise BadRequest("malformed multipart delimiter line")
            return False
        if self._buf[:end].strip(b" \t"):
            raise BadRequest("malformed multipart delimiter line")
        self._buf, self._state = self._buf[end + 2:], self._HEADERS
        return True

    def _headers(self, events: List[Tuple[str, Any]]) -> bool:
        if self._buf.startswith(b"\r\n"):
            end, skip = 0, 2        # a part with no headers at all
        else:
            end, skip = self._buf.find(b"\r\n\r\n"), 4
        if end < 0:
            if len(self._buf) > FILES_MAX_PART_HEADER_BYTES:
                raise BadRequest("multipart part headers are larger than %d bytes" % FILES_MAX_PART_HEADER_BYTES)
            return False
        head, self._buf = self._buf[:end], self._buf[end + skip:]
        events.append(("part", _part_info(head)))
        self._state = self._BODY
        return True

    def _body(self, events: List[Tuple[str, Any]]) -> bool:
        buf = self._buf
        found = buf.find(self._delim)
        if found >= 0:
            if found:
                events.append(("data", memoryview(buf)[:found]))
            events.append(("end", None))
            self._buf, self._state = buf[found + len(self._delim):], self._AFTER
            return True
        # no delimiter in buf: everything but a possible delimiter prefix at its end is data
        keep = self._held_back(buf)
        if len(buf) > keep:
            events.append(("data", memoryview(buf)[:len(buf) - keep]))
            self._buf = buf[len(buf) - keep:]
        return False

    def _held_back(self, buf: bytes) -> int:
        """How many trailing bytes could be the start of a delimiter."""
        pos = buf.find(b"\r", max(0, len(buf) - (len(self._delim) - 1)))
        while pos >= 0:
            if self._delim.startswith(buf[pos:]):
                return len(buf) - pos
            pos = buf.find(b"\r", pos + 1)
        return 0


def _part_info(head: bytes) -> Dict[str, Optional[str]]:
    """A part's name, filename and content type from its header block."""
    info: Dict[str, Optional[str]] = {"name": None, "filename": None, "content_type": None}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "content-disposition":
            _, params = _header_params(value)
            info["name"], info["filename"] = params.get("name"), params.get("filename")
        elif key == "content-type":
            info["content_type"] = value.strip()
    return info


FILES_STAGE_HEAD_BYTES = 256 * 1024     # a `file` part before its `path` waits in memory up to this much


class _Upload:
    """One upload (multipart or raw) from its first byte to its committed file.

    Multipart: the target is ?path=, else the `path` field (both given must
    agree); the `file` part is written straight to disk as it arrives. A
    `file` part that comes before its `path` field is held in memory up to
    FILES_STAGE_HEAD_BYTES (the field usually follows at once: then it goes
    straight to its target); beyond that it is staged in the allowed root
    with the most free space (_FileService.staging_writer) and moved (same
    file system) or copied next to the target at the end. Anything that goes
    wrong aborts the writer and ends the site as failed: nothing is left
    behind, not the file, not the directories this upload made.
    """

    def __init__(self, service: "_FileService", *, path: Optional[str], boundary: Optional[str],
                 overwrite: bool = True, max_bytes: Optional[int] = None) -> None:
        self._service = service
        self._path = path
        self._parser = _MultipartParser(boundary) if boundary is not None else None
        self._overwrite = overwrite
        self._max_bytes = max_bytes
        self._site = service.site()
        self._writer: Optional[_AtomicWriter] = None
        self._staged = False
        self._head: Optional[bytearray] = None     # the file part's bytes while no path is known
        self._part: Optional[Dict[str, Optional[str]]] = None
        self._field = bytearray()
        self._filename: Optional[str] = None
        if self._parser is None:
            try:
                self._writer = self._open(self._required_path())
            except BaseException:
                self._site.end(failed=True)
                raise

    def _required_path(self) -> str:
        if self._path is None:
            raise _invalid_path("", "upload needs a path (the `path` form field or ?path=)")
        return self._path

    def _open(self, path: str) -> _AtomicWriter:
        walk = functools.partial(self._service.locate_for_write, path, self._filename)
        with self._site.enter(walk) as target:
            return _AtomicWriter(target, overwrite=self._overwrite, max_bytes=self._max_bytes,
                                 owner=self._service.owner)

    def feed(self, chunk: bytes) -> None:
        """The body's next bytes; an error aborts the upload (nothing left)."""
        try:
            if self._parser is None:
                self._writer.write(chunk)
                return
            for kind, value in self._parser.feed(chunk):
                self._event(kind, value)
        except BaseException:
            self.abort()
            raise

    def _event(self, kind: str, value: Any) -> None:
        name = self._part["name"] if self._part is not None else None
        if kind == "part":
            self._part = value
            if value["name"] == "file":
                self._start_file(value)
        elif kind == "data" and name == "file":
            self._file_data(value)
        elif kind == "data" and name in ("path", "overwrite"):
            if len(self._field) + len(value) > FILES_MAX_FIELD_BYTES:
                raise BadRequest("form field %r is larger than %d bytes" % (name, FILES_MAX_FIELD_BYTES))
            self._field += value
        elif kind == "end":
            self._end_part(name)

    def _start_file(self, info: Dict[str, Optional[str]]) -> None:
        if self._writer is not None or self._head is not None:
            raise BadRequest("one `file` part per upload")
        self._filename = info["filename"]
        if self._path is not None:
            self._writer = self._open(self._path)
        else:
            self._head = bytearray()

    def _file_data(self, data: Any) -> None:
        if self._writer is None:
            held = FILES_STAGE_HEAD_BYTES if self._max_bytes is None else min(FILES_STAGE_HEAD_BYTES, self._max_bytes)
            if len(self._head) + len(data) <= held:
                self._head += data
                return
            # the path is not coming soon: the rest goes to disk, never into memory
            self._writer = self._service.staging_writer(self._max_bytes)
            self._staged = True
            self._flush_head()
        self._writer.write(data)

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head:
            self._writer.write(head)

    def _end_part(self, name: Optional[str]) -> None:
        if name == "path":
            text = self._field_text("path")
            if self._path is not None and text != self._path:
                raise BadRequest("upload path given twice: %r and %r" % (self._path, text))
            self._path = text
            if self._head is not None:      # the file came first, and is still in memory: to its target now
                self._writer = self._open(text)
                self._flush_head()
        elif name == "overwrite":
            text = self._field_text("overwrite").strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise BadRequest("overwrite must be true or false")
            self._overwrite = text in ("true", "1")
        self._part, self._field = None, bytearray()

    def _field_text(self, name: str) -> str:
        try:
            return bytes(self._field).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("form field %r is not UTF-8" % name)

    def finish(self) -> Dict[str, Any]:
        """The body is complete: give the file its name; the answer of api.md §11."""
        try:
            if self._parser is not None:
                self._parser.close()
                if self._writer is None and self._head is None:
                    raise BadRequest("multipart upload has no `file` part")
                if self._writer is None:
                    self._writer = self._open(self._required_path())
                    self._flush_head()
                if self._staged:
                    self._writer._overwrite = self._overwrite
                    walk = functools.partial(self._service.locate_for_write, self._required_path(), self._filename)
                    with self._site.enter(walk) as target:
                        self._writer = self._writer.adopt(target)   # on failure it aborts itself
            self._writer._overwrite = self._overwrite
            size = self._writer.commit()
            self._site.end(failed=False)
            return self._service.done(self._writer.path, "file uploaded", size=size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Idempotent: after a commit there is nothing left to remove."""
        if self._writer is not None:
            self._writer.abort()
        self._head = None
        self._site.end(failed=True)


# ----------------------------------------------------------------------------
# Downloads: what socket.sendfile needs, ranges, tar streams
# ----------------------------------------------------------------------------


class _DownloadPlan(_Plain):
    """What the endpoint sends: `count` bytes of `fd` from `offset` (fd None:
    a body-less answer), with these status and headers. The receiver owns fd."""

    status: int
    fd: Optional[int]
    offset: int
    count: int
    headers: Dict[str, str]
    content_type: str


# The validators: an ETag from inode, size and mtime in ns changes whenever the
# file is replaced (a new inode) or written, which is what a resuming client needs.
def _parse_range(value: str, size: int) -> Optional[Tuple[int, int]]:
    """RFC 9110 §14.1.2 single range -> (first, last) inclusive; None: ignore the
    header (not bytes, several ranges, or malformed: a server may send it all);
    unsatisfiable raises 416 with `bytes */SIZE`."""
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None             # "5-2" is not a range at all (§14.1.1): ignored
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(int(last), size - 1) if last else size - 1


def _unsatisfiable(size: int) -> AgentError:
    return AgentError("range not satisfiable (size %d)" % size, status=416, code="RANGE_NOT_SATISFIABLE",
                      headers={"Content-Range": "bytes */%d" % size})


def _etag(st: os.stat_result) -> str:
    return '"%x-%x-%x"' % (st.st_ino, st.st_size, st.st_mtime_ns)


def _content_disposition(name: str) -> str:
    """RFC 6266: an ASCII fallback and the exact UTF-8 name."""
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    quoted = urllib.parse.quote(name.encode("utf-8", "surrogateescape"), safe="")
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (ascii_name, quoted)


def _guess_type(name: str) -> str:
    kind, encoding = mimetypes.guess_type(name, strict=False)
    if encoding or not kind:
        return "application/octet-stream"   # a .gz is bytes to the client, not text/plain
    return kind


def _download_plan(target: _Target, fd: int, st: os.stat_result, headers: Callable[[str], Optional[str]]) -> _DownloadPlan:
    """The answer to GET /files/download for an open regular file. Takes fd."""
    name = posixpath.basename(target.path) or "download"
    tag = _etag(st)
    modified = email.utils.formatdate(st.st_mtime, usegmt=True)
    base = {"ETag": tag, "Last-Modified": modified, "Accept-Ranges": "bytes",
            "Content-Disposition": _content_disposition(name)}
    kind = _guess_type(name)
    match = headers("If-None-Match")
    if match is not None and (match.strip() == "*" or tag in [m.strip() for m in match.split(",")]):
        os.close(fd)
        return _DownloadPlan(304, None, 0, 0, {"ETag": tag, "Last-Modified": modified}, kind)
    span = None
    asked = headers("Range")
    if asked is not None and _if_range_holds(headers("If-Range"), tag, modified):
        try:
            span = _parse_range(asked, st.st_size)
        except AgentError:
            os.close(fd)
            raise
    if span is None:
        return _DownloadPlan(200, fd, 0, st.st_size, base, kind)
    base["Content-Range"] = "bytes %d-%d/%d" % (span[0], span[1], st.st_size)
    return _DownloadPlan(206, fd, span[0], span[1] - span[0] + 1, base, kind)


def _if_range_holds(value: Optional[str], tag: str, modified: str) -> bool:
    """RFC 9110 §13.1.5: a Range applies only if If-Range (when sent) still matches."""
    return value is None or value.strip() in (tag, modified)


class _TarWriter:
    """Bytes of a tar (PAX) stream, optionally gzipped, produced in pieces."""

    def __init__(self, gzip: bool) -> None:
        self._gz = zlib.compressobj(FILES_TAR_GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None
        self.written = 0

    def out(self, data: bytes) -> bytes:
        self.written += len(data)
        return self._gz.compress(data) if self._gz else data

    def header(self, info: tarfile.TarInfo) -> bytes:
        import tarfile      # here: only tar downloads need it (~2 ms of start-up)
        return self.out(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def end(self) -> bytes:
        """Two zero blocks, padded to tar's 10 KiB record, and the gzip trailer."""
        import tarfile
        body = b"\0" * (2 * tarfile.BLOCKSIZE)
        total = self.written + len(body)
        body += b"\0" * (-total % tarfile.RECORDSIZE)
        data = self.out(body)
        return data + self._gz.flush() if self._gz else data


class _TarStream:
    """A directory download: iterate for the bytes; close() releases the
    directory even if iteration never started (a generator that never ran
    would not run its finally)."""

    def __init__(self, top: _Target, gzip: bool) -> None:
        self._top = top
        self.gzip = gzip
        self.name = (posixpath.basename(top.path) or "root") + (".tar.gz" if gzip else ".tar")
        self.content_type = "application/gzip" if gzip else "application/x-tar"
        self._gen = _tar_stream(top, gzip)

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def close(self) -> None:
        self._gen.close()
        self._top.close()


def _tar_stream(top: _Target, gzip: bool) -> Iterator[bytes]:
    """A streamed tar of the directory `top` (open, name None), members named
    `<dirname>/...`: directories (empty ones too), regular files, symlinks as
    links (never followed), fifos and devices as such; sockets skipped. The
    walk holds one descriptor per level, reads each file in FILES_CHUNK_BYTES
    pieces, and stores a file that changed size while read at its header's
    size (cut or zero-padded, with a warning), as GNU tar does. Owns top."""
    import tarfile
    writer = _TarWriter(gzip)
    entries = _Entries()
    base = posixpath.basename(top.path) or "root"
    stack: List[Tuple[int, Any, str]] = []
    try:
        st = os.fstat(top.dir_fd)
        yield writer.header(_tar_info(base + "/", st, entries, tarfile.DIRTYPE))
        stack.append((top.dir_fd, os.scandir(top.dir_fd), base))
        while stack:
            fd, items, prefix = stack[-1]
            entry = next(items, None)
            if entry is None:
                stack.pop()
                items.close()
                if fd != top.dir_fd:
                    os.close(fd)
                continue
            for piece in _tar_member(writer, entries, fd, entry, prefix, stack):
                yield piece
        yield writer.end()
    finally:
        for fd, items, _ in stack:
            items.close()
            if fd != top.dir_fd:
                _close_quietly(fd)
        top.close()


def _tar_info(name: str, st: os.stat_result, entries: _Entries, kind: bytes) -> tarfile.TarInfo:
    import tarfile
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), st.st_mtime
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname, info.gname = entries._user(st.st_uid), entries._group(st.st_gid)
    return info


def _tar_member(writer: _TarWriter, entries: _Entries, fd: int, entry: "os.DirEntry[str]", prefix: str,
                stack: List[Tuple[int, Any, str]]) -> Iterator[bytes]:
    import tarfile
    name = prefix + "/" + entry.name
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return                      # gone since listed
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        try:
            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            log.warning("tar: skipped directory %s: %s", name, exc)
            return
        yield writer.header(_tar_info(name + "/", st, entries, tarfile.DIRTYPE))
        stack.append((sub, os.scandir(sub), name))
    elif stat.S_ISLNK(mode):
        info = _tar_info(name, st, entries, tarfile.SYMTYPE)
        info.linkname = os.readlink(entry.name, dir_fd=fd)
        yield writer.header(info)
    elif stat.S_ISREG(mode):
        for piece in _tar_file(writer, entries, fd, entry.name, name):
            yield piece
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = tarfile.FIFOTYPE if stat.S_ISFIFO(mode) else tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info = _tar_info(name, st, entries, kind)
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        yield writer.header(info)


def _tar_file(writer: _TarWriter, entries: _Entries, dir_fd: int, own: str, name: str) -> Iterator[bytes]:
    import tarfile
    try:
        fd = os.open(own, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        log.warning("tar: skipped %s: %s", name, exc)
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return                  # swapped for something else since listed
        info = _tar_info(name, st, entries, tarfile.REGTYPE)
        info.size = st.st_size
        yield writer.header(info)
        left = st.st_size              # the header promised this many bytes: exactly these follow
        while left:
            data = os.read(fd, min(left, FILES_CHUNK_BYTES))
            if not data:
                log.warning("tar: %s shrank while read; padded with zeros", name)
                data = b"\0" * min(left, FILES_CHUNK_BYTES)
            left -= len(data)
            yield writer.out(data)
        yield writer.out(b"\0" * (-st.st_size % tarfile.BLOCKSIZE))
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Watching: inotify (through ctypes) and a polling fallback
# ----------------------------------------------------------------------------

_IN_MODIFY, _IN_ATTRIB, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR, _IN_EXCL_UNLINK, _IN_ISDIR = 0x4000, 0x8000, 0x1000000, 0x4000000, 0x40000000
_WATCH_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
               | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR | _IN_EXCL_UNLINK)
_INOTIFY_EVENT = struct.Struct("iIII")
WATCH_READ_BYTES = 64 * 1024            # one read() of the inotify fd: at most 4096 events, a bounded batch
WATCH_READER_IDLE_S = 1.0               # the reader's longest wait (close() wakes it at once)
WATCH_CLOSE_JOIN_S = 2.0                # close() waits this long for the reader to leave


class _Inotify:
    """The four inotify calls, through ctypes (the stdlib has no binding)."""

    def __init__(self) -> None:
        libc = _libc()
        if not hasattr(libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._libc = libc
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd = fd

    def add(self, dir_fd: int) -> int:
        """Watch the directory open as dir_fd: through /proc/self/fd, the very
        inode walked safely, never a path that could be swapped meanwhile."""
        wd = self._libc.inotify_add_watch(self.fd, b"/proc/self/fd/%d" % dir_fd, _WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return wd

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> List[Tuple[int, int, int, str]]:
        """(wd, mask, cookie, name) of the events one read() returns ([] if
        none): a bounded batch, however fast the kernel queues them."""
        out: List[Tuple[int, int, int, str]] = []
        try:
            data = os.read(self.fd, WATCH_READ_BYTES)
        except BlockingIOError:
            return out
        offset = 0
        while offset < len(data):
            wd, mask, cookie, size = _INOTIFY_EVENT.unpack_from(data, offset)
            raw = data[offset + 16:offset + 16 + size].split(b"\0", 1)[0]
            out.append((wd, mask, cookie, os.fsdecode(raw)))
            offset += 16 + size
        return out

    def close(self) -> None:
        _close_quietly(self.fd)


def _change(path: str, event: str, is_dir: bool, old: Optional[str] = None) -> Dict[str, Any]:
    out = {"type": "change", "path": path, "event": event, "timestamp": _rfc3339(time.time()),
           "is_directory": is_dir}
    if old is not None:
        out["old_path"] = old
    return out


class _EventQueue:
    """Changes on their way to the client, bounded: a burst of `modified` for
    one path (one per write() call) within WATCH_COALESCE_S becomes one, as
    does `modified` right after `created`; at most WATCH_MAX_PENDING wait.

    A loss (this queue full, the kernel's queue overflowing, a directory that
    cannot be watched) puts ONE {"type": "overflow"} in the stream where it
    began; until the client takes it, further losses join it and `dropped`
    counts the changes this queue threw away. With `rescans` (inotify) the
    message is held back, and what follows it, until the watcher has walked
    its tree again (rescanned()), so the client learns what that found.
    Not thread-safe: the watcher serialises access."""

    def __init__(self, rescans: bool = False) -> None:
        self._batch: List[Dict[str, Any]] = []
        self._open: Dict[str, int] = {}     # path -> index of its created/modified in the batch
        self._since = 0.0
        self._ready: collections.deque = collections.deque()
        self._rescans = rescans
        self._marker: Optional[Dict[str, Any]] = None   # the overflow message not taken yet
        self._held = False                  # the marker waits for a rescan: take() stops at it

    def add(self, event: Dict[str, Any], now: float) -> bool:
        """Queue a change or an overflow; True when the watcher is to rescan
        (a new loss, or the kernel's: directory creations may be among it)."""
        if event.get("type") == "overflow":
            began = self._lost()
            if event.get("kernel"):
                self._marker["kernel"] = True
            return self._hold(began or bool(event.get("kernel")))
        path, kind = event["path"], event["event"]
        if kind == "modified" and path in self._open:
            return False
        if len(self._batch) + len(self._ready) >= WATCH_MAX_PENDING:
            began = self._lost()
            self._marker["dropped"] += 1
            return self._hold(began)
        if not self._batch:
            self._since = now
        self._batch.append(event)
        if kind in ("created", "modified"):
            self._open[path] = len(self._batch) - 1
        else:
            self._open.pop(path, None)
            self._open.pop(event.get("old_path"), None)
        return False

    def _lost(self) -> bool:
        """The overflow message, made where the loss begins; True if it is new."""
        if self._marker is not None:
            return False
        self._ready.extend(self._batch)     # what came before the loss goes before the message
        self._batch, self._open = [], {}
        self._marker = {"type": "overflow", "timestamp": _rfc3339(time.time()), "dropped": 0}
        self._ready.append(self._marker)
        return True

    def _hold(self, rescan: bool) -> bool:
        if rescan and self._rescans:
            self._held = True
            return True
        return False

    def rescanned(self, info: Dict[str, Any]) -> None:
        """The watcher walked its tree again: the overflow message says what it found, and may go."""
        if self._marker is not None:
            self._marker["rescanned"] = info
        self._held = False

    def release(self, now: float, force: bool = False) -> None:
        if self._batch and (force or now - self._since >= WATCH_COALESCE_S):
            self._ready.extend(self._batch)
            self._batch, self._open = [], {}

    def due(self) -> Optional[float]:
        """When the open batch is to be released, if there is one."""
        return self._since + WATCH_COALESCE_S if self._batch else None

    def take(self) -> List[Dict[str, Any]]:
        out = []
        while self._ready:
            if self._ready[0] is self._marker:
                if self._held:
                    break
                self._marker = None         # taken: the next loss makes a new message
            out.append(self._ready.popleft())
        return out


def _walk_dir_fds(pending: List[Tuple[int, str]], visit: Callable[[int, str, List[Tuple[int, str]]], None]) -> None:
    """Visit each (directory fd, path) of ``pending``, depth first; a visit may
    push the subdirectories it opened. Each fd is closed after its visit, and
    the ones not reached when a visit raises."""
    try:
        while pending:
            fd, path = pending.pop()
            try:
                visit(fd, path, pending)
            finally:
                os.close(fd)
    finally:
        for fd, _ in pending:
            _close_quietly(fd)


class _WatcherBase:
    """What the WebSocket endpoint drives: pull(timeout) -> events, close().
    One thread pulls; close() may come from any thread (server shutdown) and
    wakes a pull in progress. The descriptors are released by whoever leaves
    last (a pull, close() itself, the inotify reader), never under another's feet."""

    def __init__(self, path: str, rescans: bool = False) -> None:
        self.path = path
        self._queue = _EventQueue(rescans)
        self._lock = threading.Lock()       # guards _closed, _holders and _released
        self._closed = False
        self._holders = 0                   # pulls, a close() and the reader using the descriptors now
        self._released = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def pull(self, timeout: float) -> List[Dict[str, Any]]:
        """The changes available within `timeout` seconds (possibly none)."""
        if not self._enter():
            return []
        try:
            return self._pull(time.monotonic() + timeout)
        finally:
            self._leave()

    def _enter(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._holders += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._closed and self._holders == 0 and not self._released
            self._released = self._released or last
        if last:
            self._release()

    def _wait(self, fds: List[int], deadline: float) -> List[int]:
        """poll() the given fds and the wake pipe until deadline; the fds ready."""
        poller = select.poll()
        for fd in fds + [self._wake_r]:
            poller.register(fd, select.POLLIN)
        delay = max(0.0, deadline - time.monotonic())
        ready = [fd for fd, _ in poller.poll(delay * 1000)]
        return [fd for fd in ready if fd != self._wake_r]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._holders += 1              # the wake pipe must stay open for the write below
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._woken()
        self._leave()

    def _woken(self) -> None:
        """close() was called: wake what waits other than on the pipe."""

    def _release(self) -> None:
        _close_quietly(self._wake_r)
        _close_quietly(self._wake_w)
        self._release_own()

    def _release_own(self) -> None:
        pass

    def _pull(self, deadline: float) -> List[Dict[str, Any]]:
        raise NotImplementedError


class _InotifyWatcher(_WatcherBase):
    """Changes under a directory from inotify. Subdirectories (recursive) get
    their own watch as they appear, and what they held before their watch
    existed is reported as created. Paired IN_MOVED_FROM/IN_MOVED_TO become
    `renamed` with old_path; a temp file of the agent renamed over a name is
    that name `modified` (or `created`), and the temp files themselves, like
    the kernel's O_TMPFILE inodes, are never reported.

    A reader thread of its own drains the inotify fd and translates, whether
    or not the client takes messages, so the kernel's queue does not fill
    behind a slow client and every new directory gets its watch; the changes
    wait in the bounded _EventQueue. After any loss (the kernel's
    IN_Q_OVERFLOW, or the queue's own) the tree is walked again (_rescan):
    directories not watched get a watch, watches of directories gone are
    removed, so the watch is whole again, and the overflow message says so.
    """

    backend = "inotify"

    def __init__(self, policy: _PathPolicy, top: _Target, *, recursive: bool, only: Optional[str] = None,
                 reader: bool = True) -> None:
        self._ino = _Inotify()      # first: without it there is nothing to release
        super().__init__(top.path if only is None else _child_path(top.path, only), rescans=True)
        self._policy = policy
        self._recursive = recursive
        self._only = only
        self._top = top.path
        # the reader's own (and __init__'s, before it starts): no lock
        self._dirs: Dict[int, str] = {}     # wd -> display path of its directory
        self._moves: "collections.OrderedDict[int, Tuple[str, bool, float]]" = collections.OrderedDict()
        self._out: List[Dict[str, Any]] = []    # translated, not yet in the queue
        self._rescanning = False
        self._unwatched = 0                 # directories the last walk could not watch
        self._events = threading.Condition(threading.Lock())  # guards _queue: the reader adds, pull takes
        try:
            self._watch_tree(top.dir_fd, top.path, report=False)
        except BaseException:
            self._release()
            raise
        self._flush(fresh=self._walked({}))     # a loss at start: this walk was its rescan
        self._reader: Optional[threading.Thread] = None
        if reader:                  # (tests drive _read_once themselves)
            self._holders += 1      # the reader's hold, dropped when it ends
            self._reader = threading.Thread(target=self._run, name="hopx-watch-%d" % self._ino.fd, daemon=True)
            try:
                self._reader.start()
            except BaseException:   # no thread to be had: nothing may stay open
                self._release()
                raise

    def _emit(self, event: Dict[str, Any]) -> None:
        self._out.append(event)

    def _watch_tree(self, fd: int, path: str, report: bool) -> None:
        """Watch the directory open as fd and (recursive) every directory under
        it; report=True: say `created` for what is found (it came unseen)."""
        _walk_dir_fds([(os.dup(fd), path)], lambda dfd, dpath, pending: self._watch_one(dfd, dpath, report, pending))

    def _watch_one(self, dfd: int, dpath: str, report: bool, pending: List[Tuple[int, str]]) -> None:
        # the kernel's budget (fs.inotify.max_user_watches) is shared by the whole user: one
        # watcher must not take it all, and what is not watched is said (overflow), not hidden
        if len(self._dirs) >= WATCH_MAX_DIRS:
            log.warning("watch of %s: more than %d directories; some are not watched", self._top, WATCH_MAX_DIRS)
            self._not_watched()
            return
        try:
            self._dirs[self._ino.add(dfd)] = dpath
            if self._recursive:
                self._scan(dfd, dpath, report, pending)
        except OSError as exc:
            if not self._dirs:
                raise               # not even the top: the caller falls back to polling
            log.info("watch of %s: cannot watch %s: %s", self._top, dpath, exc)
            self._not_watched()

    def _not_watched(self) -> None:
        self._unwatched += 1
        if not self._rescanning:    # a rescan reports its count instead (and must not ask for another)
            self._emit({"type": "overflow"})

    def _scan(self, dfd: int, dpath: str, report: bool, pending: List[Tuple[int, str]]) -> None:
        with os.scandir(dfd) as items:
            for entry in items:
                if _TEMP_NAME.match(entry.name):
                    continue
                child = _child_path(dpath, entry.name)
                is_dir = entry.is_dir(follow_symlinks=False)
                if report:
                    self._emit(_change(child, "created", is_dir))
                if is_dir:
                    try:
                        pending.append((os.open(entry.name, _DIR_FLAGS, dir_fd=dfd), child))
                    except OSError:
                        pass

    def fileno(self) -> int:
        return self._ino.fd

    # -- the reader: drains the kernel's queue into ours, whatever the client does

    def _run(self) -> None:
        try:
            while not self._closed:
                self._read_once(time.monotonic() + WATCH_READER_IDLE_S)
        except Exception:
            log.exception("watch of %s: the reader failed; the watch ends", self._top)
            self.close()            # the session sees the watch end instead of hearing nothing
        finally:
            self._leave()

    def _read_once(self, deadline: float) -> None:
        """Wait for events (or a pending move's end) until deadline, translate, queue."""
        due = self._moves_due()
        if self._wait([self._ino.fd], deadline if due is None else min(deadline, due)):
            for raw in self._ino.read():
                self._translate(*raw)
        self._expire_moves(time.monotonic())
        self._flush()

    def _flush(self, fresh: Optional[Dict[str, Any]] = None) -> None:
        """Queue what was translated; a loss that calls for a rescan gets one
        (fresh: the tree was just walked, which is as good)."""
        out, self._out = self._out, []
        if not out:
            return
        now = time.monotonic()
        with self._events:
            rescan = [self._queue.add(event, now) for event in out]
            self._events.notify_all()
        if any(rescan):
            info = fresh if fresh is not None else self._rescan()
            with self._events:
                self._queue.rescanned(info)
                self._events.notify_all()

    def _rescan(self) -> Dict[str, Any]:
        """Events were lost, maybe a directory's IN_CREATE or IN_IGNORED among
        them: walk the tree again from the top (through the policy), watch
        what is not watched, unwatch what is gone, and take every directory's
        path as it is now. Nothing is reported as created: the overflow
        message tells the client to look again itself."""
        before, self._dirs = self._dirs, {}
        self._rescanning, self._unwatched = True, 0
        try:
            with self._policy.open_dir(self._top) as top:
                self._watch_tree(top.dir_fd, self._top, report=False)
        except (AgentError, OSError) as exc:
            log.info("watch of %s: rescan: %s", self._top, exc)     # gone: nothing is left to watch
        finally:
            self._rescanning = False
        for wd in before.keys() - self._dirs.keys():
            self._ino.remove(wd)    # a directory already gone: EINVAL, ignored
        return self._walked(before)

    def _walked(self, before: Dict[int, str]) -> Dict[str, Any]:
        return {"path": self._top, "directories": len(self._dirs),
                "added": len(self._dirs.keys() - before.keys()),
                "removed": len(before.keys() - self._dirs.keys()), "unwatched": self._unwatched}

    # -- the client's side

    def _pull(self, deadline: float) -> List[Dict[str, Any]]:
        with self._events:
            while True:
                now = time.monotonic()
                self._queue.release(now)
                out = self._queue.take()
                if out or now >= deadline or self._closed:
                    return out
                due = self._queue.due()
                self._events.wait(min(deadline, due if due is not None else deadline) - now)

    def _woken(self) -> None:
        with self._events:
            self._events.notify_all()

    def close(self) -> None:
        """Close, and give the reader WATCH_CLOSE_JOIN_S to leave (it is woken
        at once), so the descriptors are gone when this returns."""
        super().close()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(WATCH_CLOSE_JOIN_S)

    def _moves_due(self) -> Optional[float]:
        return next(iter(self._moves.values()))[2] if self._moves else None

    def _expire_moves(self, now: float) -> None:
        """A move whose other half did not come: it left the tree (deleted)."""
        while self._moves:
            cookie, (path, is_dir, due) = next(iter(self._moves.items()))
            if due > now:
                return
            del self._moves[cookie]
            if self._wanted(path) and not _TEMP_NAME.match(posixpath.basename(path)):
                self._forget(path)
                self._emit(_change(path, "deleted", is_dir))

    def _translate(self, wd: int, mask: int, cookie: int, name: str) -> None:
        now = time.monotonic()
        if mask & _IN_Q_OVERFLOW:
            self._emit({"type": "overflow", "kernel": True})    # the queue rescans after it
            return
        base = self._dirs.get(wd)
        if mask & _IN_IGNORED:
            self._dirs.pop(wd, None)
            return
        if base is None:
            return
        if not name:
            if base == self._top and mask & (_IN_DELETE_SELF | _IN_MOVE_SELF) and self._only is None:
                self._emit(_change(base, "deleted", True))
            return
        self._named(wd, base, mask, cookie, name, now)

    def _named(self, wd: int, base: str, mask: int, cookie: int, name: str, now: float) -> None:
        path, is_dir = _child_path(base, name), bool(mask & _IN_ISDIR)
        temp = bool(_TEMP_NAME.match(name))
        if mask & _IN_MOVED_FROM:
            # held until its IN_MOVED_TO (same cookie) or the window ends (then it left the tree)
            self._moves[cookie] = (path, is_dir, now + WATCH_COALESCE_S)
        elif mask & _IN_MOVED_TO:
            self._moved_to(path, is_dir, self._moves.pop(cookie, None), temp, now)
        elif self._only is not None and name != self._only:
            return
        elif temp or (_KERNEL_TMPFILE_NAME.match(name) and not self._exists(path)):
            return                      # our temp files, and O_TMPFILE inodes (named "#<ino>" by inotify)
        elif mask & _IN_CREATE:
            self._emit(_change(path, "created", is_dir))
            if is_dir and self._recursive:
                self._watch_new(path)
        elif mask & _IN_DELETE:
            self._emit(_change(path, "deleted", is_dir))
        elif mask & (_IN_MODIFY | _IN_ATTRIB):
            self._emit(_change(path, "modified", is_dir))

    def _moved_to(self, path: str, is_dir: bool, source: Optional[Tuple[str, bool, float]], temp: bool,
                  now: float) -> None:
        if temp:
            return                  # a staged upload arriving beside its target
        if source is None:
            if self._wanted(path):
                self._emit(_change(path, "created", is_dir))
            if is_dir and self._recursive:
                self._watch_new(path)
            return
        old = source[0]
        name = posixpath.basename(old)
        if not self._wanted(path) and not self._wanted(old):
            return
        if _TEMP_NAME.match(name):
            self._emit(_change(path, "created" if name.endswith(".c") else "modified", is_dir))
        else:
            self._renamed(old, path)
            self._emit(_change(path, "renamed", is_dir, old))
        if is_dir and self._recursive and _TEMP_NAME.match(name):
            self._watch_new(path)

    def _wanted(self, path: str) -> bool:
        """A one-file watch reports that name only."""
        return self._only is None or path == self.path

    def _renamed(self, old: str, new: str) -> None:
        """A directory moved within the tree: its watches keep working, with new paths."""
        for wd, path in list(self._dirs.items()):
            if path == old or path.startswith(old + "/"):
                self._dirs[wd] = new + path[len(old):]

    def _forget(self, gone: str) -> None:
        """A directory moved out of the tree: stop watching it and what is under it."""
        for wd, path in list(self._dirs.items()):
            if path == gone or path.startswith(gone + "/"):
                self._ino.remove(wd)
                del self._dirs[wd]

    def _exists(self, path: str) -> bool:
        # a lookup through the policy: the watcher never touches a path the walk did not approve
        try:
            with self._policy.locate(path, follow=False) as target:
                return target.lstat() is not None
        except AgentError:
            return False

    def _watch_new(self, path: str) -> None:
        try:
            with self._policy.open_dir(path) as target:
                self._watch_tree(target.dir_fd, path, report=True)
        except AgentError:
            pass                    # gone again, or now outside the roots: nothing to watch
        except OSError as exc:      # out of descriptors, say: not watched, and said so
            log.info("watch of %s: cannot watch %s: %s", self._top, path, exc)
            self._not_watched()

    def _release_own(self) -> None:
        self._ino.close()


class _PollingWatcher(_WatcherBase):
    """The fallback: scan the tree every `interval` seconds and report what
    changed. Renames are recognised by inode; temp files are skipped."""

    backend = "polling"

    def __init__(self, policy: _PathPolicy, top: _Target, *, recursive: bool, only: Optional[str] = None,
                 interval: float = WATCH_POLL_S) -> None:
        super().__init__(top.path if only is None else _child_path(top.path, only))
        self._policy = policy
        self._top = top.path
        self._recursive = recursive
        self._only = only
        self._interval = interval
        self._snapshot = self._scan()
        self._next = time.monotonic() + interval

    def fileno(self) -> Optional[int]:
        return None

    def _pull(self, deadline: float) -> List[Dict[str, Any]]:
        while True:
            now = time.monotonic()
            if now >= self._next:
                self._diff(self._scan(), now)
                self._next = now + self._interval
            self._queue.release(now, force=True)
            out = self._queue.take()
            if out or now >= deadline or self._closed:
                return out
            self._wait([], min(deadline, self._next))

    def _scan(self) -> Dict[str, Tuple[int, int, int, int]]:
        """{path: (inode, mode, size, mtime_ns)} of everything under the top."""
        # the top is walked again each time: a replaced or removed top is seen, never followed blindly
        seen: Dict[str, Tuple[int, int, int, int]] = {}
        try:
            top = self._policy.open_dir(self._top)
        except AgentError:
            return seen             # the directory itself is gone
        pending = [(top.dir_fd, self._top)]
        top.dir_fd = -1
        _walk_dir_fds(pending, lambda fd, base, pending: self._scan_dir(fd, base, seen, pending))
        return seen

    def _scan_dir(self, fd: int, base: str, seen: Dict[str, Tuple[int, int, int, int]],
                  pending: List[Tuple[int, str]]) -> None:
        with os.scandir(fd) as items:
            for entry in items:
                if _TEMP_NAME.match(entry.name) or (self._only is not None and entry.name != self._only):
                    continue
                if len(seen) >= WATCH_MAX_POLL_ENTRIES:
                    self._queue.add({"type": "overflow"}, time.monotonic())
                    return
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = _child_path(base, entry.name)
                seen[path] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
                if self._recursive and stat.S_ISDIR(st.st_mode):
                    try:
                        pending.append((os.open(entry.name, _DIR_FLAGS, dir_fd=fd), path))
                    except OSError:
                        pass

    def _diff(self, now_seen: Dict[str, Tuple[int, int, int, int]], now: float) -> None:
        before = self._snapshot
        self._snapshot = now_seen
        gone = {p: v for p, v in before.items() if p not in now_seen}
        new = {p: v for p, v in now_seen.items() if p not in before}
        # a path gone and another new with the same inode and type, in one scan, is a rename
        by_inode = {(v[0], stat.S_IFMT(v[1])): p for p, v in gone.items()}
        for path in sorted(new):
            info = new[path]
            old = by_inode.pop((info[0], stat.S_IFMT(info[1])), None)
            if old is not None:
                del gone[old]
                self._queue.add(_change(path, "renamed", stat.S_ISDIR(info[1]), old), now)
            else:
                self._queue.add(_change(path, "created", stat.S_ISDIR(info[1])), now)
        for path in sorted(gone):
            self._queue.add(_change(path, "deleted", stat.S_ISDIR(gone[path][1])), now)
        for path in sorted(p for p in now_seen if p in before and now_seen[p] != before[p]):
            if not stat.S_ISDIR(now_seen[path][1]) or now_seen[path][0] != before[path][0]:
                self._queue.add(_change(path, "modified", stat.S_ISDIR(now_seen[path][1])), now)


# ----------------------------------------------------------------------------
# The service: the endpoints' one way in
# ----------------------------------------------------------------------------


def _parse_mode(value: Any, default: Optional[int] = None) -> Optional[int]:
    """"0644", "644", "0o644" or an int (decimal of the octal digits is not
    guessed: 644 as a JSON number means 0o644 only when all digits are octal)."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise BadRequest("mode must be an octal string such as \"0644\"")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not re.fullmatch(r"(0o)?[0-7]{1,4}", value.strip()):
        raise BadRequest("mode must be an octal string such as \"0644\"")
    return int(value.strip().replace("0o", ""), 8)


class _FileService:
    """api.md §11 minus HTTP: every files endpoint is one call here. Owns the
    path policy and the open watchers (closed at shutdown)."""

    def __init__(self, roots: Sequence[str], workdir: str, *, max_read_bytes: int = FILES_MAX_READ_BYTES,
                 max_upload_bytes: Optional[int] = None, owner: Optional[Tuple[int, int]] = None,
                 workspace_alias: Optional[bool] = None, watch_backend: str = "auto") -> None:
        self.policy = _PathPolicy(roots, workdir, workspace_alias=workspace_alias)
        self.max_read_bytes = max_read_bytes
        self.max_upload_bytes = max_upload_bytes
        self.owner = owner          # (uid, gid) for what is made (issue 15's run-as user)
        self.watch_backend = watch_backend
        self.entries = _Entries()
        self._lock = threading.Lock()   # guards _watchers
        self._watchers: List[_WatcherBase] = []
        self.claims = _DirClaims()      # directories holding a write's temp file now

    # -- answers

    @staticmethod
    def done(path: str, message: str, **extra: Any) -> Dict[str, Any]:
        return dict({"success": True, "path": path, "message": message,
                     "timestamp": _rfc3339(time.time())}, **extra)

    # -- reading

    def read(self, path: Any) -> Dict[str, Any]:
        target, fd = self.policy.open_file(path, os.O_RDONLY | os.O_NONBLOCK)
        with target:
            try:
                data = self._read_small(target, fd)
            finally:
                os.close(fd)
        try:
            return {"content": data.decode("utf-8"), "path": target.path, "size": len(data), "encoding": "utf-8"}
        except UnicodeDecodeError:
            return {"content": base64.b64encode(data).decode("ascii"), "path": target.path, "size": len(data),
                    "encoding": "base64"}

    def _read_small(self, target: _Target, fd: int) -> bytes:
        st = self._regular(target, fd)
        chunks, size = [], 0
        # read until EOF, not st_size: a file growing meanwhile is still capped by max_read_bytes
        while True:
            if size > self.max_read_bytes or st.st_size > self.max_read_bytes:
                raise FileError(413, "PAYLOAD_TOO_LARGE", "file is larger than %d bytes; use /files/download: %s"
                                % (self.max_read_bytes, target.path), target.path,
                                download="/files/download?path=" + urllib.parse.quote(target.path, safe=""),
                                max_read_bytes=self.max_read_bytes)
            data = os.read(fd, FILES_CHUNK_BYTES)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            size += len(data)

    @staticmethod
    def _regular(target: _Target, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileError(400, "IS_A_DIRECTORY", "is a directory: %s" % target.path, target.path)
        if not stat.S_ISREG(st.st_mode):
            raise _invalid_path(target.path, "not a regular file")
        return st

    def download(self, path: Any, headers: Callable[[str], Optional[str]], fmt: Optional[str] = None) -> Any:
        """A _DownloadPlan for a file, or a _TarStream for a directory with
        fmt 'tar' / 'tar.gz'."""
        if fmt not in (None, "", "tar", "tar.gz", "tgz"):
            raise BadRequest("format must be tar or tar.gz")
        target, fd = self.policy.open_file(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return self._tar(target, fd, fmt)
            self._regular(target, fd)
            os.set_blocking(fd, True)
            return _download_plan(target, fd, st, headers)
        except BaseException:
            _close_quietly(fd)
            raise
        finally:
            target.close()

    def _tar(self, target: _Target, fd: int, fmt: Optional[str]) -> _TarStream:
        if not fmt:
            raise FileError(400, "IS_A_DIRECTORY", "is a directory (add ?format=tar or tar.gz): %s"
                            % target.path, target.path)
        return _TarStream(_Target(fd, None, target.path, target.real, target.root), fmt != "tar")

    def list(self, path: Any = None, *, recursive: bool = False, depth: Optional[int] = None,
             limit: Optional[int] = None, offset: int = 0, as_json: bool = False) -> Dict[str, Any]:
        """A listing; with as_json the entries are JSON texts (the endpoint joins them)."""
        if depth is not None and depth < 1 or offset < 0 or limit is not None and limit < 0:
            raise BadRequest("depth must be >= 1, limit and offset >= 0")
        max_depth = depth if depth is not None else (float("inf") if recursive else 1)
        limit = FILES_MAX_LIST_ENTRIES if limit is None else min(limit, FILES_MAX_LIST_ENTRIES)
        with self.policy.open_dir(self.policy.workdir if path is None else path) as top:
            try:
                files, more = _Listing(self.entries, max_depth, offset, limit, as_json=as_json).run(top)
            except OSError as exc:
                raise _os_failure(exc, top.path)
        return {"files": files, "path": top.path, "count": len(files), "truncated": more}

    def stat(self, path: Any) -> Dict[str, Any]:
        with self.policy.locate(path, follow=False) as target:
            try:
                st = target.lstat()
                link = _readlink_at(target.dir_fd, target.name) if target.name is not None else None
            except OSError as exc:
                raise _os_failure(exc, target.path)
            if st is None:
                raise FileError(404, "FILE_NOT_FOUND", "no such file or directory: %s" % target.path, target.path)
            name = posixpath.basename(target.path) or "/"
            return self.entries.entry(name, target.path, st, link if stat.S_ISLNK(st.st_mode) else None)

    def exists(self, path: Any) -> Dict[str, Any]:
        display, _ = self.policy.normalise(path)
        try:
            with self.policy.locate(path, follow=False) as target:
                st = target.lstat()
        except FileError as exc:
            if exc.code not in ("FILE_NOT_FOUND", "NOT_A_DIRECTORY"):
                raise
            st = None
        except OSError as exc:
            raise _os_failure(exc, display)
        return {"exists": st is not None, "path": display, "is_directory": bool(st and stat.S_ISDIR(st.st_mode))}

    # -- writing

    def site(self) -> _WriteSite:
        """The place of one write, upload or move (end() it: on failure it removes the parents it made)."""
        return _WriteSite(self.claims)

    def locate_for_write(self, path: str, filename: Optional[str] = None,
                         made: Optional[_MadeDirs] = None) -> _Target:
        """The target of a write: parents made (recorded in `made`); a path ending in '/' or naming a
        directory, with a filename (multipart), means that file in it."""
        target = self.policy.locate(path, follow=True, create=0o755, owner=self.owner, made=made)
        if filename is not None and (path.endswith("/") or _is_dir(target)):
            name = posixpath.basename(filename.replace("\\", "/"))
            if name in ("", ".", ".."):
                target.close()
                raise _invalid_path(filename, "upload filename is not a file name")
            inner = _child_path(target.path, name)
            target.close()
            return self.policy.locate(inner, follow=True, create=0o755, owner=self.owner, made=made)
        return target

    def write(self, path: Any, content: bytes, *, mode: Optional[int] = None, overwrite: bool = True,
              append: bool = False) -> Dict[str, Any]:
        if append:
            appended = self._append(path, content)
            if appended is not None:
                return appended
        site, failed = self.site(), True
        try:
            with site.enter(functools.partial(self.locate_for_write, path)) as target:
                writer = _AtomicWriter(target, mode=mode, overwrite=overwrite, owner=self.owner)
            with writer:
                writer.write(content)
                size = writer.commit()
            failed = False
        finally:
            site.end(failed)        # failed: the parents this write made go too
        return self.done(writer.path, "file written", size=size)

    def _append(self, path: Any, content: bytes) -> Optional[Dict[str, Any]]:
        try:
            target, fd = self.policy.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except FileError as exc:
            if exc.code == "FILE_NOT_FOUND":
                return None         # appending to nothing makes the file, atomically
            raise
        with target:
            try:
                self._regular(target, fd)
                size = _append(target, fd, content)
            finally:
                os.close(fd)
        return self.done(target.path, "file appended", size=size)

    def upload(self, *, path: Optional[str], content_type: Optional[str],
               content_length: Optional[int] = None, overwrite: bool = True) -> _Upload:
        """An upload to feed() with the body's chunks and finish()."""
        boundary = _multipart_boundary(content_type or "")
        limit = self.max_upload_bytes
        if limit is not None and content_length is not None:
            slack = FILES_MULTIPART_SLACK_BYTES if boundary is not None else 0
            if content_length > limit + slack:
                raise FileError(413, "PAYLOAD_TOO_LARGE", "upload is larger than %d bytes" % limit,
                                path or "", max_upload_bytes=limit)
        return _Upload(self, path=path, boundary=boundary, overwrite=overwrite, max_bytes=limit)

    def staging_writer(self, max_bytes: Optional[int]) -> _AtomicWriter:
        """Where a file part that came before its path (and is too big to wait
        in memory) waits: in the root whose file system has the most free
        space. Inside a root, so its disk use is where the operator allowed
        files to go; the most room, because the target is not known yet (on
        the same file system it is then moved, else copied)."""
        with self._roomiest_root() as top:
            holder = _Target(top.dir_fd, _temp_name(), top.path, top.real, top.root)
            return _AtomicWriter(holder, overwrite=True, max_bytes=max_bytes, owner=self.owner)

    def _roomiest_root(self) -> _Target:
        """The writable root with the most space free to us (f_bavail); ties: the first configured."""
        best: Optional[_Target] = None
        room = -1
        for root in self.policy.roots:
            try:
                top = self.policy.open_dir(root.real)
            except AgentError:
                continue            # gone or replaced: not a place to stage
            try:
                st = os.fstatvfs(top.dir_fd)
            except OSError:
                top.close()
                continue
            free = -1 if st.f_flag & os.ST_RDONLY else st.f_bavail * st.f_frsize
            if free > room:
                if best is not None:
                    best.close()
                best, room = top, free
            else:
                top.close()
        return best if best is not None else self.policy.open_dir(self.policy.roots[0].real)

    def mkdir(self, path: Any, mode: Optional[int] = None) -> Dict[str, Any]:
        with self.policy.locate(path, follow=True, create=0o755, owner=self.owner) as target:
            if target.name is None:
                return self.done(target.path, "directory exists")
            try:
                self._mkdir_at(target, 0o755 if mode is None else mode, mode is not None)
            except OSError as exc:
                raise _os_failure(exc, target.path)
            return self.done(target.path, "directory created")

    def _mkdir_at(self, target: _Target, mode: int, exact: bool) -> None:
        try:
            os.mkdir(target.name, mode, dir_fd=target.dir_fd)
        except FileExistsError:
            st = target.lstat()
            if st is not None and stat.S_ISDIR(st.st_mode):
                return
            raise FileError(409, "FILE_ALREADY_EXISTS", "a file is in the way: %s" % target.path, target.path)
        if exact or self.owner is not None:
            fd = os.open(target.name, _DIR_FLAGS, dir_fd=target.dir_fd)
            try:
                if exact:
                    os.fchmod(fd, mode)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
            finally:
                os.close(fd)

    def remove(self, path: Any, *, recursive: bool = True) -> Dict[str, Any]:
        with self.policy.locate(path, follow=False) as target:
            self._not_a_root(target, "remove")
            try:
                st = target.lstat()
                if st is None:
                    raise FileError(404, "FILE_NOT_FOUND", "no such file or directory: %s" % target.path, target.path)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(target.name, dir_fd=target.dir_fd)
                elif recursive:
                    _rmtree_at(target.dir_fd, target.name)
                else:
                    os.rmdir(target.name, dir_fd=target.dir_fd)
            except OSError as exc:
                raise _os_failure(exc, target.path)
            return self.done(target.path, "removed")

    def _not_a_root(self, target: _Target, what: str) -> None:
        if target.name is None or self.policy.holds_root(target.real):
            raise _not_allowed(target.path, "cannot %s an allowed root or a directory holding one" % what)

    def move(self, source: Any, destination: Any, *, overwrite: bool = False) -> Dict[str, Any]:
        site, failed = self.site(), True
        try:
            with self.policy.locate(source, follow=False) as src:
                self._not_a_root(src, "move")
                walk = functools.partial(self.policy.locate, destination, follow=False, create=0o755,
                                         owner=self.owner)
                with site.enter(walk) as dst:
                    self._move_into(src, dst, overwrite)
            failed = False
        finally:
            site.end(failed)        # failed: the parents this move made go too
        return self.done(dst.path, "moved", source=src.path, destination=dst.path)

    def _move_into(self, src: _Target, dst: _Target, overwrite: bool) -> None:
        self._not_a_root(dst, "replace")
        if src.lstat() is None:
            raise FileError(404, "FILE_NOT_FOUND", "no such file or directory: %s" % src.path, src.path)
        try:
            self._rename(src, dst, overwrite)
        except OSError as exc:
            raise self._move_failure(exc, src, dst)

    @staticmethod
    def _move_failure(exc: OSError, src: _Target, dst: _Target) -> AgentError:
        if exc.errno == errno.EEXIST or exc.errno == errno.ENOTEMPTY:
            existing = dst.lstat()
            if existing is not None and stat.S_ISDIR(existing.st_mode) and exc.errno == errno.ENOTEMPTY:
                return FileError(409, "DIRECTORY_NOT_EMPTY", "destination is a directory that is not empty: %s"
                                 % dst.path, dst.path)
            return FileError(409, "FILE_ALREADY_EXISTS", "destination exists: %s" % dst.path, dst.path)
        if exc.errno == errno.EINVAL:
            return _invalid_path(dst.path, "cannot move a directory into itself")
        return _os_failure(exc, dst.path if exc.errno in (errno.EISDIR, errno.ENOTDIR) else src.path)

    def _rename(self, src: _Target, dst: _Target, overwrite: bool) -> None:
        try:
            if overwrite:
                os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)
            else:
                _rename_noreplace(src.dir_fd, src.name, dst.dir_fd, dst.name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._move_across(src, dst, overwrite)

    def _move_across(self, src: _Target, dst: _Target, overwrite: bool) -> None:
        """Another file system: copy beside the destination under a temp name,
        rename it into place, then remove the source."""
        existing = dst.lstat()
        if existing is not None and not overwrite:
            raise FileExistsError(errno.EEXIST, "file exists", dst.name)
        # the copy is built under a temp name (watchers hide it) and appears in one rename;
        # `.c` tells watchers that the name it takes is new (created, not modified)
        temp = _temp_name(new=existing is None)
        try:
            _copy_tree_at(src.dir_fd, src.name, dst.dir_fd, temp)
            if overwrite:
                os.rename(temp, dst.name, src_dir_fd=dst.dir_fd, dst_dir_fd=dst.dir_fd)
            else:
                _rename_noreplace(dst.dir_fd, temp, dst.dir_fd, dst.name)
        except BaseException:
            self._remove_quietly(dst.dir_fd, temp)
            raise
        self._remove_quietly(src.dir_fd, src.name)

    @staticmethod
    def _remove_quietly(dir_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree_at(dir_fd, name)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    # -- watching

    def watch(self, path: Any = None, *, recursive: bool = False, backend: Optional[str] = None,
              interval: float = WATCH_POLL_S) -> _WatcherBase:
        """A watcher of a directory (or of one file: its parent, that name only)."""
        backend = backend or self.watch_backend
        watched = self.policy.workdir if path is None else path
        only = None
        try:
            top = self.policy.open_dir(watched)
        except FileError as exc:
            if exc.code != "NOT_A_DIRECTORY":
                raise
            display, _ = self.policy.normalise(watched)
            top = self.policy.open_dir(posixpath.dirname(display))
            only, recursive = posixpath.basename(display), False
        with top:
            watcher = self._make_watcher(top, recursive, only, backend, interval)
        with self._lock:
            self._watchers = [w for w in self._watchers if not w.closed] + [watcher]
        return watcher

    def _make_watcher(self, top: _Target, recursive: bool, only: Optional[str], backend: str,
                      interval: float) -> _WatcherBase:
        if backend in ("auto", "inotify"):
            try:
                return _InotifyWatcher(self.policy, top, recursive=recursive, only=only)
            except OSError as exc:
                if backend == "inotify":
                    raise _os_failure(exc, top.path)
                log.info("watch of %s: inotify unavailable (%s); polling", top.path, exc)
        return _PollingWatcher(self.policy, top, recursive=recursive, only=only, interval=interval)

    def features(self) -> Dict[str, Any]:
        """api.md §15: what this family adds to /health and /info."""
        return {"file_operations": True, "file_watch": True}

    def close(self, deadline: Optional[float] = None) -> None:
        """Server shutdown: every watcher is woken and closed (each reader is
        given WATCH_CLOSE_JOIN_S to leave; it is woken at once)."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.close()


def _is_dir(target: _Target) -> bool:
    st = target.lstat()
    return st is not None and stat.S_ISDIR(st.st_mode)


# ============================================================================
# Endpoints: files (read, download, write, upload, list, stat, exists, remove, mkdir, move, watch)
# ============================================================================
#
# api.md §11 over HTTP. Each endpoint is a thin reading of the request
# followed by one call to srv.files (_FileService); refusals are FileErrors
# with details.path. Uploads and downloads stream (body="stream", _SendFile,
# _Chunks); /files/watch is a WebSocket driven by a watcher's pull().

WATCH_IDLE_PULL_S = 0.5               # the watch session wakes this often to notice a closed client


def _files_path(req: _Request, name: str = "path") -> str:
    """The ?path= of a request; absent is 400 INVALID_PATH (empty too, later)."""
    value = req.param(name)
    if value is None:
        raise FileError(400, "INVALID_PATH", "missing query parameter %r" % name, "")
    return value


def _query_int(req: _Request, name: str) -> Optional[int]:
    value = req.param(name)
    if value is None or value == "":
        return None
    if not _is_digits(value) or len(value) > 9:
        raise BadRequest("query parameter %r must be a non-negative integer" % name)
    return int(value)


def _body_path(body: Dict[str, Any], field: str = "path") -> str:
    value = body.get(field)
    if value is None:
        raise FileError(400, "INVALID_PATH", "missing field %r" % field, "")
    if not isinstance(value, str):
        raise FileError(400, "INVALID_PATH", "field %r must be a string" % field, str(value)[:200])
    return value


def _files_read(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return srv.files.read(_files_path(req))


def _files_download(srv: "_AgentServer", req: _Request) -> Any:
    found = srv.files.download(_files_path(req), lambda name: req.header(name.lower()), req.param("format"))
    if isinstance(found, _TarStream):
        headers = {"Content-Disposition": _content_disposition(found.name), "Cache-Control": "no-store"}
        if req.method == "HEAD":
            found.close()
            return _Reply(200, b"", found.content_type, headers)
        return _Chunks(found, content_type=found.content_type, headers=headers)
    if found.fd is None:
        return _Reply(found.status, b"", None, found.headers)          # 304
    return _SendFile(os.fdopen(found.fd, "rb", buffering=0), found.offset, found.count, status=found.status,
                     content_type=found.content_type, headers=found.headers)


def _write_content(body: Dict[str, Any]) -> bytes:
    """`content` as bytes: UTF-8 text, or base64 with encoding "base64"."""
    content = body.get("content")
    if content is None:
        raise BadRequest("missing required field 'content'", code="MISSING_PARAMETER")
    if not isinstance(content, str):
        raise BadRequest("field 'content' must be a string")
    encoding = body.get("encoding") or "utf-8"
    if not isinstance(encoding, str) or encoding.lower() not in ("utf-8", "utf8", "text", "base64"):
        raise BadRequest("encoding must be utf-8 or base64")
    if encoding.lower() != "base64":
        return content.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode("".join(content.split()), validate=True)
    except ValueError:
        raise BadRequest("content is not valid base64") from None


def _files_write(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    body = req.json()
    path = _body_path(body)
    overwrite = body.get("overwrite", True)
    if not isinstance(overwrite, bool):
        raise BadRequest("field 'overwrite' must be true or false")
    return srv.files.write(path, _write_content(body), mode=_parse_mode(body.get("mode")),
                           overwrite=overwrite, append=_flag(body, "append"))


def _files_upload(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """multipart/form-data (`path` field and `file` part, either order) or a
    raw body with ?path=; streamed to disk, refused before 100 Continue when
    it cannot succeed (no path, outside the roots, over --max-upload-bytes)."""
    # made before the body is read: a path outside the roots, no path or a Content-Length over the
    # limit is refused now, and the transport then answers instead of sending 100 Continue
    upload = srv.files.upload(path=req.param("path"), content_type=req.header("content-type"),
                              content_length=req.content_length, overwrite=_query_flag(req, "overwrite", True))
    try:
        for chunk in req.read_body(FILES_CHUNK_BYTES):
            upload.feed(chunk)
        return upload.finish()
    finally:
        upload.abort()              # a disconnect or an error: nothing is left behind


def _files_list(srv: "_AgentServer", req: _Request) -> Any:
    recursive = _query_flag(req, "recursive", False)
    depth = _query_int(req, "depth")
    answer = srv.files.list(req.param("path"), recursive=recursive or depth is not None, depth=depth,
                            limit=_query_int(req, "limit"), offset=_query_int(req, "offset") or 0,
                            as_json=True)
    return _Reply(200, _listing_json(answer))


def _listing_json(answer: Dict[str, Any]) -> bytes:
    """The answer around entries that are JSON texts already (_Entries.entry_json)."""
    quote = json.encoder.encode_basestring_ascii
    return ('{"files":[%s],"path":%s,"count":%d,"truncated":%s}'
            % (",".join(answer["files"]), quote(answer["path"]), answer["count"],
               "true" if answer["truncated"] else "false")).encode()


def _files_stat(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return srv.files.stat(_files_path(req))


def _files_exists(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return srv.files.exists(_files_path(req))


def _files_remove(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    return srv.files.remove(_files_path(req), recursive=_query_flag(req, "recursive", True))


def _files_mkdir(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    body = req.json()
    return srv.files.mkdir(_body_path(body), _parse_mode(body.get("mode")))


def _files_move(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    body = req.json()
    source = _body_path(body, "source") if "source" in body else _body_path(body, "from")
    destination = _body_path(body, "destination") if "destination" in body else _body_path(body, "to")
    return srv.files.move(source, destination, overwrite=_flag(body, "overwrite"))


def _files_watch(srv: "_AgentServer", req: _Request) -> _Upgrade:
    return _Upgrade(lambda ws: _watch_session(srv, ws))


def _watch_session(srv: "_AgentServer", ws: "_WebSocket") -> None:
    """The client's first message names what to watch ({"action": "watch",
    "path", "recursive"}); then `watching`, then change events until either
    side closes. A refused path: an error message and close 1008."""
    request = ws.recv_json(timeout=srv.config.request_deadline)
    if request is None or request.get("action", "watch") != "watch":
        ws.send_json({"type": "error", "code": "INVALID_REQUEST",
                      "message": 'send {"action": "watch", "path": ..., "recursive": false} first'})
        ws.close(1008, "expected a watch request")
        return
    try:
        recursive = request.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be true or false")
        watcher = srv.files.watch(request.get("path"), recursive=recursive)
    except AgentError as exc:
        ws.send_json({"type": "error", "code": exc.code, "message": exc.message, "error": exc.message,
                      "details": exc.details or {}})
        ws.close(1008, exc.message[:100])
        return
    try:
        _watch_events(ws, watcher)
    finally:
        watcher.close()


def _watch_events(ws: "_WebSocket", watcher: _WatcherBase) -> None:
    ws.send_json({"type": "watching", "path": watcher.path, "backend": watcher.backend,
                  "timestamp": _rfc3339(time.time())})
    ws.start_reader("hopx-watch-reader", watcher.close)     # a client close wakes the pull at once
    # a client that stops reading blocks send_json (bounded by the write timeout); meanwhile events
    # wait in the watcher's bounded queue and the kernel's, and what does not fit becomes an overflow
    while not ws.gone and not watcher.closed:
        for event in watcher.pull(WATCH_IDLE_PULL_S):
            ws.send_json(event)
    if not ws.gone:
        ws.close(1000, "watch ended")


_FILES_ROUTES = (
    _route("GET", "/files/read", _files_read),
    _route("GET", "/files/download", _files_download),
    _route("POST", "/files/write", _files_write),
    _route("POST", "/files/upload", _files_upload, body="stream"),
    _route("PUT", "/files/upload", _files_upload, body="stream"),
    _route("GET", "/files/list", _files_list),
    _route("GET", "/files/stat", _files_stat),
    _route("GET", "/files/exists", _files_exists),
    _route("DELETE", "/files/remove", _files_remove),
    _route("POST", "/files/mkdir", _files_mkdir),
    _route("POST", "/files/move", _files_move),
    _route("GET", "/files/watch", _files_watch, websocket=True),
)


# ============================================================================
# Contexts: the kernel program
# ============================================================================
# This section does not run in the agent: it is the program of a Python
# context's child. The agent sends these lines (with their line numbers) over
# the child's channel to `python3 -c _KERNEL_BOOTSTRAP`, which compiles only
# them, so a kernel starts without compiling the rest of the file. Hence the
# rules here: the standard library only, Python 3.9, and no name from any
# other section (the imports below repeat the ones at the top for that reason).

import _signal      # signal.py and socket.py import enum and selectors: milliseconds of start-up
import _socket
import _thread
import builtins
import io
import json
import os
import sys

_KERNEL_PROTOCOL = 2                  # bumped when a frame changes; the agent checks the hello
_K_MAX_FRAME_BYTES = 64 * 1024 * 1024  # a request larger than this is refused (bodies are 10 MiB)
_K_MAX_SEND_BYTES = 40 * 1024 * 1024  # a frame the kernel sends stays under the agent's 48 MiB limit
_K_MAX_TEXT_CHARS = 1024 * 1024       # `result`, an error's value and its traceback, each (then truncated)
_K_MAX_RESULTS = 64                   # rich outputs kept per call, the rest dropped and counted
_K_MAX_ITEM_BYTES = 8 * 1024 * 1024   # one MIME item (a PNG in base64, an HTML table)
_K_MAX_RICH_BYTES = 32 * 1024 * 1024  # all rich outputs of one call together
_K_DF_ROWS = 1000                     # rows of a DataFrame sent as `dataframe`
_K_DF_COLUMNS = 200                   # columns likewise
_K_LINE_FLUSH_BYTES = 8192            # a stream writes at a newline or when this much is pending
_K_CELLS_KEPT = 1000                  # cells kept in linecache for tracebacks of later calls
_K_CO_COROUTINE = 0x80                # inspect.CO_COROUTINE, without importing inspect

# The _repr_*_ methods of the rich display protocol, in IPython's order.
_K_REPRS = (("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"),
            ("_repr_svg_", "image/svg+xml"), ("_repr_html_", "text/html"),
            ("_repr_markdown_", "text/markdown"), ("_repr_latex_", "text/latex"),
            ("_repr_json_", "application/json"))
_K_BINARY = ("image/png", "image/jpeg")
_K_DATAFRAME_MIME = "application/vnd.dataframe+json"


def _k_clean(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates become U+FFFD)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _k_bounded(text: str, limit: int = _K_MAX_TEXT_CHARS, *, middle: bool = False) -> tuple:
    """(text, characters dropped): at most ``limit`` characters of ``text``,
    its head (the start of a repr says what it is) or, with ``middle``, its
    head and tail (a traceback's first frames and its last line); the cut is
    marked in the text itself."""
    if len(text) <= limit:
        return text, 0
    head = limit // 2 if middle else limit
    tail = limit - head if middle else 0
    dropped = len(text) - head - tail
    note = "\n... [%d characters dropped by hopx_agent] ...\n" % dropped
    return text[:head] + note + (text[len(text) - tail:] if tail else ""), dropped


def _k_user_frames(tb: object) -> object:
    """A traceback without the kernel's own frames (the agent's code: the
    cell's caller, the SIGINT handler, sys.stdout's write), user frames only."""
    kept = []
    while tb is not None:
        if tb.tb_frame.f_globals is not globals():
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):      # types.TracebackType(tb_next, frame, lasti, lineno)
        rebuilt = type(entry)(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


def _k_attr(obj: object, name: str) -> object:
    """A callable attribute, or None; objects whose __getattr__ raises
    anything at all count as not having it."""
    try:
        found = getattr(obj, name, None)
    except Exception:
        return None
    return found if callable(found) else None


def _k_is(obj: object, package: str, name: str) -> bool:
    """isinstance(obj, <a class ``name`` of ``package``>) without importing it
    (matplotlib, pandas: only objects the user made can be theirs). pandas 3
    names its classes' module "pandas", older ones "pandas.core.frame"."""
    return any(c.__name__ == name and str(c.__module__).split(".")[0] == package for c in type(obj).__mro__)


class _KernelChannel:
    """Length-prefixed JSON frames over the kernel's end of the socketpair.
    Requests may carry file descriptors (SCM_RIGHTS) on their first byte."""

    def __init__(self, fd: int) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        os.set_inheritable(fd, False)
        self._lock = _thread.allocate_lock()   # guards the send side: display() may be called from threads

    @staticmethod
    def encode(message: dict) -> bytes:
        return json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    def send(self, message: dict) -> None:
        self.send_bytes(self.encode(message))

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self) -> tuple:
        """(message, fds), or (None, []) at EOF. fds arrive close-on-exec."""
        fds: list = []
        head = b""
        while len(head) < 4:
            data, ancdata, _, _ = self.sock.recvmsg(4 - len(head), _socket.CMSG_SPACE(16),
                                                    _socket.MSG_CMSG_CLOEXEC)
            for level, kind, blob in ancdata:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    usable = len(blob) - len(blob) % 4
                    fds.extend(int.from_bytes(blob[i:i + 4], sys.byteorder) for i in range(0, usable, 4))
            if not data:
                for fd in fds:
                    os.close(fd)
                return None, []
            head += data
        size = int.from_bytes(head, "big")
        if size > _K_MAX_FRAME_BYTES:
            raise ValueError("frame of %d bytes" % size)
        body = bytearray(size)
        view, got = memoryview(body), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if not n:
                return None, fds
            got += n
        return json.loads(body.decode("utf-8")), fds


class _KernelStream(io.TextIOBase):
    """sys.stdout / sys.stderr of the kernel. Text goes to fd 1 or 2 (the
    call's pipes while a call runs), written at each newline, so Python's
    output and a subprocess's stay in order. Output belongs to the call it
    was written in: the main thread's and that of threads started during the
    running call go to it; while no call runs, and from threads that were
    already running when the call began, writes are dropped and counted."""

    encoding = "utf-8"
    errors = "backslashreplace"
    newlines = None
    line_buffering = True

    def __init__(self, kernel: "_Kernel", fd: int, name: str) -> None:
        super().__init__()
        self._kernel = kernel
        self._fd = fd
        self._name = name
        self._pending = bytearray()
        # Guards _pending and keeps one writer's line whole on the fd. Reentrant:
        # a signal handler that prints while the main thread flushes must not deadlock.
        self._lock = _thread.RLock()
        self.buffer = _KernelBinaryStream(self)

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Closing sys.stdout would break every later call: only flushed."""
        self.flush()

    @property
    def closed(self) -> bool:
        return False

    def reconfigure(self, **options: object) -> None:
        """Accepted and ignored: the encoding is UTF-8, lines are flushed."""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        self.write_bytes(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        if not data:
            return
        if not self._kernel.owns_writer():
            self._kernel.late_bytes += len(data)
            return
        with self._lock:
            self._pending += data
            if len(self._pending) >= _K_LINE_FLUSH_BYTES or b"\n" in data:
                self._write_pending()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._write_pending()

    def _write_pending(self) -> None:
        view = memoryview(bytes(self._pending))
        self._pending.clear()
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except OSError:          # the agent closed the pipe: nobody can read this any more
                self._kernel.late_bytes += len(view)
                return


class _KernelBinaryStream:
    """sys.stdout.buffer: bytes into the same pending line as the text."""

    mode = "wb"

    def __init__(self, text: _KernelStream) -> None:
        self._text = text

    def write(self, data: bytes) -> int:
        data = bytes(data)
        self._text.write_bytes(data)
        return len(data)

    def flush(self) -> None:
        self._text.flush()

    def fileno(self) -> int:
        return self._text.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False


class _KernelStdin(io.TextIOBase):
    """sys.stdin of the kernel: always empty (input() raises EOFError) and
    never closed. exit() closes sys.stdin before it raises SystemExit, and
    the context lives on: a real file would stay closed (input() would raise
    ValueError) and fd 0 would be free for the next pipe to take."""

    encoding = "utf-8"
    errors = "strict"
    newlines = None
    name = "<stdin>"
    mode = "r"

    def __init__(self) -> None:
        super().__init__()
        self.buffer = _KernelEmptyBytes()

    def fileno(self) -> int:
        return 0                          # /dev/null

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def read(self, size: object = -1) -> str:
        return ""

    def readline(self, size: object = -1) -> str:
        return ""

    def close(self) -> None:
        """Closing it would break every later call: ignored."""

    @property
    def closed(self) -> bool:
        return False


class _KernelEmptyBytes:
    """sys.stdin.buffer: empty, never closed."""

    mode = "rb"
    closed = False

    def read(self, size: object = -1) -> bytes:
        return b""

    readline = read1 = read

    def fileno(self) -> int:
        return 0

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _KernelImportHook:
    """A meta-path finder that only watches: when the user imports matplotlib,
    it gets the Agg backend (unless MPLBACKEND says otherwise), and
    pyplot.show() sends the open figures (HopX's inline plots)."""

    def __init__(self, kernel: "_Kernel") -> None:
        self._kernel = kernel
        self._after = {"matplotlib": self._matplotlib_loaded, "matplotlib.pyplot": self._pyplot_loaded,
                       "linecache": kernel.cells_to_linecache}

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        hook = self._after.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None or isinstance(loader, type):   # a frozen or builtin importer is shared: leave it
            return spec

        def exec_module(module: object) -> None:
            run(module)
            try:
                hook(module)
            except Exception:    # a matplotlib we do not understand still imports
                pass
        loader.exec_module = exec_module   # this loader instance serves this one module
        return spec

    def _matplotlib_loaded(self, module: object) -> None:
        if not os.environ.get("MPLBACKEND"):
            module.use("Agg")

    def _pyplot_loaded(self, module: object) -> None:
        original = module.show

        def show(*args: object, **kwargs: object) -> None:
            if str(module.get_backend()).lower() == "agg":
                self._kernel.rich.send_figures()
            else:
                original(*args, **kwargs)
        show.__doc__ = original.__doc__
        module.show = show


class _KernelDisplay:
    """A cell's rich outputs: display(), the _repr_*_ protocol, matplotlib
    figures and pandas frames, each sent to the agent as it is made, within
    the running call's budget (the kernel's ``call`` accounting)."""

    def __init__(self, kernel: "_Kernel") -> None:
        self.kernel = kernel

    def display(self, *objects: object, raw: bool = False, **ignored: object) -> None:
        """The display() builtin: each object as a MIME bundle, sent now."""
        for obj in objects:
            if raw and isinstance(obj, dict):
                self._emit(dict(obj), "display")
            else:
                self.bundle(obj, "display")

    def bundle(self, obj: object, kind: str) -> object:
        """Format and send one object; returns its text/plain (the `result`)."""
        if _k_is(obj, "matplotlib", "Figure"):
            self._send_figure(obj, kind)
            return self._plain(obj) if kind == "result" else None
        bundle = self._rich(obj)
        plain = bundle.pop("text/plain", None)
        if plain is None and (kind == "result" or not bundle):
            plain = self._plain(obj)
        if plain is not None:            # list(range(10**7)) has a 79 MB repr: its head is kept
            plain, cut = _k_bounded(_k_clean(str(plain)))
            if kind == "result":
                self.kernel.call["result_dropped"] = cut
        if not bundle:                   # text/plain only when nothing richer exists
            bundle["text/plain"] = plain
        self._emit(bundle, kind)
        return plain

    @staticmethod
    def _plain(obj: object) -> str:
        return _k_clean(repr(obj))

    def _rich(self, obj: object) -> dict:
        """The MIME bundle of the _repr_*_ protocol (a failing method is
        reported on stderr and skipped, as IPython does)."""
        bundle: dict = {}
        if isinstance(obj, type) or _k_attr(obj, "_hopx_canary_method_should_not_exist_") is not None:
            return bundle                # a class, or an object that claims every attribute
        method = _k_attr(obj, "_repr_mimebundle_")
        if method is not None:
            data = self._call_repr(obj, method, include=None, exclude=None)
            if isinstance(data, tuple) and data:
                data = data[0]
            if isinstance(data, dict):
                bundle.update((str(k), v) for k, v in data.items() if v is not None)
        for name, mime in _K_REPRS:
            method = _k_attr(obj, name) if mime not in bundle else None
            if method is not None:
                data = self._call_repr(obj, method)
                if isinstance(data, tuple) and data:
                    data = data[0]
                if data is not None:
                    bundle[mime] = data
        if _k_is(obj, "pandas", "DataFrame"):
            frame = self._call_repr(obj, lambda: self._dataframe(obj))
            if frame is not None:
                bundle[_K_DATAFRAME_MIME] = frame
        return bundle

    def _call_repr(self, obj: object, method: object, **kwargs: object) -> object:
        try:
            return method(**kwargs)
        except Exception as exc:
            self.kernel.stderr.write("display: %s of %s raised %s: %s\n"
                                     % (getattr(method, "__name__", "a formatter"), type(obj).__name__,
                                        type(exc).__name__, _k_clean(str(exc))))
            return None

    @staticmethod
    def _dataframe(frame: object) -> dict:
        """`dataframe`: a bounded head of the frame as JSON (NaN as null,
        datetimes ISO 8601), with its real shape."""
        rows, columns = frame.shape
        head = frame.iloc[:_K_DF_ROWS, :_K_DF_COLUMNS]
        split = json.loads(head.to_json(orient="split", date_format="iso", default_handler=str))
        return {"columns": [_k_clean(str(c)) for c in head.columns], "index": split.get("index", []),
                "data": split.get("data", []), "shape": [rows, columns],
                "truncated": rows > _K_DF_ROWS or columns > _K_DF_COLUMNS}

    def _emit(self, bundle: dict, kind: str) -> None:
        """Send a bundle's entries in one frame, within the call's budget; from
        a thread that writes to no call (see owns_writer), dropped and counted."""
        kernel = self.kernel
        entries = self._entries(bundle)
        if not kernel.owns_writer():
            kernel.late_bytes += sum(size for _, size in entries)
            return
        entries = [entry for entry, size in entries if not self._over_budget(size)]
        if entries:
            kernel.stdout.flush()        # what was printed before this output is read before it
            kernel.stderr.flush()
            kernel.send({"op": "output", "kind": kind, "entries": entries})

    def _entries(self, bundle: dict) -> list:
        """(results entry, its size as sent) of each MIME type: base64 for
        images, objects for JSON, text for the rest."""
        import base64
        entries = []
        for mime, data in bundle.items():
            if mime in _K_BINARY and isinstance(data, (bytes, bytearray, memoryview)):
                data = base64.b64encode(bytes(data)).decode("ascii")
            elif mime in _K_BINARY and isinstance(data, str):
                data = "".join(data.split())          # already base64 (IPython's convention)
            elif mime == "application/json" or mime.endswith("+json"):
                data = json.loads(data) if isinstance(data, str) else data
            elif isinstance(data, (bytes, bytearray)):
                data = bytes(data).decode("utf-8", "replace")
            elif not isinstance(data, str):
                data = str(data)
            data = _k_clean(data) if isinstance(data, str) else data
            try:                         # JSON escapes make a string up to 6x longer than its characters
                size = len(self.kernel.channel.encode(data))
            except (TypeError, ValueError, UnicodeEncodeError):
                self.kernel.stderr.write("display: %s output of type %s is not JSON\n" % (mime, type(data).__name__))
                continue
            entries.append(({"type": mime, "data": data}, size))
        return entries

    def _over_budget(self, size: int) -> bool:
        call = self.kernel.call
        if (call["results"] >= _K_MAX_RESULTS or size > _K_MAX_ITEM_BYTES
                or call["bytes"] + size > _K_MAX_RICH_BYTES):
            call["dropped"] += 1
            call["dropped_bytes"] += size
            return True
        call["results"] += 1
        call["bytes"] += size
        return False

    def _send_figure(self, figure: object, kind: str) -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        try:
            if figure.axes or getattr(figure, "images", None):
                png = io.BytesIO()
                figure.savefig(png, format="png", bbox_inches="tight")
                self._emit({"image/png": png.getvalue()}, kind)
        finally:
            if pyplot is not None:
                pyplot.close(figure)

    def send_figures(self) -> None:
        """plt.show(): every open figure as PNG, in order, then closed."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        for number in list(pyplot.get_fignums()):
            self._send_figure(pyplot.figure(number), "display")

    def send_open_figures(self) -> None:
        if "matplotlib.pyplot" in sys.modules:
            self.send_figures()

    def send_open_figures_quietly(self) -> None:
        """After a failed cell its figures are still shown, as in Jupyter; a
        figure that cannot be drawn does not hide the cell's own error."""
        try:
            self.send_open_figures()
        except BaseException as exc:
            self.kernel.stderr.write("display: a figure could not be drawn: %s\n" % type(exc).__name__)



class _Kernel:
    """The loop of a Python context: each request is a cell run in __main__."""

    def __init__(self, channel: _KernelChannel) -> None:
        self.channel = channel
        self.pid = os.getpid()
        self.idle_fd = os.dup(1)          # the pipe the agent drains between calls (close-on-exec)
        self.capturing = False            # a call runs: output goes to its pipes
        self.call_id: object = None       # the running call's id: every frame of it carries it
        self.main_tid = _thread.get_native_id()
        self.threads_before: frozenset = frozenset()   # native ids of the threads running when the call began
        self.in_cell = False              # user code runs: SIGINT raises KeyboardInterrupt
        self.late_bytes = 0               # Python-level output written while no call ran
        self.count = 0                    # execution_count, as in Jupyter
        self.marker = os.environ.get("HOPX_PROCESS_ID", "")
        self.applied_global: dict = {}    # the global env last applied, to notice changes in the store
        self.global_saved: dict = {}      # a global key's value before the store set it (None: unset)
        self.namespace = self._fresh_main()
        self.stdout = _KernelStream(self, 1, "<stdout>")
        self.stderr = _KernelStream(self, 2, "<stderr>")
        self.call: dict = {}              # rich-output accounting of the running call
        self.rich = _KernelDisplay(self)
        self.loop = None                  # the asyncio loop of top-level await, made on first use
        self.cells: dict = {}             # filename -> source of the cells kept for tracebacks

    @staticmethod
    def _fresh_main() -> dict:
        """__main__'s dict, emptied of the bootstrap's names: pickle and
        multiprocessing find cell-defined classes in sys.modules['__main__']."""
        namespace = sys.modules["__main__"].__dict__
        keep = {"__name__": "__main__", "__doc__": None, "__package__": None, "__spec__": None,
                "__loader__": namespace.get("__loader__"), "__builtins__": builtins}
        namespace.clear()
        namespace.update(keep)
        return namespace

    def install(self) -> None:
        sys.stdout = sys.__stdout__ = self.stdout
        sys.stderr = sys.__stderr__ = self.stderr
        sys.stdin = sys.__stdin__ = _KernelStdin()
        sys.argv = [""]
        sys.meta_path.insert(0, _KernelImportHook(self))
        builtins.display = self.rich.display
        _signal.signal(_signal.SIGINT, self._on_sigint)
        os.register_at_fork(after_in_child=self._forked)
        try:
            import faulthandler      # a segfault prints the Python stack into the call's stderr
            faulthandler.enable(self.stderr, all_threads=True)
        except (ImportError, OSError, ValueError):
            pass

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.in_cell:
            raise KeyboardInterrupt

    def _forked(self) -> None:
        """A fork of the kernel (os.fork, multiprocessing) is user code: it must
        never answer on the channel or read the agent's next request."""
        self.pid = -1
        try:
            os.close(self.channel.sock.detach())
        except OSError:
            pass

    def serve(self) -> int:
        self.channel.send({"op": "hello", "protocol": _KERNEL_PROTOCOL, "pid": os.getpid(),
                           "python": sys.version.split()[0], "executable": sys.executable})
        while True:
            try:
                message, fds = self.channel.recv()
            except KeyboardInterrupt:     # an interrupt that raced the end of a call
                continue
            if message is None:
                return 0
            if message.get("op") == "exec" and len(fds) == 2:
                self.execute(message, fds)
            else:
                for fd in fds:
                    os.close(fd)
                self.channel.send({"op": "done", "call": message.get("call"), "status": "error", "exit_code": 1,
                                   "error": {"name": "ProtocolError", "value": "bad request", "traceback": ""}})

    def owns_writer(self) -> bool:
        """Whether output written now, by this thread, belongs to the running
        call: the main thread's does, and that of threads started since the
        call began; threads already running then write to no call."""
        if not self.capturing:
            return False
        tid = _thread.get_native_id()
        return tid == self.main_tid or tid not in self.threads_before

    @staticmethod
    def _threads_now() -> frozenset:
        """Native ids of the kernel's threads (a thread's id is not reused
        while it runs, and Linux hands out ids in turn, unlike pthread_t)."""
        try:
            return frozenset(int(tid) for tid in os.listdir("/proc/self/task"))
        except (OSError, ValueError):
            return frozenset()

    def send(self, message: dict) -> None:
        """A frame of the running call. One larger than the agent accepts would
        cost the kernel its life (and the user the context's state): an output
        is dropped and counted, an answer's fields replaced by a note."""
        message["call"] = self.call_id
        data = self.channel.encode(message)
        if len(data) > _K_MAX_SEND_BYTES and message.get("op") == "output":
            self.call["dropped"] += len(message.get("entries") or ())
            self.call["dropped_bytes"] += len(data)
            return
        if len(data) > _K_MAX_SEND_BYTES:
            note = "the answer was %d bytes, more than a kernel frame may carry" % len(data)
            message = {"op": "done", "call": self.call_id, "status": "error", "exit_code": 1,
                       "execution_count": self.count, "late_bytes": message.get("late_bytes", 0),
                       "error": {"name": "OutputTooLarge", "value": note, "traceback": ""}}
            data = self.channel.encode(message)
        self.channel.send_bytes(data)

    # -- one call ------------------------------------------------------------------

    def execute(self, message: dict, fds: list) -> None:
        self._redirect(fds[0], fds[1])
        for fd in fds:
            os.close(fd)
        self.call_id = message.get("call")
        self.threads_before = self._threads_now()
        self.capturing = True
        self.call = {"results": 0, "bytes": 0, "dropped": 0, "dropped_bytes": 0, "result_dropped": 0}
        restore = self._apply_env(message)
        try:
            outcome = self._run_guarded(message)
        finally:
            self.capturing = False
            self._redirect(self.idle_fd, self.idle_fd)
            self._restore_env(restore)
        if os.getpid() != self.pid:       # the cell forked and this is the child: never answer
            os._exit(outcome.get("exit_code") or 0)
        try:
            outcome["cwd"] = os.getcwd()
        except OSError:
            outcome["cwd"] = None
        late, self.late_bytes = self.late_bytes, 0
        outcome.update(op="done", execution_count=self.count, late_bytes=late,
                       results_dropped=self.call["dropped"])
        if self.call["result_dropped"]:
            outcome["result_dropped"] = self.call["result_dropped"]
        self.send(outcome)

    def _run_guarded(self, message: dict) -> dict:
        """The cell, with an interrupt that lands in the kernel's own code
        (between the cell and its bookkeeping) reported like one in the cell."""
        try:
            cwd = message.get("cwd")
            if cwd:
                os.chdir(cwd)
            self.count += 1
            return self._run_cell(message.get("code", ""), "<cell-%d>" % self.count)
        except KeyboardInterrupt:
            return {"status": "interrupted", "exit_code": 130,
                    "error": {"name": "KeyboardInterrupt", "value": "", "traceback": ""}}
        except OSError as exc:            # the workdir vanished between the agent's check and here
            return self._failed(exc, None)
        except BaseException as exc:      # raised by user code the kernel called while reporting the cell
            return self._failed(exc, None)
        finally:
            self._flush_c_stdio()
            self.stdout.flush()
            self.stderr.flush()

    @staticmethod
    def _flush_c_stdio() -> None:
        """printf() from C code sits in libc's buffer (a pipe is not a tty):
        fflush(NULL) at the end of the cell, where ctypes is loaded already
        (whoever calls C that way imported it; loading it costs milliseconds)."""
        ctypes = sys.modules.get("ctypes")
        if ctypes is not None:
            try:
                ctypes.CDLL(None).fflush(None)
            except (OSError, AttributeError):
                pass

    def _redirect(self, out_fd: int, err_fd: int) -> None:
        """Point fds 1 and 2 at new pipes; what Python holds goes out first."""
        self.stdout.flush()
        self.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)

    def _apply_env(self, message: dict) -> tuple:
        """The global env persists: a key is set when it is new or changed in
        the store (so what a cell sets itself stays), and one dropped from the
        store gets back the value it had before, unless a cell changed it. The
        request's env is for this call only."""
        environ = os.environ
        glob = message.get("global_env") or {}
        for key, value in list(self.applied_global.items()):
            if key not in glob:
                original = self.global_saved.pop(key, None)
                if environ.get(key) == value:
                    if original is None:
                        environ.pop(key, None)
                    else:
                        environ[key] = original
        for key, value in glob.items():
            if key not in self.applied_global:
                self.global_saved[key] = environ.get(key)
            if self.applied_global.get(key) != value:
                environ[key] = value
        self.applied_global = dict(glob)
        env = message.get("env") or {}
        saved = {key: environ.get(key) for key in env}
        environ.update(env)
        if message.get("marker"):         # processes started by this call carry its marker
            environ["HOPX_PROCESS_ID"] = message["marker"]
        return env, saved

    def _restore_env(self, restore: tuple) -> None:
        env, saved = restore
        environ = os.environ
        for key, value in env.items():
            if environ.get(key) != value:
                continue                  # the cell set it itself: that persists
            if saved[key] is None:
                del environ[key]
            else:
                environ[key] = saved[key]
        if self.marker:
            environ["HOPX_PROCESS_ID"] = self.marker

    def _run_cell(self, code: str, filename: str) -> dict:
        """Compile the whole cell; run it; the last expression is the result."""
        self._remember_source(filename, code)
        self.in_cell = True
        try:
            body, last, quiet = self._compile(code, filename)
            if body is not None:
                self._evaluate(body)
            value = self._evaluate(last) if last is not None else None
            result = None
            if value is not None and not quiet:
                self.namespace["_"] = value
                result = self.rich.bundle(value, "result")
            self.rich.send_open_figures()
            self.in_cell = False
            return {"status": "ok", "exit_code": 0, "result": result}
        except SystemExit as exc:         # in_cell still: its __str__ is user code, an interrupt reaches it
            return self._exited(exc)
        except BaseException as exc:
            self.rich.send_open_figures_quietly()
            return self._failed(exc, exc.__traceback__)
        finally:
            self.in_cell = False

    def _compile(self, code: str, filename: str) -> tuple:
        """(body, last expression, hidden): the cell split as Jupyter does."""
        import ast                        # here, not at the top: the agent imports this section too
        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        if "\n" not in code.strip() and ";" not in code:
            try:                          # one expression (print(1)): one compile, no tree
                return None, compile(code, filename, "eval", flags, dont_inherit=True), False
            except SyntaxError:
                pass
        tree = compile(code, filename, "exec", ast.PyCF_ONLY_AST | flags, dont_inherit=True)
        last = None
        quiet = False
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            node = tree.body.pop()
            last = compile(ast.Expression(node.value), filename, "eval", flags, dont_inherit=True)
            quiet = self._ends_with_semicolon(code, node)
        body = compile(tree, filename, "exec", flags, dont_inherit=True)
        return body, last, quiet

    @staticmethod
    def _ends_with_semicolon(code: str, node: object) -> bool:
        """Jupyter's `plt.plot(x);`: a trailing semicolon hides the result."""
        lines = code.splitlines()
        end_line = getattr(node, "end_lineno", None)
        if not end_line or end_line > len(lines):
            return False
        rest = lines[end_line - 1].encode("utf-8")[node.end_col_offset:].decode("utf-8", "replace")
        rest += "\n".join(lines[end_line:])
        return rest.lstrip().startswith(";")

    def _evaluate(self, code: object) -> object:
        value = eval(code, self.namespace)
        if code.co_flags & _K_CO_COROUTINE:     # top-level await: run it on the kernel's loop
            if self.loop is None:
                import asyncio
                self.loop = asyncio.new_event_loop()
            value = self.loop.run_until_complete(value)
        return value

    def _remember_source(self, filename: str, code: str) -> None:
        """Tracebacks and inspect.getsource() read cells back from linecache
        (imported by whoever needs it first: it costs milliseconds of start-up)."""
        self.cells[filename] = code
        stale = "<cell-%d>" % (self.count - _K_CELLS_KEPT)
        self.cells.pop(stale, None)
        linecache = sys.modules.get("linecache")
        if linecache is not None:
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            linecache.cache.pop(stale, None)

    def cells_to_linecache(self, linecache: object) -> None:
        for filename, code in self.cells.items():
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)

    def _exited(self, exc: SystemExit) -> dict:
        """sys.exit(n) ends the cell with exit code n; the context lives on."""
        code = exc.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code & 0xFF          # as the exit status of a process
        else:
            try:
                self.stderr.write("%s\n" % (code,))
            except BaseException:         # its __str__ raised (even SystemExit): the status still holds
                self.stderr.write("<str() of the exit value failed>\n")
            status = 1
        return {"status": "exit", "exit_code": status, "result": None}

    def _failed(self, exc: BaseException, tb: object) -> dict:
        """The traceback of user frames only, in stderr and `error`; its text
        and the value bounded (a 60 MB message must not kill the context)."""
        import traceback                  # (which imports linecache: the hook fills it with the cells)
        self._user_frames_only(exc, tb)
        # str(exc) is user code (__str__): it may raise anything, SystemExit too, or
        # sleep until the timeout's interrupt. Called once here; only if it worked
        # does format_exception call it again (which swallows even an interrupt).
        formatted = None
        try:
            value, value_cut = _k_bounded(_k_clean(str(exc)))
        except BaseException:
            value, value_cut = "<str() failed>", 0
        else:
            try:
                formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            except BaseException:
                pass
        if formatted is None:             # the frames without another call of user code
            formatted = "Traceback (most recent call last):\n%s%s: %s\n" % (
                "".join(traceback.format_tb(exc.__traceback__)), type(exc).__name__, value)
        text, text_cut = _k_bounded(_k_clean(formatted), middle=True)
        self.stderr.write(text)
        interrupted = isinstance(exc, KeyboardInterrupt)
        error = {"name": type(exc).__name__, "value": value, "traceback": text}
        if value_cut or text_cut:
            error.update(value_dropped=value_cut, traceback_dropped=text_cut)
        return {"status": "interrupted" if interrupted else "error", "exit_code": 130 if interrupted else 1,
                "error": error}

    @staticmethod
    def _user_frames_only(exc: BaseException, tb: object) -> None:
        """Drop the kernel's frames from the exception and the ones it chains."""
        exc.__traceback__ = _k_user_frames(tb)
        seen = {id(exc)}
        todo = [e for e in (exc.__cause__, exc.__context__) if e is not None]
        while todo and len(seen) < 100:
            chained = todo.pop()
            if id(chained) in seen:
                continue
            seen.add(id(chained))
            chained.__traceback__ = _k_user_frames(chained.__traceback__)
            todo.extend(e for e in (chained.__cause__, chained.__context__) if e is not None)

    # -- rich outputs --------------------------------------------------------------


def _kernel_main(fd: int) -> int:
    """The kernel child's entry point (called by _KERNEL_BOOTSTRAP)."""
    kernel = _Kernel(_KernelChannel(fd))
    kernel.install()
    return kernel.serve()


# ============================================================================
# Contexts: kernels and shells
# ============================================================================
# The agent's side of stateful code. A context is one long-lived child (a
# Python kernel running the section above, or a bash) that runs one call at a
# time. Each call gets pipes of its own for fds 1 and 2, so what a background
# process writes after its call ended can never land in a later answer: those
# pipes are drained by one thread and their bytes counted as dropped.

KERNEL_START_TIMEOUT_S = 30.0         # a child must say it is ready within this (cold disks are slow)
MAX_KERNEL_FRAME_BYTES = 48 * 1024 * 1024   # the kernel bounds a call's rich output at 32 MiB
MAX_CALL_RESULTS = 64                 # rich outputs kept per call (the kernel's bound, checked again)
MAX_CALL_RICH_BYTES = 32 * 1024 * 1024      # likewise for their bytes
LATE_PIPES_MAX = 1024                 # pipes held open by finished calls' background processes
CHILD_TAIL_BYTES = 4096               # what a child printed outside calls, kept to explain a failed start
CLIENT_CHECK_S = 0.25                 # how often a call looks for a client that hung up
PIPE_READS_PER_WAKE = 8               # chunks read from one call pipe before the wait loop looks at the time
PIPE_DRAIN_CHUNKS = 64                # after the answer: what a pipe holds (16 MiB; a writer that goes on is late)
LONG_CALL_S = 0.05                    # a call still running after this leaves the HTTP request slots
CONTEXT_NAME_CHARS = 256              # context names are labels
STREAM_OUTBOX_BYTES = 4 * 1024 * 1024 # /execute/stream: queued for a slow client, beyond that dropped and counted
STREAM_FINISH_S = WRITE_TIMEOUT_S + 5.0   # how long a stream's session waits for its writer to send the end
_CONTEXT_LANGUAGES = ("python", "bash")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT)

# The -c program of a kernel child. It reads the kernel section from the
# channel: a head (first line number, sizes, the agent's bytecode magic), the
# source and the agent's compiled code of it; it runs the compiled code when
# its own Python has the same magic, else compiles the source under the agent
# file's name with its line numbers (and postponed annotations, as the file's
# __future__ import says). Nothing else of the agent is compiled in the child.
_KERNEL_BOOTSTRAP = (
    "import os, sys, marshal, _frozen_importlib_external as boot\n"
    "def _boot(fd, path):\n"
    "    def read(n):\n"
    "        data = b''\n"
    "        while len(data) < n:\n"
    "            chunk = os.read(fd, n - len(data))\n"
    "            if not chunk:\n"
    "                raise SystemExit(70)\n"
    "            data += chunk\n"
    "        return data\n"
    "    head = read(28)\n"
    "    first, size, size2 = (int.from_bytes(head[i:i + 4], 'big') for i in (0, 4, 8))\n"
    "    source, blob = read(size), read(size2)\n"
    "    if head[12:28] == boot.MAGIC_NUMBER.ljust(16, b'\\0'):\n"
    "        code = marshal.loads(blob)\n"
    "    else:\n"
    "        code = compile(b'\\n' * (first - 1) + source, path, 'exec', 0x1000000, True)\n"
    "    namespace = {'__name__': '__hopx_kernel__', '__builtins__': __builtins__}\n"
    "    exec(code, namespace)\n"
    "    return namespace['_kernel_main'](fd)\n"
    "sys.exit(_boot(int(sys.argv[1]), sys.argv[2]))\n"
)

_KERNEL_SECTION_TITLE = b"# Contexts: the kernel program"
_CO_FUTURE_ANNOTATIONS = 0x1000000    # __future__.annotations.compiler_flag


def _kernel_source(path: str) -> Tuple[int, bytes]:
    """(first line number, text) of the kernel program section of the agent
    file: the lines between its banner and the next one."""
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    try:
        start = lines.index(_KERNEL_SECTION_TITLE) + 2     # past the banner's closing rule
    except ValueError:
        raise AgentError("the kernel program section is missing from %s" % path) from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(b"# ====")), len(lines))
    return start + 1, b"\n".join(lines[start:end]) + b"\n"


def _kernel_payload(first: int, source: bytes, path: str) -> bytes:
    """What a kernel child reads first: the head, the section's source and
    its bytecode (a child of the agent's Python version skips compiling)."""
    import marshal
    import importlib.util
    code = marshal.dumps(compile(b"\n" * (first - 1) + source, path, "exec", _CO_FUTURE_ANNOTATIONS, True))
    head = b"".join(n.to_bytes(4, "big") for n in (first, len(source), len(code)))
    return head + importlib.util.MAGIC_NUMBER.ljust(16, b"\0") + source + code


class _ChildBroken(Exception):
    """A context child broke its protocol: it is killed and replaced."""


class _LateOutput:
    """One thread that drains the pipes nobody reads any more: those of
    finished calls still held by their background processes, and each
    child's own pipe for what it writes between calls. A writer never blocks
    on a full pipe; the bytes are counted as dropped (and a child's last few
    kept, to explain a start that failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()    # guards _sinks, _thread, _closed
        self._sinks: Dict[int, Callable[[bytes], None]] = {}
        self._epoll: Optional[Any] = None
        self._thread: Optional[threading.Thread] = None
        self._wake: Optional[Tuple[int, int]] = None
        self._closed = False

    def adopt(self, fd: int, sink: Callable[[bytes], None]) -> None:
        """Drain ``fd`` until EOF, passing what it reads to ``sink``; the fd is ours now."""
        with self._lock:
            if self._closed or len(self._sinks) >= LATE_PIPES_MAX:
                os.close(fd)            # past the bound the writers get EPIPE instead
                return
            if self._thread is None:
                self._start()
            os.set_blocking(fd, False)
            self._sinks[fd] = sink
            self._epoll.register(fd, select.EPOLLIN)

    def _start(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.pipe()
        self._epoll.register(self._wake[0], select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="hopx-ctx-late-output", daemon=True)
        self._thread.start()

    @property
    def open_pipes(self) -> int:
        with self._lock:
            return len(self._sinks)

    def _run(self) -> None:
        try:
            while True:
                events = self._epoll.poll()
                for fd, _ in events:
                    if self._wake is not None and fd == self._wake[0]:
                        return
                    self._drain(fd)
        except Exception:
            log.exception("the late-output drainer failed")

    def _drain(self, fd: int) -> None:
        with self._lock:
            sink = self._sinks.get(fd)
        if sink is None:
            return
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                sink(data)
            except Exception:
                log.exception("a late-output sink failed")
            return
        with self._lock:
            self._sinks.pop(fd, None)
            self._epoll.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        """Stop the thread (bounded) and close every pipe still held."""
        with self._lock:
            self._closed = True
            thread, wake = self._thread, self._wake
        if thread is not None and wake is not None:
            os.write(wake[1], b"x")
            thread.join(5.0)
        with self._lock:
            fds = list(self._sinks)
            self._sinks.clear()
            if self._epoll is not None:
                self._epoll.close()
            if wake is not None:
                os.close(wake[0])
                os.close(wake[1])
            self._thread = self._wake = self._epoll = None
        for fd in fds:
            _close_quietly(fd)


class _Call(_Plain):
    """One call to a context, as the HTTP layer asks for it."""

    code: str
    timeout: float
    env: Dict[str, str] = _Factory(dict)   # type: ignore[assignment]
    workdir: Optional[str] = None
    gone: Optional[Callable[[], bool]] = None      # True once the client hung up
    on_event: Optional[Callable[[Dict[str, Any]], None]] = None   # output as produced (WebSocket)
    slow: Optional[Callable[[], Any]] = None       # called once if the call does not answer at once
    deadline: float = 0.0
    started: float = 0.0
    marker: str = ""
    processes: Any = None                          # _CallProcesses, once the call is sent to the child

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + self.timeout

    def waiting_long(self) -> None:
        """The HTTP layer's long_wait(): this request leaves the request slots."""
        slow, self.slow = self.slow, None
        if slow is not None:
            slow()


class _CallOutput:
    """What one call produced: two bounded streams (the newest bytes kept),
    its rich outputs in order (bounded, the rest counted), and the events a
    streaming client gets as they happen."""

    def __init__(self, cap: int, on_event: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        self.stdout = _OutputBuffer(cap)
        self.stderr = _OutputBuffer(cap)
        self.results: List[Dict[str, Any]] = []
        self.rich_bytes = 0
        self.results_dropped = 0
        self._on_event = on_event
        self._decoders = {}
        if on_event is not None:
            import codecs
            self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                              for name in ("stdout", "stderr")}

    def add(self, name: str, data: Any) -> None:
        (self.stdout if name == "stdout" else self.stderr).append(data)
        if self._on_event is not None:
            text = self._decoders[name].decode(bytes(data))
            if text:
                self._event({"type": name, "data": text})

    def _event(self, event: Dict[str, Any]) -> None:
        """Hand an event to the streaming client's sink. The sink only queues;
        should it fail all the same, the call goes on without it: the wait
        loop that called us must reach the call's answer whatever a client did."""
        try:
            self._on_event(event)
        except Exception:
            log.exception("a call's event sink failed; the call goes on without it")
            self._on_event = None

    def add_frame(self, frame: Dict[str, Any], size: int) -> None:
        """An output frame of the kernel: entries of one MIME bundle."""
        entries = frame.get("entries")
        if not isinstance(entries, list):
            raise _ChildBroken("output frame without entries")
        kind = frame.get("kind")
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("type"), str) and "data" in entry):
                raise _ChildBroken("malformed output entry")
            if len(self.results) >= MAX_CALL_RESULTS or self.rich_bytes + size > MAX_CALL_RICH_BYTES:
                self.results_dropped += 1
                continue
            item = {"type": entry["type"], "data": entry["data"]}
            self.results.append(item)
            if self._on_event is not None:
                self._event({"type": "result" if kind == "result" else "display",
                             "mime": item["type"], "data": item["data"]})
        self.rich_bytes += size

    def flush_events(self) -> None:
        for name, decoder in self._decoders.items():
            text = decoder.decode(b"", final=True)
            if text and self._on_event is not None:
                self._event({"type": name, "data": text})


# HopX's top-level fields (the SDK's rich_outputs): the last output of each kind.
_TOP_LEVEL_MIME = (("image/png", "png"), ("text/html", "html"), ("image/svg+xml", "svg"),
                   ("text/markdown", "markdown"), ("application/json", "json"),
                   ("application/vnd.dataframe+json", "dataframe"))


class _CallPipes:
    """The read ends of one call's stdout and stderr (non-blocking)."""

    def __init__(self, out_fd: int, err_fd: int) -> None:
        self.names = {out_fd: "stdout", err_fd: "stderr"}
        for fd in self.names:
            os.set_blocking(fd, False)

    def read(self, fd: int, output: _CallOutput, chunks: int = PIPE_READS_PER_WAKE) -> bool:
        """Read what is there now, at most ``chunks`` chunks (a cell that
        floods its output must not keep the wait loop from its deadline);
        False once the pipe is at EOF (then closed)."""
        for _ in range(chunks):
            try:
                data = os.read(fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                del self.names[fd]
                os.close(fd)
                return False
            output.add(self.names[fd], data)
            if len(data) < READ_CHUNK_BYTES:
                return True
        return True

    def drain(self, output: _CallOutput) -> None:
        """Everything written before now (a done frame or status line came
        after it, so it is in the pipes already: a pipe's capacity at most)."""
        for fd in list(self.names):
            self.read(fd, output, PIPE_DRAIN_CHUNKS)

    def drain_until(self, output: _CallOutput, deadline: float) -> None:
        """Read until both pipes are at EOF or the deadline (a dead child's
        last words; descendants may still hold the pipes)."""
        while self.names and time.monotonic() < deadline:
            ready, _, _ = select.select(list(self.names), [], [], max(0.0, deadline - time.monotonic()))
            for fd in ready:
                self.read(fd, output)

    def orphan(self, late: _LateOutput, sink: Callable[[bytes], None]) -> None:
        """Hand what is still open to the late-output drainer."""
        for fd in list(self.names):
            late.adopt(fd, sink)
        self.names.clear()


def _sh_quote(text: str) -> str:
    """One shell word, whatever the text (single quotes, ' as '\\'')."""
    return "'" + text.replace("'", "'\\''") + "'"


def _descendants(pid: int) -> List[int]:
    """The processes below ``pid`` (from /proc's children lists), nearest first."""
    found: List[int] = []
    todo = [pid]
    while todo and len(found) < 4096:
        parent = todo.pop(0)
        try:
            with open("/proc/%d/task/%d/children" % (parent, parent), "rb") as fh:
                kids = [int(x) for x in fh.read().split()]
        except (OSError, ValueError):
            continue
        found.extend(kids)
        todo.extend(kids)
    return found


def _marked_with(marker: str, *, tree: bool = False) -> List[Tuple[int, str]]:
    """(pid, marker) of the processes carrying ``marker`` (or, with ``tree``,
    any marker below it: a context's calls are "<context marker>.<n>")."""
    found = []
    for key, pids in _scan_marked().items():
        if key == marker or (tree and key.startswith(marker + ".")):
            found.extend((pid, key) for pid in pids)
    return found


def _end_processes(marked: List[Tuple[int, str]], sig: int) -> List[int]:
    """Signal each process if it still carries its marker; the pids signalled."""
    return [pid for pid, key in marked if _signal_marked(pid, key, sig)]


def _boot_ticks() -> int:
    """Now, in the unit of /proc/<pid>/stat's start times: clock ticks since boot."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _proc_int(path: str, field: int = 0) -> Optional[int]:
    """One whitespace-separated integer field of a small /proc file."""
    try:
        with open(path, "rb") as fh:
            return int(fh.read().split()[field].split(b"/")[-1])
    except (OSError, ValueError, IndexError):
        return None


def _parent_and_start(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time in ticks) of a live process; None once it
    exited (a zombie too) or cannot be read."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            data = fh.read()
        fields = data[data.rindex(b")") + 2:].split()   # the name may hold spaces and parentheses
        return None if fields[0] in (b"Z", b"X") else (int(fields[1]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def _children_of(pid: int) -> List[int]:
    """Direct children of ``pid``, those forked by any of its threads."""
    kids: List[int] = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return kids
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task), "rb") as fh:
                kids.extend(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            continue
    return kids


class _CallProcesses:
    """The processes one call started, found when the call must end (its
    timeout, its client gone) and ended: TERM, the grace, KILL. Those it
    exec'd carry the call's marker. Those it forked without exec (os.fork,
    multiprocessing's "fork") carry the environment the kernel or shell was
    started with, the context's marker: they are the child's descendants
    started since the call began (never below a process that ran before it,
    which an earlier call left running), and processes with the context's
    marker started since then whose ancestors are no older processes of ours
    (a fork that made itself a daemon). Each is proved through a pidfd (its
    start time read again once the pidfd pins it) before it is signalled.
    A call that returns normally leaves them all alone."""

    def __init__(self, root: int, context_marker: str, call_marker: str) -> None:
        self.root = root
        self.context_marker = context_marker
        self.call_marker = call_marker
        # "Started since the call began": start times count clock ticks (10 ms),
        # and the next call often begins within the tick of an earlier call's
        # last fork. Pids are handed out in turn: within that tick, a process
        # is newer than the call when its pid comes after the last pid handed
        # out before it (the last field of /proc/loadavg), read first.
        self.since_pid = _proc_int("/proc/loadavg", 4)
        self.since = _boot_ticks()
        self._held: Dict[int, Tuple[int, Optional[int]]] = {}   # pid -> (start, pidfd) of those signalled
        self._pid_max = 0

    def _new(self, pid: int, start: int) -> bool:
        if start != self.since or self.since_pid is None:
            return start >= self.since
        if not self._pid_max:
            self._pid_max = _proc_int("/proc/sys/kernel/pid_max") or 4194304
        return 0 < (pid - self.since_pid) % self._pid_max < self._pid_max // 2

    def _ours(self, marker: str) -> bool:
        return marker == self.context_marker or marker.startswith(self.context_marker + ".")

    def _young_lineage(self, pid: int, parent: int) -> bool:
        """No process of ours older than the call between ``pid`` and the root
        (or the first process that is not ours: the agent, init, a subreaper)."""
        for _ in range(64):
            if parent <= 1 or parent == self.root or not self._ours(_marker_of(_read_environ(parent))):
                return True
            stat = _parent_and_start(parent)
            if stat is None:
                return True
            if not self._new(parent, stat[1]):
                return False
            parent = stat[0]
        return False

    def find(self) -> Dict[int, int]:
        """pid -> start time of every process of the call alive now."""
        marked = _scan_marked()
        found: Dict[int, int] = {}
        for pid in marked.get(self.call_marker, ()):
            stat = _parent_and_start(pid)
            if stat is not None:
                found[pid] = stat[1]
        todo = _children_of(self.root)
        while todo and len(found) < 4096:
            pid = todo.pop()
            stat = _parent_and_start(pid)
            if stat is not None and self._new(pid, stat[1]):     # an older one and its tree stay
                found[pid] = stat[1]
                todo.extend(_children_of(pid))
        for pid in marked.get(self.context_marker, ()):
            stat = _parent_and_start(pid)
            if (pid != self.root and pid not in found and stat is not None and self._new(pid, stat[1])
                    and self._young_lineage(pid, stat[0])):
                found[pid] = stat[1]
        return found

    def signal(self, sig: int) -> int:
        """Signal every process of the call (found again: new forks too); how many."""
        hit = 0
        for pid, start in self.find().items():
            held = self._held.get(pid)
            if held is None or held[0] != start:
                held = self._prove(pid, start)
                if held is None:
                    continue
                self._held[pid] = held
            try:
                if held[1] is not None:
                    signal.pidfd_send_signal(held[1], sig)
                else:
                    os.kill(pid, sig)
                hit += 1
            except OSError:
                pass
        return hit

    @staticmethod
    def _prove(pid: int, start: int) -> Optional[Tuple[int, Optional[int]]]:
        """(start, pidfd) once the pidfd names the process found (same start time)."""
        pidfd: Optional[int] = None
        try:
            pidfd = os.pidfd_open(pid)
        except AttributeError:
            pass
        except OSError:
            return None
        stat = _parent_and_start(pid)
        if stat is None or stat[1] != start:
            if pidfd is not None:
                os.close(pidfd)
            return None
        return start, pidfd

    def end(self, deadline: float) -> None:
        """After the TERM: wait (until ``deadline``) for them to exit, then KILL
        what is left (found again: what forked meanwhile too)."""
        _wait_pidfds([fd for _, fd in self._held.values() if fd is not None], deadline)
        self.signal(signal.SIGKILL)
        self.close()

    def close(self) -> None:
        for _, pidfd in self._held.values():
            if pidfd is not None:
                _close_quietly(pidfd)
        self._held.clear()


class _ContextHost(_Plain):
    """What a context's child needs from the agent."""

    spawner: Any                          # _Spawner: spawn(_ChildSpec) -> Popen
    late: _LateOutput
    kill_grace: float
    kernel_payload: Callable[[], bytes]
    agent_file: str
    watch: Optional[Callable[[int, Callable[[], None]], bool]] = None   # the exit watcher: prompt reaping
    limits: Any = None                    # passed through to the spawner (issue 15)
    user: Any = None


class _ContextChild:
    """A context's child: spawned by the spawner (its own session), watched
    through a pidfd, signalled only while unreaped, and ended with its group
    and every process carrying its marker."""

    language = ""

    def __init__(self, host: _ContextHost, env: Dict[str, str], cwd: str, marker: str) -> None:
        self.host = host
        self.env = env
        self.cwd = cwd
        self.marker = marker
        self.popen: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.pidfd: Optional[int] = None
        self._lock = threading.Lock()     # guards reaping against group signals (a reaped pid may be reused)
        self.tail = bytearray()           # the newest bytes it wrote outside calls
        self.late_bytes = 0               # every byte written where no call could take it
        self.calls = 0
        self.limits: Optional[_LimitValues] = host.limits   # api.md §14: the context's, else the defaults
        self.user: Optional[_RunAs] = host.user
        self.confinement: Optional[_Confinement] = None    # its cgroup: killed with it, removed once reaped

    @property
    def owner(self) -> Optional[Tuple[int, int]]:
        """(uid, gid) the child runs as when that is not the agent's: what it must open is given to it."""
        user = self.user
        return (user.uid, user.gid) if user is not None and not user.is_current else None

    def _spawn(self, argv: List[str], *, stdin: Any, stdout: Any, pass_fds: Tuple[int, ...]) -> None:
        spec = _ChildSpec(argv=argv, cwd=self.cwd, env=self.env, stdin=stdin, stdout=stdout,
                          stderr=stdout, pass_fds=pass_fds, limits=self.limits, user=self.user,
                          name="%s-%s" % (self.marker, secrets.token_hex(3)))
        try:
            self.popen = self.host.spawner.spawn(spec)
        finally:
            self.confinement = spec.confinement
        self.pid = self.popen.pid
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None            # then the call loop polls the child's status instead
        if self.host.watch is not None:  # reaped when it dies, even between calls (no zombie waits)
            self.host.watch(self.pid, self.exited)

    def late_output(self, data: bytes) -> None:
        """Sink of the late-output drainer: counted, the last bytes kept."""
        self.late_bytes += len(data)
        self.tail += data
        del self.tail[:-CHILD_TAIL_BYTES]

    # -- signals and the end --------------------------------------------------------

    def _poll(self) -> Optional[int]:
        """Popen.poll() (reaps at most once); the spawner forgets a reaped pid.
        Call with _lock held."""
        if self.popen is None:
            return -1
        if self.popen.returncode is not None:
            return self.popen.returncode
        code = self.popen.poll()
        if code is not None:
            self.host.spawner.untrack(self.pid)
        return code

    def exited(self) -> bool:
        with self._lock:
            return self._poll() is not None

    def signal(self, sig: int) -> bool:
        """Signal the child itself (not its group)."""
        with self._lock:
            if self._poll() is not None:
                return False
            try:
                if self.pidfd is not None:
                    signal.pidfd_send_signal(self.pidfd, sig)
                else:
                    os.kill(self.pid, sig)
                return True
            except OSError:
                return False

    def kill(self) -> None:
        """SIGKILL the child's group, everything carrying its marker and
        everything in its cgroup (marker dropped or not), then reap it."""
        with self._lock:
            if self._poll() is None:
                _killpg(self.pid, signal.SIGKILL)     # unreaped: the group id is still ours
        _end_processes(_marked_with(self.marker, tree=True), signal.SIGKILL)
        if self.confinement is not None:
            self.confinement.kill()
        self.reap(time.monotonic() + 5.0)

    def reap(self, deadline: float) -> Optional[int]:
        """Wait (bounded) for the child to exit; its exit status."""
        if self.popen is None:
            return None
        while True:
            with self._lock:
                code = self._poll()
            if code is not None or time.monotonic() >= deadline:
                return code
            if self.pidfd is not None:      # readable once it exited; the poll above reaps it
                select.select([self.pidfd], [], [], max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(0.01)

    def exit_info(self) -> Tuple[Optional[int], Optional[str]]:
        """(exit code as section 5 gives it, signal name) of an exited child."""
        code = self.popen.returncode if self.popen is not None else None
        if code is None:
            return None, None
        if code < 0:
            return 128 - code, _signal_name(-code)
        return code, None

    def close(self) -> None:
        self.kill()
        if self.pidfd is not None:
            _close_quietly(self.pidfd)
            self.pidfd = None
        if self.confinement is not None and self.exited():
            self.confinement.finish()       # usage read, cgroups removed

    # -- one call ---------------------------------------------------------------------

    checks_descriptors = False            # lost() can say something: the wait asks every CLIENT_CHECK_S

    def interrupt(self, marker: str) -> bool:
        raise NotImplementedError

    def lost(self) -> Optional[str]:
        """Why the child can no longer serve calls although it runs, or None."""
        return None

    def _release_writers(self) -> None:
        """The call is over: close what the agent holds of its output pipes' write ends (if anything)."""

    def _wait(self, call: _Call, output: _CallOutput, pipes: _CallPipes, channel: int,
              on_channel: Callable[[], Optional[Dict[str, Any]]]) -> Dict[str, Any]:
        """Until the child answers, dies, or the call's end is forced: at its
        timeout or when its client left, SIGINT (and TERM to the processes
        the call started); after the kill grace, the child is killed."""
        poller = select.poll()
        for fd in list(pipes.names) + [channel] + ([self.pidfd] if self.pidfd is not None else []):
            poller.register(fd, select.POLLIN)
        ending: Optional[str] = None
        kill_at = math.inf
        checking = call.gone is not None or self.checks_descriptors
        next_check = time.monotonic() + CLIENT_CHECK_S
        while True:
            now = time.monotonic()
            if checking and now >= next_check:
                next_check = now + CLIENT_CHECK_S
                lost = self.lost()
                if lost is not None:        # it can never answer: end the call now, not at its timeout
                    return {"ending": ending, "lost": lost, "kill_at": kill_at}
                if ending is None and call.gone is not None and call.gone():
                    ending = "client_gone"
            if ending is None and now >= call.deadline:
                ending = "timeout"
            if ending is not None and kill_at == math.inf:
                kill_at = now + self.host.kill_grace
                self.interrupt(call.marker)
                call.processes.signal(signal.SIGTERM)
            if now >= kill_at:
                return {"ending": ending, "kill": True}
            wake = kill_at if ending else call.deadline
            if checking:
                wake = min(wake, next_check)
            if self.pidfd is None:
                wake = min(wake, now + CLIENT_CHECK_S)
            if call.slow is not None:       # a call that does not answer within 50 ms is a long wait
                wake = min(wake, call.started + LONG_CALL_S)
                if now >= call.started + LONG_CALL_S:
                    call.waiting_long()
            events = poller.poll(max(0.0, wake - now) * 1000.0 + 0.5)
            answer = self._handle(events, output, pipes, poller, channel, on_channel)
            if answer is not None:
                answer["ending"] = ending
                answer["kill_at"] = kill_at
                return answer

    def _handle(self, events: List[Tuple[int, int]], output: _CallOutput, pipes: _CallPipes, poller: Any,
                channel: int, on_channel: Callable[[], Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
        """Pipes first (what was written before an answer is read before it),
        then the channel, then the child's exit."""
        fds = {fd for fd, _ in events}
        for fd in fds & set(pipes.names):
            if not pipes.read(fd, output):
                poller.unregister(fd)
        if channel in fds:
            answer = on_channel()
            if answer is not None:
                return answer
        if (self.pidfd is not None and self.pidfd in fds) or (self.pidfd is None and self.exited()):
            return {"died": True}
        return None

    def _settle(self, call: _Call, answer: Dict[str, Any], output: _CallOutput, pipes: _CallPipes) -> Dict[str, Any]:
        """After the wait: take the rest of the output, end what must end. A
        child that lost its own descriptors in this call is ended here, so the
        call that did it says so (not the next one)."""
        lost = self.lost() if answer.get("op") == "done" and self.checks_descriptors else None
        if lost is not None:
            answer["lost"] = lost
        if answer.get("kill") or answer.get("died") or answer.get("lost"):
            self.kill()           # a dead child's descendants go with it: its state is gone anyway
            self._release_writers()
            pipes.drain_until(output, time.monotonic() + DRAIN_AFTER_EXIT_S)
            if answer.get("op") != "done":        # no status came: the exit status is the answer
                code, signame = self.exit_info()
                answer.update(exit_code=code, signal=signame)
            answer.pop("cwd", None)
            answer["replace"] = True
        else:
            pipes.drain(output)
            if answer.get("ending") is not None:     # TERM went out at the interrupt: KILL what is left
                call.processes.end(answer["kill_at"])
        call.processes.close()
        pipes.orphan(self.host.late, self.late_output)
        return answer


class _PythonKernel(_ContextChild):
    """A Python context: `python3 -c _KERNEL_BOOTSTRAP` and its socketpair."""

    language = "python"

    def __init__(self, host: _ContextHost, env: Dict[str, str], cwd: str, marker: str, python: str) -> None:
        super().__init__(host, env, cwd, marker)
        self.python = python
        self.sock: Optional[socket.socket] = None
        self._inbox = bytearray()
        self.info: Dict[str, Any] = {}
        self.stale_frames = 0             # frames of no running call (dropped; see _on_channel)

    def start(self, deadline: float) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        idle_r, idle_w = os.pipe()
        try:
            argv = [self.python, "-c", _KERNEL_BOOTSTRAP, str(child.fileno()), self.host.agent_file]
            self._spawn(argv, stdin=subprocess.DEVNULL, stdout=idle_w, pass_fds=(child.fileno(),))
        except BaseException:
            parent.close()
            os.close(idle_r)
            raise
        finally:
            child.close()
            os.close(idle_w)
        self.host.late.adopt(idle_r, self.late_output)
        self.sock = parent
        try:
            parent.settimeout(max(0.001, deadline - time.monotonic()))
            parent.sendall(self.host.kernel_payload())
        except OSError:
            pass                          # it died already: the hello wait says so
        parent.setblocking(False)
        self.info = self._hello(deadline)

    def _hello(self, deadline: float) -> Dict[str, Any]:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while time.monotonic() < deadline:
            poller.poll(max(0.0, min(deadline - time.monotonic(), CLIENT_CHECK_S)) * 1000.0 + 0.5)
            frame = self._on_channel(None)
            if frame is not None and frame.get("op") == "hello":
                if frame.get("protocol") != _KERNEL_PROTOCOL:
                    raise _ChildBroken("kernel protocol %r, expected %r" % (frame.get("protocol"), _KERNEL_PROTOCOL))
                return frame
            if frame is not None or self.exited():
                break
        raise _ChildBroken("the kernel did not start")

    def _on_channel(self, output: Optional[_CallOutput], call_id: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Read the channel; the first answer frame (the hello, or the done of
        call ``call_id``), else None. EOF is the child's death. A frame of any
        other call is stale (it can only come from a call whose wait ended
        without its answer): dropped and counted, never taken for this one's."""
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":
            return {"died": True}
        if data:
            self._inbox += data
        while len(self._inbox) >= 4:
            size = int.from_bytes(self._inbox[:4], "big")
            if size > MAX_KERNEL_FRAME_BYTES:
                raise _ChildBroken("a frame of %d bytes" % size)
            if len(self._inbox) < 4 + size:
                return None
            try:
                frame = json.loads(bytes(self._inbox[4:4 + size]))
            except (ValueError, RecursionError):
                raise _ChildBroken("a frame that is not JSON") from None
            del self._inbox[:4 + size]
            if not isinstance(frame, dict):
                raise _ChildBroken("a frame that is not an object")
            op = frame.get("op")
            if op == "hello" and call_id is None:
                return frame
            if op not in ("output", "done") or call_id is None or frame.get("call") != call_id:
                self.stale_frames += 1
                self.late_bytes += size           # counted with the late output
            elif op == "output" and output is not None:
                output.add_frame(frame, size)
            elif op == "done":
                return frame
        return None

    def _send_request(self, frame: bytes, fds: List[int], deadline: float) -> None:
        """The request and the call's fds on the (non-blocking) channel; a
        big one waits for room, until the call's deadline."""
        view = memoryview(frame)
        view = view[socket.send_fds(self.sock, [view], fds):]
        while view:
            if not select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))[1]:
                raise OSError("the kernel does not read its channel")
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                continue

    def interrupt(self, marker: str) -> bool:
        """KeyboardInterrupt in the cell (the kernel ignores SIGINT between cells)."""
        return self.signal(signal.SIGINT)

    def run(self, call: _Call, output: _CallOutput, global_env: Dict[str, str]) -> Dict[str, Any]:
        self.calls += 1
        fds: List[int] = []
        try:
            for _ in range(2):
                fds.extend(os.pipe())
        except OSError as exc:            # out of descriptors: nothing ran, say so (503)
            for fd in fds:
                os.close(fd)
            raise _StartRefused(exc).error from None
        out_r, out_w, err_r, err_w = fds
        pipes = _CallPipes(out_r, err_r)
        call_id = self.calls
        request = json.dumps({"op": "exec", "call": call_id, "code": call.code, "env": call.env,
                              "global_env": global_env, "cwd": call.workdir, "marker": call.marker}).encode("ascii")
        frame = len(request).to_bytes(4, "big") + request
        call.processes = _CallProcesses(self.pid, self.marker, call.marker)
        try:
            self._send_request(frame, [out_w, err_w], call.deadline)
        except (OSError, ValueError):     # dead, closed by a restart, or too stuck to read: the wait decides
            pass
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            answer = self._wait(call, output, pipes, self.sock.fileno(), lambda: self._on_channel(output, call_id))
        except _ChildBroken as exc:
            answer = {"kill": True, "broken": str(exc)}
        return self._settle(call, answer, output, pipes)

    def close(self) -> None:
        super().close()
        if self.sock is not None:
            self.sock.close()


# What a bash context runs once. The shell reads its commands as a script
# (/dev/stdin, which bash moves to fd 255) and its own stdin becomes
# /dev/null, and the status pipe moves to fd 200: a call's code then meets
# none of the context's descriptors in the 3-19 range where scripts put
# theirs (bash keeps its saved copies of fds 0-2 at 10-12 during the code:
# those are harmless to close or write). Aliases on (they persist between
# calls), and an interrupt that unwinds the call's code however deep it is:
# SIGINT arms a DEBUG trap that, with extdebug, makes every command inside
# __hopx_src return.
BASH_STATUS_FD = 200
STATUS_EOF_GRACE_S = 0.05             # a shell whose status pipe closed gets this long to turn out dead
_STATUS_EOF = ["\0"]
BASH_INPUT_FD = 255                   # bash's own choice for a script's input
_BASH_PRELUDE = r"""
exec 0</dev/null 200>&{fd} {fd}>&-
BASH_ARGV0=bash
shopt -s expand_aliases
__hopx_dbg() { case " ${FUNCNAME[*]} " in *" __hopx_src "*) return 2;; esac; return 0; }
__hopx_int() { __hopx_intr=1; shopt -s extdebug; trap __hopx_dbg DEBUG; }
trap __hopx_int INT
__hopx_src() { . "$1"; }
printf 'ready %s\0' "$$" >&200
"""


class _BashShell(_ContextChild):
    """A bash context: one long-lived `bash --norc --noprofile`. Each call's
    code runs in the shell itself (so cd, exports, functions and aliases
    persist), its stdout and stderr go to FIFOs of that call, and its status
    comes back on a pipe of its own (fd 200 in the shell) with a nonce the
    code never sees. A cell can still close or replace the shell's command
    input (fd 255) or its status descriptor: the wait notices (every
    CLIENT_CHECK_S, and once the status came) and the call that did it
    answers with the shell ended and why."""

    language = "bash"
    checks_descriptors = True

    def __init__(self, host: _ContextHost, env: Dict[str, str], cwd: str, marker: str, bash: str) -> None:
        super().__init__(host, env, cwd, marker)
        self.bash = bash
        self.dir = ""
        self.status_fd = -1               # our read end; the shell writes to fd BASH_STATUS_FD
        self.command_fd = -1              # our write end of the shell's commands (its fd 255)
        self.fd_number = BASH_STATUS_FD
        self._status = bytearray()
        self._links: Dict[int, str] = {}  # the shell's fd -> what /proc says it must be ("pipe:[ino]")
        self._call_fds: List[int] = []    # the running call's FIFO ends: read, write, read, write
        self.applied_global: Dict[str, str] = {}

    def start(self, deadline: float) -> None:
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="hopx-bash-")
        if self.owner is not None:           # the shell runs as another user: its call files are its own
            os.chown(self.dir, *self.owner)
        command_r, self.command_fd = os.pipe()
        if self.owner is not None:        # bash opens /dev/stdin anew: as its user, the pipe must be its
            os.fchown(command_r, *self.owner)
        status_r, status_w = os.pipe()
        idle_r, idle_w = os.pipe()
        passed = status_w                 # its number in the shell until the prelude moves it to 200
        try:
            self._spawn([self.bash, "--norc", "--noprofile", "/dev/stdin"], stdin=command_r,
                        stdout=idle_w, pass_fds=(status_w,))
        except BaseException:
            for fd in (status_r, idle_r, self.command_fd):
                os.close(fd)
            self.command_fd = -1
            raise
        finally:
            for fd in (command_r, status_w, idle_w):
                os.close(fd)
        self.status_fd = status_r
        os.set_blocking(status_r, False)
        self.host.late.adopt(idle_r, self.late_output)
        self._send(_BASH_PRELUDE.replace("{fd}", str(passed)))
        self._ready(deadline)
        self._links = {BASH_INPUT_FD: "pipe:[%d]" % os.fstat(self.command_fd).st_ino,
                       BASH_STATUS_FD: "pipe:[%d]" % os.fstat(status_r).st_ino}
        if self.lost():                   # bash put its input elsewhere (a low RLIMIT_NOFILE): no checks
            self._links = {}

    def lost(self) -> Optional[str]:
        """Why the shell can no longer serve calls (the code closed or
        replaced its command input or its status descriptor), or None; a
        descriptor /proc does not show us (another user's shell) counts as kept."""
        for fd, link in self._links.items():
            try:
                if os.readlink("/proc/%d/fd/%d" % (self.pid, fd)) == link:
                    continue
            except FileNotFoundError:
                pass
            except OSError:
                continue
            if self.exited():
                return None               # it died: that is reported as a death
            what = "command input" if fd == BASH_INPUT_FD else "status descriptor"
            return ("the call closed or replaced the shell's %s (fd %d); the shell was ended and its "
                    "state is gone" % (what, fd))
        return None

    def _send(self, text: str) -> None:
        try:
            os.write(self.command_fd, text.encode("utf-8", "surrogateescape"))
        except OSError:
            pass                          # the shell is gone: the wait sees it

    def _ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            select.select([self.status_fd], [], [], max(0.0, min(deadline - time.monotonic(), CLIENT_CHECK_S)))
            record = self._read_status()
            if record is not None:
                if record[0] == "ready":
                    return
                break
            if self.exited():
                break
        raise _ChildBroken("bash did not start")

    def _read_status(self) -> Optional[List[str]]:
        """The next NUL-terminated status record; _STATUS_EOF at EOF (no
        record can be that: records are split at NUL bytes)."""
        while b"\0" not in self._status:
            try:
                data = os.read(self.status_fd, 4096)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                return _STATUS_EOF
            self._status += data
            if len(self._status) > 65536:     # a cell writing to fd 200: keep what may end in a record
                del self._status[:-4096]
        record, _, rest = bytes(self._status).partition(b"\0")
        self._status[:] = rest
        return record.decode("utf-8", "surrogateescape").split(" ", 3)

    def interrupt(self, marker: str) -> bool:
        """SIGINT to the running command (the processes of this call below
        the shell), then to the shell, whose trap unwinds the call's code."""
        if self.exited():
            return False
        for pid in _descendants(self.pid):
            if _marker_of(_read_environ(pid)) == marker:
                _signal_marked(pid, marker, signal.SIGINT)
        return self.signal(signal.SIGINT)

    def _env_lines(self, env: Dict[str, str], global_env: Dict[str, str]) -> Tuple[List[str], List[str]]:
        """Shell lines applying the global env (it persists) and the request's
        env (restored after the call unless the code changed it)."""
        before: List[str] = []
        after: List[str] = []
        glob = {k: v for k, v in global_env.items() if _SHELL_NAME.match(k)}
        for key, value in self.applied_global.items():
            if key not in glob:           # dropped from the store: the shell's own value back
                back = "export %s=%s" % (key, _sh_quote(self.env[key])) if key in self.env else "unset " + key
                before.append('if [ "${%s-}" = %s ]; then %s; fi' % (key, _sh_quote(value), back))
        before.extend("export %s=%s" % (k, _sh_quote(v)) for k, v in glob.items()
                      if self.applied_global.get(k) != v)
        self.applied_global = glob
        for i, (key, value) in enumerate(env.items()):
            before.append("__hopx_h%d=${%s+x} __hopx_v%d=${%s-}; export %s=%s"
                          % (i, key, i, key, key, _sh_quote(value)))
            after.append('if [ "${%s-}" = %s ]; then if [ -n "$__hopx_h%d" ]; then %s=$__hopx_v%d; '
                         'else unset %s; fi; fi; unset __hopx_h%d __hopx_v%d'
                         % (key, _sh_quote(value), i, key, i, key, i, i))
        return before, after

    def run(self, call: _Call, output: _CallOutput, global_env: Dict[str, str]) -> Dict[str, Any]:
        self.calls += 1
        base = os.path.join(self.dir, str(self.calls))
        paths = [base + suffix for suffix in (".sh", ".out", ".err", ".call")]
        fds: List[int] = []
        self._call_fds = fds
        try:
            try:
                nonce = self._prepare(call, global_env, paths, fds)
            except OSError as exc:        # no disk or no descriptors: nothing ran, say so (507, 503)
                for fd in fds:
                    _close_quietly(fd)
                fds.clear()
                raise _StartRefused(exc).error from None
            pipes = _CallPipes(fds[0], fds[2])
            call.processes = _CallProcesses(self.pid, self.marker, call.marker)
            self._send(". %s\n" % _sh_quote(paths[3]))
            answer = self._wait(call, output, pipes, self.status_fd, lambda: self._on_status(nonce))
            return self._settle(call, answer, output, pipes)
        finally:
            for fd in fds[1::2]:
                _close_quietly(fd)
            for path in paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _prepare(self, call: _Call, global_env: Dict[str, str], paths: List[str], fds: List[int]) -> str:
        """The call's files: its code, two FIFOs (read ends in ``fds``, each
        with a writer of ours: until the status arrives, no writer yet is not
        EOF) and the call file the shell sources; returns the status nonce."""
        with open(os.open(paths[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(call.code.encode("utf-8", "surrogateescape"))
        for path in paths[1:3]:
            os.mkfifo(path, 0o600)
            fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            fds.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        nonce = secrets.token_hex(16)
        with open(os.open(paths[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(self._wrapper(call, global_env, nonce, paths))
        if self.owner is not None:
            for path in paths:
                os.chown(path, *self.owner)
        return nonce


    def _wrapper(self, call: _Call, global_env: Dict[str, str], nonce: str, paths: List[str]) -> str:
        before, after = self._env_lines(call.env, global_env)
        cd = "cd -- %s && " % _sh_quote(call.workdir) if call.workdir else ""
        fd = self.fd_number
        return "\n".join(
            ["trap - DEBUG; shopt -u extdebug; __hopx_intr=0"] + before
            + ["{ export HOPX_PROCESS_ID=%s; %s__hopx_src %s; } </dev/null >%s 2>%s"
               % (_sh_quote(call.marker), cd, _sh_quote(paths[0]), _sh_quote(paths[1]), _sh_quote(paths[2])),
               "__hopx_st=$?", "trap - DEBUG; shopt -u extdebug",
               "export HOPX_PROCESS_ID=%s" % _sh_quote(self.marker)] + after
            + ["printf '%%s %%d %%d %%s\\0' %s \"$__hopx_st\" \"$__hopx_intr\" \"$PWD\" >&%d" % (nonce, fd), ""])

    def _release_writers(self) -> None:
        """Our writers of the call's FIFOs go: EOF is real now (until the status
        came, no writer yet was not EOF)."""
        fds = self._call_fds
        for i in (1, 3):
            if i < len(fds) and fds[i] >= 0:
                _close_quietly(fds[i])
                fds[i] = -1

    def _on_status(self, nonce: str) -> Optional[Dict[str, Any]]:
        while True:
            record = self._read_status()
            if record is None:
                return None
            if record == _STATUS_EOF:         # no writer left: it died, or the cell closed fd 200
                self.reap(time.monotonic() + STATUS_EOF_GRACE_S)
                lost = self.lost()
                return {"lost": lost} if lost is not None else {"died": True}
            text = " ".join(record)           # stray bytes a cell wrote to fd 200 may lead the record
            record = text[text.rfind(nonce + " "):].split(" ", 3) if nonce + " " in text else []
            if len(record) == 4:
                self._release_writers()
                status, interrupted = int(record[1]), record[2] == "1"
                return {"op": "done", "status": "interrupted" if interrupted and status else "ok",
                        "exit_code": 130 if interrupted and status else status, "cwd": record[3]}

    def close(self) -> None:
        super().close()
        for fd in (self.status_fd, self.command_fd):
            if fd >= 0:
                _close_quietly(fd)
        self.status_fd = self.command_fd = -1     # a second close must not hit a reused number
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class _Context:
    """One context: its child (started on first use), a FIFO of calls (one
    runs at a time, in order of arrival), and what it shows in listings."""

    def __init__(self, manager: "_ContextManager", context_id: str, language: str, name: Optional[str],
                 workdir: str, env: Dict[str, str], limits: Optional[_LimitValues] = None,
                 user: Optional[_RunAs] = None) -> None:
        self.manager = manager
        self.limits = limits if limits is not None else manager.host.limits   # api.md §14, for each child
        self.user = user if user is not None else manager.host.user
        self.id = context_id
        self.language = language
        self.name = name
        self.workdir = workdir            # where the next call starts unless it says otherwise
        self.home = workdir               # where a new child starts: its state (cwd too) is fresh
        self.env = env                    # given at creation: part of the child's environment
        self.marker = "%s.%s" % (manager.marker_prefix, secrets.token_hex(6))
        self.created = time.time()
        self.cond = threading.Condition()  # guards every field below
        self.last_activity = self.created
        self.last_used = time.monotonic()
        self.child: Optional[_ContextChild] = None
        self.starting = False
        self.dead: Optional[str] = None    # why the last child is gone (it died, it was killed)
        self.loss_reported = True          # an answer (or the restart request) said the state is gone
        self.deleted = False
        self.queue: collections.deque = collections.deque()   # tickets: the head one runs
        self.running = False
        self.executions = 0
        self.restarts = 0
        self.late_dropped = 0              # bytes written where no call could take them
        self.timer: Optional[Any] = None   # the idle check, when one is scheduled
        self.upgraded: Optional[str] = None   # durability: an upgrade in place took the state; the next answer says so

    @property
    def is_default(self) -> bool:
        return self.id == "default"

    def state(self) -> str:
        with self.cond:
            if self.starting:
                return "starting"
            if self.running:
                return "busy"
            child = self.child
            if self.dead is not None and child is None:
                return "dead"
        if child is not None and child.exited():
            return "dead"
        return "idle"

    def describe(self) -> Dict[str, Any]:
        state = self.state()
        with self.cond:
            child = self.child
            late = self.late_dropped + (child.late_bytes if child is not None else 0)
            return {"context_id": self.id, "language": self.language, "name": self.name,
                    "workdir": self.workdir, "state": state, "created_at": _rfc3339(self.created),
                    "last_activity": _rfc3339(self.last_activity), "default": self.is_default,
                    "pid": child.pid if child is not None else None, "started": child is not None,
                    "execution_count": self.executions, "connections": len(self.queue),
                    "restarts": self.restarts, "late_output_dropped": late,
                    "limits": self.limits.given() if self.limits is not None else {},
                    "user": self.user.name if self.user is not None else None}

    # -- the queue ------------------------------------------------------------------

    def _enter(self, ticket: object, call: _Call) -> bool:
        """Wait for this call's turn; False when its timeout passed first (it
        never runs then). A client that hangs up while waiting leaves the queue."""
        with self.cond:
            if self.deleted:
                raise NotFound("context %s not found" % self.id, code="CONTEXT_NOT_FOUND")
            self.queue.append(ticket)
            first = self.queue[0] is ticket
        if not first:
            call.waiting_long()           # outside the lock: it hands the connection to the hub
        with self.cond:
            while self.queue[0] is not ticket:
                remaining = call.deadline - time.monotonic()
                if self.deleted:
                    raise NotFound("context %s was deleted" % self.id, code="CONTEXT_NOT_FOUND")
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, CLIENT_CHECK_S) if call.gone is not None else remaining)
                if call.gone is not None and call.gone():
                    raise _ClientGone()
            if self.deleted:
                raise NotFound("context %s was deleted" % self.id, code="CONTEXT_NOT_FOUND")
            self.running = True
            return True

    def _leave(self, ticket: object) -> None:
        with self.cond:
            if self.queue and self.queue[0] is ticket:
                self.running = False          # only the head ever runs
            if ticket in self.queue:
                self.queue.remove(ticket)
            self.last_activity = time.time()
            self.last_used = time.monotonic()
            self.cond.notify_all()

    def execute(self, call: _Call) -> Dict[str, Any]:
        """Run one call in this context and answer as /execute does."""
        ticket = object()
        try:
            if not self._enter(ticket, call):
                return self._answer(call, _CallOutput(0, None), {"ending": "timeout", "never_ran": True})
            return self._run(call)
        finally:
            self._leave(ticket)
            self.manager.touched(self)

    def start_now(self) -> None:
        """Start the child without running a call (--python-kernel prestart);
        it takes its turn in the queue like a call."""
        ticket = object()
        call = _Call(code="", timeout=KERNEL_START_TIMEOUT_S)
        try:
            if self._enter(ticket, call):
                failed = self._ensure_child(call, _CallOutput(CHILD_TAIL_BYTES, None))
                if isinstance(failed, dict):
                    log.warning("the %s context %s did not start: %s", self.language, self.id,
                                failed["error"]["value"])
        finally:
            self._leave(ticket)

    def _run(self, call: _Call) -> Dict[str, Any]:
        output = _CallOutput(self.manager.max_output_bytes, call.on_event)
        previous = self._ensure_child(call, output)
        if previous is None and self.upgraded:     # one call at a time: no lock needed for this field
            previous, self.upgraded = self.upgraded, None
        if isinstance(previous, dict):       # the child could not start: that is the answer
            return self._answer(call, output, previous)
        with self.cond:
            child = self.child
            self.executions += 1
            call.marker = "%s.%d" % (self.marker, self.executions)
        outcome = child.run(call, output, self.manager.global_env())
        with self.cond:
            self.late_dropped += int(outcome.get("late_bytes") or 0)
        if outcome.get("replace"):
            self._lose_child(child, outcome, reported=True)
        with self.cond:
            if outcome.get("cwd"):
                self.workdir = outcome["cwd"]
        if previous:
            outcome.setdefault("restart_reason", previous)
        return self._answer(call, output, outcome)

    # -- the child ------------------------------------------------------------------

    def _ensure_child(self, call: _Call, output: _CallOutput) -> Any:
        """A running child for the call: the one there is, else a new one.
        Returns why an earlier one is gone when no answer said so yet (its
        state went with it), a failure outcome if none can start, or None."""
        with self.cond:
            child = self.child
        if child is not None and not child.exited():
            return None
        if child is not None:                   # it died between calls (os._exit in a thread, OOM)
            code, signame = child.exit_info()
            self._lose_child(child, {"exit_code": code, "signal": signame}, reported=False)
        with self.cond:
            lost = self.dead if not self.loss_reported else None
            self.starting = True
        child = None
        try:
            child = self.manager.new_child(self)
            child.start(min(call.deadline, time.monotonic() + KERNEL_START_TIMEOUT_S))
        except (OSError, _ChildBroken) as exc:
            said = child.tail.decode("utf-8", "replace") if child is not None else ""
            if child is not None:
                child.close()
            if isinstance(exc, OSError) and exc.errno in _SHORTAGES:   # nothing ran: 503, 507
                raise _StartRefused(exc).error from None
            output.add("stderr", ("hopx_agent: the %s context could not start: %s\n%s"
                                  % (self.language, exc, said)).encode("utf-8", "replace"))
            return {"start_failed": True, "exit_code": 1,
                    "error": {"name": "ContextStartError", "value": str(exc), "traceback": ""}}
        finally:
            with self.cond:
                self.starting = False
        with self.cond:
            self.child = child
            self.dead = None
            self.loss_reported = True
        return lost

    def _lose_child(self, child: _ContextChild, outcome: Dict[str, Any], *, reported: bool) -> None:
        """End a child whose state is gone; ``reported``: an answer says so."""
        child.close()
        with self.cond:
            if self.child is child:
                self.child = None
                self.workdir = self.home
                self.late_dropped += child.late_bytes
                self.restarts += 1
                signame = outcome.get("signal")
                self.dead = outcome.get("why") or ("killed by %s" % signame if signame else
                                                   "exit status %s" % outcome.get("exit_code"))
                self.loss_reported = reported

    def interrupt(self) -> str:
        """SIGINT to the running call (an idle context: nothing to do)."""
        with self.cond:
            child = self.child if self.running else None
            marker = "%s.%d" % (self.marker, self.executions)
        if child is None or not child.interrupt(marker):
            return "idle"
        return "interrupted"

    def restart(self, why: str = "it was restarted on request") -> None:
        """Kill the child (a running call ends with context_restarted); the
        next call gets a fresh one."""
        with self.cond:
            child = self.child
        if child is not None:
            self._lose_child(child, {"why": why}, reported=True)

    def close(self) -> None:
        with self.cond:
            self.deleted = True
            child = self.child
            self.cond.notify_all()
            timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        if child is not None:
            self._lose_child(child, {"why": "the context was deleted"}, reported=True)

    # -- the answer -----------------------------------------------------------------

    def _answer(self, call: _Call, output: _CallOutput, outcome: Dict[str, Any]) -> Dict[str, Any]:
        output.flush_events()
        ending = outcome.get("ending")
        timed_out = ending == "timeout"
        replaced = bool(outcome.get("replace"))
        exit_code = 124 if timed_out else outcome.get("exit_code")
        stdout, _, _ = output.stdout.read(None, True)
        stderr, _, _ = output.stderr.read(None, True)
        answer: Dict[str, Any] = {
            "success": exit_code == 0 and not outcome.get("error") and not replaced,
            "stdout": stdout, "stderr": stderr, "exit_code": exit_code,
            "execution_time": round(time.monotonic() - call.started, 6),
            "language": self.language, "timestamp": _rfc3339(time.time()), "timed_out": timed_out,
            "stdout_bytes": output.stdout.total, "stderr_bytes": output.stderr.total,
            "stdout_dropped": output.stdout.dropped, "stderr_dropped": output.stderr.dropped,
            "context_id": self.id, "context_restarted": replaced or bool(outcome.get("restart_reason")),
        }
        if outcome.get("execution_count") is not None:
            answer["execution_count"] = outcome["execution_count"]
        if outcome.get("never_ran"):
            answer["never_ran"] = True
        if outcome.get("signal"):
            answer["signal"] = outcome["signal"]
        if outcome.get("status") == "interrupted" and not timed_out:
            answer["interrupted"] = True
        if ending == "client_gone":
            answer["reason"] = "client_gone"
        if replaced:
            answer["restart_reason"] = self._replaced_why(outcome, timed_out)
        elif outcome.get("restart_reason"):
            answer["restart_reason"] = "the previous %s context was gone (%s); this call ran in a new one" % (
                self.language, outcome["restart_reason"])
        error = outcome.get("error")
        if replaced and not error:
            error = {"name": "ContextRestarted", "value": answer["restart_reason"], "traceback": ""}
        if error:
            answer["error"] = error
        if self.language == "python":
            self._rich_fields(answer, output, outcome)
        return answer

    def _replaced_why(self, outcome: Dict[str, Any], timed_out: bool) -> str:
        if outcome.get("lost"):
            return outcome["lost"]
        if outcome.get("broken"):
            return "the kernel broke its protocol (%s) and was killed; its state is gone" % outcome["broken"]
        if outcome.get("kill"):
            return ("the call did not stop within the kill grace after SIGINT; the context was killed "
                    "and its state is gone")
        with self.cond:
            why = self.dead
        return "the context died (%s); its state is gone" % (why or "unknown")

    @staticmethod
    def _rich_fields(answer: Dict[str, Any], output: _CallOutput, outcome: Dict[str, Any]) -> None:
        """HopX's top-level fields (the last of each kind) and the ordered results."""
        for item in output.results:
            for mime, field in _TOP_LEVEL_MIME:
                if item["type"] == mime:
                    answer[field] = item["data"]
        text = outcome.get("result")
        if isinstance(text, str):
            answer["result"] = text
            if outcome.get("result_dropped"):    # the repr's head is kept, the rest counted
                answer["result_dropped"] = int(outcome["result_dropped"])
        answer["results"] = output.results
        dropped = output.results_dropped + int(outcome.get("results_dropped") or 0)
        if dropped:
            answer["results_dropped"] = dropped


class _ContextManager:
    """Every context of the agent: the default Python one (addressable as
    "default", started on first use or at start), the named ones (at most
    ``max_contexts``, ended after ``idle_timeout`` without calls), and the
    drainer of their late output."""

    def __init__(self, *, spawner: Any, workdir: str, kill_grace: float, max_output_bytes: int,
                 base_env: Callable[[], Dict[str, str]], global_env: Callable[[], Dict[str, str]],
                 schedule: Callable[[float, Callable[[], None]], Any], python_kernel: str = "lazy",
                 max_contexts: int = MAX_CONTEXTS, idle_timeout: float = CONTEXT_IDLE_TIMEOUT_S,
                 agent_file: Optional[str] = None, watch: Any = None, limits: Any = None,
                 user: Any = None) -> None:
        self.workdir = workdir
        self.max_output_bytes = max_output_bytes
        self.max_contexts = max_contexts
        self.idle_timeout = idle_timeout
        self.python_kernel = python_kernel
        self.base_env = base_env           # the agent's env (secret removed): a child starts with it
        self.global_env = global_env       # applied to os.environ at each call
        self._schedule = schedule
        self.marker_prefix = "ctx_" + secrets.token_hex(6)
        self.late = _LateOutput()
        path = os.path.abspath(agent_file or __file__)
        self._payload: Optional[bytes] = None
        self._source: Optional[Tuple[int, bytes]] = None
        self.host = _ContextHost(spawner=spawner, late=self.late, kill_grace=kill_grace,
                                 kernel_payload=self.kernel_payload, agent_file=path, watch=watch,
                                 limits=limits, user=user)
        self._lock = threading.Lock()      # guards _contexts and _closed
        self._contexts: Dict[str, _Context] = {}
        self._bash = _Recent(lambda: _find_program("bash"), LANGUAGES_CACHE_S)   # for features()
        self._closed = False
        if python_kernel != "off":
            self._contexts["default"] = _Context(self, "default", "python", "default", workdir, {})
        if python_kernel != "off":          # read now: a file replaced later cannot change our kernel
            self._source = _kernel_source(path)

    def kernel_payload(self) -> bytes:
        """Compiled on first use, after the first kernel was spawned: while
        that python3 starts, so the compile costs the first call nothing."""
        if self._payload is None:
            first, source = self._source or _kernel_source(self.host.agent_file)
            self._payload = _kernel_payload(first, source, self.host.agent_file)
        return self._payload

    def prestart(self) -> None:
        """--python-kernel prestart: the default kernel starts now (in a thread,
        so the agent answers at once; the first call waits for it)."""
        default = self._contexts.get("default")
        if default is not None and self.python_kernel == "prestart":
            threading.Thread(target=self._prestart, args=(default,), name="hopx-ctx-prestart",
                             daemon=True).start()

    def _prestart(self, context: _Context) -> None:
        try:
            context.start_now()
        except Exception:
            log.exception("prestarting the default kernel failed")

    # -- the registry ---------------------------------------------------------------

    @property
    def default(self) -> Optional[_Context]:
        return self._contexts.get("default")

    def create(self, language: str, *, name: Optional[str] = None, workdir: Optional[str] = None,
               env: Optional[Dict[str, str]] = None, limits: Optional[_LimitValues] = None,
               user: Optional[_RunAs] = None) -> _Context:
        if language not in _CONTEXT_LANGUAGES:
            raise BadRequest("a context's language is one of %s" % ", ".join(_CONTEXT_LANGUAGES))
        program = _find_program(language)
        if program is None:
            raise BadRequest("language %r needs %s, which is not installed" % (language, language))
        if workdir is not None and not os.path.isdir(workdir):
            raise BadRequest("workdir %s does not exist" % workdir)
        context = _Context(self, "ctx_" + secrets.token_hex(12), language, name,
                           workdir or self.workdir, dict(env or {}), limits, user)
        with self._lock:
            if self._closed:
                raise Unavailable("the agent is shutting down")
            named = sum(1 for c in self._contexts.values() if not c.is_default)
            if named >= self.max_contexts:
                raise LimitExceeded("at most %d contexts at once (--max-contexts); delete one first"
                                    % self.max_contexts)
            self._contexts[context.id] = context
        self.touched(context)
        return context

    @staticmethod
    def check_shell_env(env: Dict[str, str]) -> None:
        bad = [key for key in env if not _SHELL_NAME.match(key)]
        if bad:
            raise BadRequest("a bash context's env names must be shell names: %s" % ", ".join(sorted(bad)[:5]))

    def get(self, context_id: str) -> _Context:
        with self._lock:
            context = self._contexts.get(context_id)
        if context is None:
            raise NotFound("context %s not found" % context_id, code="CONTEXT_NOT_FOUND")
        return context

    def list(self) -> List[Dict[str, Any]]:
        with self._lock:
            contexts = sorted(self._contexts.values(), key=lambda c: (not c.is_default, c.created))
        return [c.describe() for c in contexts]

    def delete(self, context_id: str) -> None:
        context = self.get(context_id)
        if context.is_default:
            context.restart("the default context was reset by a delete request")
            return
        with self._lock:
            self._contexts.pop(context_id, None)
        context.close()

    def sessions(self) -> List[Dict[str, Any]]:
        """GET /jupyter/sessions: one session per Python context."""
        sessions = []
        for item in self.list():
            if item["language"] == "python":
                sessions.append({"kernel_id": item["context_id"], "id": item["context_id"],
                                 "name": item["name"], "execution_state": item["state"],
                                 "connections": item["connections"], "last_activity": item["last_activity"],
                                 "execution_count": item["execution_count"], "pid": item["pid"]})
        return sessions

    # -- children and idleness ------------------------------------------------------

    def new_child(self, context: _Context) -> _ContextChild:
        env = dict(self.base_env())
        env.update(context.env)
        env[PROCESS_ID_ENV] = context.marker
        env.pop(SECRET_ENV, None)
        program = _find_program(context.language)
        if program is None:
            raise _ChildBroken("%s is not installed" % context.language)
        cwd = context.workdir if os.path.isdir(context.workdir) else self.workdir
        child: _ContextChild = (_BashShell(self.host, env, cwd, context.marker, program)
                                if context.language == "bash" else
                                _PythonKernel(self.host, env, cwd, context.marker, program))
        child.limits, child.user = context.limits, context.user
        return child

    def touched(self, context: _Context) -> None:
        """After a call: make sure an idle check is due for a named context."""
        if context.is_default or self.idle_timeout <= 0:
            return
        with context.cond:
            if context.timer is not None or context.deleted:
                return
            context.timer = self._schedule(self.idle_timeout, lambda: self._idle_check(context))

    def _idle_check(self, context: _Context) -> None:
        with context.cond:
            context.timer = None
            busy = bool(context.queue) or context.deleted
            idle_for = time.monotonic() - context.last_used
        if busy:
            return
        if idle_for >= self.idle_timeout:
            log.info("context %s idle for %.0f s: ended", context.id, idle_for)
            with self._lock:
                self._contexts.pop(context.id, None)
            context.close()
            return
        with context.cond:
            if context.timer is None and not context.deleted:
                context.timer = self._schedule(self.idle_timeout - idle_for, lambda: self._idle_check(context))

    def features(self) -> Dict[str, Any]:
        """api.md §15: what this family answers."""
        return {"rich_output": True, "ipython_kernel": self.default is not None, "contexts": True,
                "bash_contexts": self._bash.get() is not None, "jupyter_sessions": True}

    # -- durability (issue 16): an upgrade in place restarts the contexts ------------
    #
    # A kernel's state lives in its process and on its channel, mid-call at
    # any time: it is not handed over. Before the exec each child is ended
    # (with the processes its calls started); the contexts themselves (ids,
    # names, languages, directories, counts) are handed over, and the next
    # call of each one that had a child answers context_restarted: true.

    handover_name = "contexts"
    _UPGRADED = "the agent was upgraded in place; the context's state is gone"

    def prepare_upgrade(self) -> None:
        """Before the exec: every context's child ended (a call in flight answers now)."""
        with self._lock:
            contexts = list(self._contexts.values())
        for context in contexts:
            with context.cond:
                child = context.child
            if child is not None:
                context._lose_child(child, {"why": self._UPGRADED}, reported=False)

    def hand_over(self, writer: Any) -> Dict[str, Any]:
        with self._lock:
            contexts = list(self._contexts.values())
        items = []
        for context in contexts:
            with context.cond:
                items.append({"id": context.id, "language": context.language, "name": context.name,
                              "home": context.home, "env": context.env, "created": context.created,
                              "last_activity": context.last_activity, "executions": context.executions,
                              "restarts": context.restarts, "late_dropped": context.late_dropped,
                              "lost": context.child is not None or not context.loss_reported
                              or context.upgraded is not None})
        return {"contexts": items}

    def adopt(self, part: Any, reader: Any) -> None:
        """The successor's side: the same contexts, with fresh children on first use."""
        for item in (part or {}).get("contexts", []):
            with self._lock:
                context = self._contexts.get(item["id"])
                if context is None and item["id"] != "default":
                    context = self._contexts[item["id"]] = _Context(
                        self, item["id"], item["language"], item["name"], item["home"], dict(item["env"]))
            if context is None:          # the default context, with --python-kernel off now
                continue
            with context.cond:
                context.created, context.last_activity = item["created"], item["last_activity"]
                context.executions, context.restarts = item["executions"], item["restarts"]
                context.late_dropped = item["late_dropped"]
                if item["lost"]:
                    context.upgraded = self._UPGRADED
            if not context.is_default:
                self.touched(context)        # its idle timeout goes on

    def close(self, deadline: Optional[float] = None) -> None:
        """Shutdown: every child killed (with its processes), the drainer stopped."""
        with self._lock:
            self._closed = True
            contexts = list(self._contexts.values())
            self._contexts.clear()
        for context in contexts:
            try:
                context.close()
            except Exception:
                log.exception("closing context %s failed", context.id)
        self.late.close()


# ============================================================================
# Endpoints: contexts (stateful code: /execute in the default context, /contexts, /jupyter/sessions)
# ============================================================================


def _canonical_language(value: Any) -> Optional[str]:
    """A request's language as its canonical name (None when unknown: the
    process path then answers with the list of known ones)."""
    if value is None:
        return "python"
    return _LANGUAGE_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None


def _context_of(srv: "_AgentServer", body: Dict[str, Any]) -> Optional[_Context]:
    """The context a code request runs in, or None for a fresh process:
    ``context_id`` names one, Python runs in the default one unless
    ``isolated`` (or --python-kernel off)."""
    isolated = _flag(body, "isolated")
    context_id = body.get("context_id")
    language = _canonical_language(body.get("language"))
    # api.md §14: limits or a user of its own make a call a process of its
    # own (where they are enforced); a context's are set when it is created.
    confined = [f for f in tuple(_LIMIT_FIELDS) + ("user",) if body.get(f) is not None]
    if context_id is None:
        return srv.contexts.default if language == "python" and not isolated and not confined else None
    context = srv.contexts.get(_text(context_id, "context_id"))
    if isolated:
        raise BadRequest("'context_id' and 'isolated: true' contradict each other")
    if confined:
        raise BadRequest("a context's limits and user are given when it is created (POST /contexts), "
                         "not per call: %s" % ", ".join(confined), details={"field": confined[0]})

    if body.get("language") is not None and language != context.language:
        raise BadRequest("context %s runs %s, not %s" % (context.id, context.language, body.get("language")))
    return context


def _context_workdir(srv: "_AgentServer", body: Dict[str, Any]) -> Optional[str]:
    """Where a call starts: the request's directory, or None (where the last
    call left it). A missing /workspace counts as none (the SDK always sends it)."""
    value = _workdir(body)
    if value is None or value == "" or (os.path.normpath(value) == "/workspace" and not os.path.isdir(value)):
        return None
    return srv.manager.launcher.resolve_cwd(value)


def _context_call(srv: "_AgentServer", req: _Request, context: _Context, body: Dict[str, Any],
                  on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
                  gone: Optional[Callable[[], bool]] = None) -> _Call:
    env = _env_map(body.get("env"), "env")
    env.pop(SECRET_ENV, None)             # api.md §1: never reaches a child, whoever names it
    if context.language == "bash":
        srv.contexts.check_shell_env(env)
    return _Call(code=_required_text(body, "code", nul_ok=True),
                 timeout=_timeout(body, SYNC_TIMEOUT_S, MAX_SYNC_TIMEOUT_S), env=env,
                 workdir=_context_workdir(srv, body), gone=gone or req.client_gone, on_event=on_event,
                 slow=None if on_event is not None else req.long_wait)


def _execute(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    """POST /execute (/execute/rich, /execute/ipython): Python in the default
    context, a named context with ``context_id``, else a fresh process."""
    body = req.json()
    _pty_field(body, allowed=False)      # "pty" is for background starts (api.md §12): a clear 400 here
    context = _context_of(srv, body)
    if context is None:
        return _execute_process(srv, req)
    answer = context.execute(_context_call(srv, req, context, body))
    if answer.get("reason") == "client_gone":
        raise _ClientGone()          # its cell was interrupted; nobody is there to answer
    return answer


class _StreamOutbox:
    """The events of a streaming call on their way to its WebSocket. The call
    only queues them, never waits for the client: a client that reads slowly
    or not at all must not hold the call past its timeout, nor the context
    that runs the next calls. One writer thread sends. Past
    STREAM_OUTBOX_BYTES queued, events are dropped and counted, and the
    client is told ({"type": "dropped", "events", "bytes"}) before the next
    one it gets. The end (the result, or an error) is queued last and never
    dropped; ``finish`` waits for it, bounded."""

    def __init__(self, ws: _WebSocket, name: str) -> None:
        self._ws = ws
        self._cond = threading.Condition()   # guards _queue, _queued, _dropped, _final
        self._queue: collections.deque = collections.deque()
        self._queued = 0                      # bytes in _queue (as estimated by _size)
        self._dropped = [0, 0]                # events and bytes dropped since the client was last told
        self._final: Optional[Callable[[], None]] = None
        self.dropped_events = 0               # in all, for the result message
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @staticmethod
    def _size(event: Dict[str, Any]) -> int:
        data = event.get("data")
        return 2 * len(data) if isinstance(data, str) else len(json.dumps(data))   # text goes out twice

    def put(self, event: Dict[str, Any]) -> None:
        """Queue an event (the call's sink: never blocks)."""
        size = self._size(event)
        with self._cond:
            if self._final is not None or self._ws.gone:
                return
            if self._queue and self._queued + size > STREAM_OUTBOX_BYTES:
                self._dropped[0] += 1
                self._dropped[1] += size
                self.dropped_events += 1
                return
            self._queue.append((event, size))
            self._queued += size
            self._cond.notify()

    def finish(self, final: Callable[[], None]) -> None:
        """Queue the end (run by the writer after every queued event) and wait
        for the writer: each send is bounded by WRITE_TIMEOUT_S, after which
        the client counts as gone and the rest is discarded."""
        with self._cond:
            self._final = final
            self._cond.notify()
        self._thread.join(STREAM_FINISH_S)

    def _next(self) -> Tuple[Optional[Dict[str, Any]], List[int], Optional[Callable[[], None]]]:
        """(event, dropped to report, the end once nothing is queued)."""
        with self._cond:
            deadline = time.monotonic() + SSE_HEARTBEAT_S
            while not self._queue and self._final is None and not self._ws.gone:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    deadline = time.monotonic() + SSE_HEARTBEAT_S   # bounded waits; the call still runs
            dropped, self._dropped = self._dropped, [0, 0]
            if not self._queue:
                return None, dropped, self._final
            event, size = self._queue.popleft()
            self._queued -= size
            return event, dropped, None

    def _run(self) -> None:
        try:
            while not self._ws.gone:
                event, dropped, final = self._next()
                if dropped[0] and not self._ws.gone:
                    self._ws.send_json({"type": "dropped", "events": dropped[0], "bytes": dropped[1],
                                        "timestamp": _rfc3339(time.time())})
                if event is not None:
                    _ws_send_event(self._ws, event)
                elif final is not None:
                    if not self._ws.gone:
                        final()
                    return
        except _WsClosed:
            pass
        except Exception:
            log.exception("a /execute/stream writer failed")
        finally:
            with self._cond:
                self._queue.clear()
                self._queued = 0


def _stream_ws(srv: "_AgentServer", req: _Request) -> _Upgrade:
    """GET /execute/stream: Python runs in its context, with output frames
    as the kernel produces them; other languages as processes."""
    return _Upgrade(lambda ws: _ws_code_session(srv, ws))


def _ws_code_session(srv: "_AgentServer", ws: _WebSocket) -> None:
    body = _ws_first_message(srv, ws)
    if body is None:
        return
    try:
        context = _context_of(srv, body)
    except AgentError as exc:
        ws.error(1008 if exc.status < 500 else 1011, exc.message, exc.code)
        return
    if context is None:
        _ws_run_process(srv, ws, body)
        return
    outbox = _StreamOutbox(ws, "hopx-ws-out-%s" % context.id[:12])
    try:
        call = _context_call(srv, _Request(), context, body, on_event=outbox.put, gone=lambda: ws.gone)
        ws.start_reader("hopx-ws-%s" % context.id[:12], lambda: None)
        answer = context.execute(call)
    except AgentError as exc:
        outbox.finish(lambda: ws.error(1008 if exc.status < 500 else 1011, exc.message, exc.code))
        return
    result = {key: value for key, value in answer.items() if key not in ("stdout", "stderr")}
    result.update(type="result", status="completed" if answer["success"] else "failed")
    if outbox.dropped_events:
        result["stream_dropped"] = outbox.dropped_events

    def end() -> None:
        ws.send_json(result)
        ws.send_json({"type": "complete", "success": answer["success"]})
        ws.close(1000, "done")
    outbox.finish(end)


def _ws_send_event(ws: _WebSocket, event: Dict[str, Any]) -> None:
    """Output of a running cell: text as the process path sends it, rich
    outputs as ``display`` messages (the last expression's as ``execute_result``)."""
    if ws.gone:
        return
    if event["type"] in ("stdout", "stderr"):
        _ws_send_output(ws, event["type"], event["data"])
    else:
        kind = "execute_result" if event["type"] == "result" else "display"
        ws.send_json({"type": kind, "mime_type": event["mime"], "data": event["data"],
                      "timestamp": _rfc3339(time.time())})


def _context_answer(context: _Context, status: str) -> Dict[str, Any]:
    return {"context_id": context.id, "status": status, "timestamp": _rfc3339(time.time())}


def _contexts_create(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    body = req.json()
    language = _canonical_language(body.get("language"))
    if language not in _CONTEXT_LANGUAGES:
        raise BadRequest("a context's language is one of %s" % ", ".join(_CONTEXT_LANGUAGES))
    workdir = _workdir(body)
    limits, user = srv.manager.limits.resolve(body)     # api.md §14: the context's kernel or shell
    context = srv.contexts.create(
        language, name=_opt_text(body, "name", max_chars=CONTEXT_NAME_CHARS),
        workdir=srv.manager.launcher.resolve_cwd(workdir) if workdir else None,
        env=_env_map(body.get("env"), "env"), limits=limits, user=user)
    return context.describe()


def _contexts_list(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    contexts = srv.contexts.list()
    return {"contexts": contexts, "count": len(contexts), "timestamp": _rfc3339(time.time())}


def _contexts_get(srv: "_AgentServer", req: _Request, context_id: str) -> Dict[str, Any]:
    return srv.contexts.get(context_id).describe()


def _contexts_interrupt(srv: "_AgentServer", req: _Request, context_id: str) -> Dict[str, Any]:
    context = srv.contexts.get(context_id)
    return _context_answer(context, context.interrupt())


def _contexts_restart(srv: "_AgentServer", req: _Request, context_id: str) -> Dict[str, Any]:
    context = srv.contexts.get(context_id)
    context.restart()
    return _context_answer(context, "restarted")


def _contexts_delete(srv: "_AgentServer", req: _Request, context_id: str) -> Dict[str, Any]:
    context = srv.contexts.get(context_id)
    srv.contexts.delete(context_id)
    return _context_answer(context, "restarted" if context.is_default else "deleted")


def _jupyter_sessions(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    sessions = srv.contexts.sessions()
    return {"sessions": sessions, "count": len(sessions), "timestamp": _rfc3339(time.time())}


_CONTEXT_ROUTES = (
    _route("POST", "/execute", _execute),
    _route("POST", "/execute/rich", _execute),
    _route("POST", "/execute/ipython", _execute),
    _route("GET", "/execute/stream", _stream_ws, websocket=True),
    _route("POST", "/contexts", _contexts_create),
    _route("GET", "/contexts", _contexts_list),
    _route("GET", "/contexts/{context_id}", _contexts_get),
    _route("POST", "/contexts/{context_id}/interrupt", _contexts_interrupt),
    _route("POST", "/contexts/{context_id}/restart", _contexts_restart),
    _route("DELETE", "/contexts/{context_id}", _contexts_delete),
    _route("GET", "/jupyter/sessions", _jupyter_sessions),
)


# ============================================================================
# Terminals: pty sessions that outlive their connection (api.md §12)
# ============================================================================
#
# A terminal is a shell on a pseudo-terminal, kept by the agent, not by the
# WebSocket that opened it:
#
#   _Pty (Children)    the pair, its size; the spawner's tty prelude makes the
#                      slave the shell's controlling terminal (see _ctty_prelude)
#   _TerminalHub       ONE thread for every session: reads each master as soon as
#                      it has output and learns of each shell's exit from its
#                      pidfd, so no shell ever waits for a client
#   _TerminalSession   the output window (the newest 1 MiB, of which a reattach
#                      replays 256 KiB), its clients, input, resize, and its end:
#                      SIGHUP, SIGTERM, grace, SIGKILL to every process of it
#   _Terminals         the family object: ids, --max-terminals, linger, listing,
#                      delete, shutdown
#
# A client is a cursor (an absolute byte offset) into its session's output
# window. The hub appends and never waits for anyone; each client's writer
# reads from its own cursor on its own thread. A client that falls out of the
# window loses the oldest bytes and is told how many ({"type": "dropped"}), so
# a slow client costs one offset and no copy, and a replay is simply a cursor
# that starts 256 KiB before the end.

SCROLLBACK_BYTES = 256 * 1024         # api.md §12: the newest output replayed to a client that attaches
TERMINAL_LAG_BYTES = 1024 * 1024      # an attached client may fall this far behind before it loses bytes
TERMINAL_BATCH_S = 0.002              # during a flood a writer waits at most this long to fill a message,
TERMINAL_BATCH_BYTES = 16 * 1024      # until this much is ready (fewer frames and encodes per byte)
TERMINAL_BATCH_MIN_BYTES = 512        # a flood: the previous message was at least this big
TERMINAL_MESSAGE_BYTES = 64 * 1024    # output per message at most: a replay or a flood comes in pieces
TERMINAL_READ_BUDGET_BYTES = 64 * 1024    # read from one master per wake-up: a flood starves no other session
TERMINAL_DRAIN_S = 0.5                # after the shell exits, its last output is read for this long at most
TERMINAL_HUP_GRACE_S = 0.5            # SIGHUP -> SIGTERM: a shell saves its history, vim its swap file
TERMINAL_REAP_WAIT_S = 5.0            # after SIGKILL, how long an end waits for the processes to vanish
TERMINAL_INPUT_TIMEOUT_S = 5.0        # a shell that reads no input cannot hold a client's thread longer
TERMINAL_WAIT_S = 15.0                # a client's writer wakes at least this often (bounded waits)
DEFAULT_TERMINAL_COLS, DEFAULT_TERMINAL_ROWS = 80, 24
_LOGIN_CAPABLE_SHELLS = frozenset(("bash", "sh", "dash", "zsh", "ksh", "mksh", "ash", "fish", "tcsh", "csh"))
_NO_LOGIN_SHELLS = frozenset(("nologin", "false"))   # api.md §12: such a login shell counts as none


# -- which shell ---------------------------------------------------------------

def _usable_shell(path: Optional[str]) -> bool:
    return bool(path) and os.path.basename(path or "") not in _NO_LOGIN_SHELLS \
        and os.path.isfile(path or "") and os.access(path or "", os.X_OK)


def _default_shell(uid: int) -> str:
    """api.md §12: the login shell of the run-as user, else bash, else sh."""
    try:
        import pwd
        login = pwd.getpwuid(uid).pw_shell
    except (ImportError, KeyError):
        login = ""
    if _usable_shell(login):
        return login
    return shutil.which("bash") or "/bin/sh"


def _resolve_shell(value: Optional[str], uid: int, path_env: Optional[str]) -> str:
    """The ``shell`` query (a path, or a name looked up in the child's PATH), or the default."""
    if value is None or value == "":
        return _default_shell(uid)
    if "\0" in value or len(value) > 4096:
        raise BadRequest("shell must be a program name or path")
    found = value if "/" in value else shutil.which(value, path=path_env)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise BadRequest("shell not found or not executable: %s" % value)
    return os.path.abspath(found)


def _shell_argv(shell: str) -> List[str]:
    """Known shells start as login shells (profile read, like an ssh
    login); any other program is run as it is."""
    return [shell, "-l"] if os.path.basename(shell) in _LOGIN_CAPABLE_SHELLS else [shell]


# -- every process of a session ------------------------------------------------

def _proc_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, process group, session) from /proc/<pid>/stat, or None when gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()    # the command name may hold spaces and parens
    try:
        return fields[0].decode("ascii", "replace"), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def _session_processes(sid: int, marker: str) -> Dict[int, Tuple[int, bool]]:
    """pid -> (process group, in the session) of every live process of a
    terminal: those in session ``sid`` (the shell's pid), and those that
    left it (setsid) but carry its marker in their environment. Zombies are
    left out: they have ended already."""
    found: Dict[int, Tuple[int, bool]] = {}
    me = os.getpid()
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return found
    for pid in pids:
        stat = _proc_stat(pid) if pid != me else None
        if stat is None or stat[0] in ("Z", "X"):
            continue
        if stat[2] == sid:
            found[pid] = (stat[1], True)
        elif _marker_of(_read_environ(pid)) == marker:
            found[pid] = (stat[1], False)
    return found


def _signal_session(procs: Dict[int, Tuple[int, bool]], marker: str, sig: int) -> None:
    """``sig`` to every process group of the session (so a child forked
    since the scan is hit too) and to each escaper by itself; a stopped job
    also gets SIGCONT, or a SIGHUP or SIGTERM would wait until it runs."""
    groups = {pgid for pgid, in_session in procs.values() if in_session}
    escapers = [pid for pid, (_, in_session) in procs.items() if not in_session]
    sigs = (sig,) if sig == signal.SIGKILL else (sig, signal.SIGCONT)
    for one in sigs:
        for pgid in groups:
            _killpg(pgid, one)
        for pid in escapers:     # checked through a pidfd: a reused pid is never hit
            _signal_marked(pid, marker, one)


def _end_session(sid: int, marker: str, grace: float,
                 kill_hooks: Iterable[Callable[[], None]] = ()) -> bool:
    """End every process of a terminal: SIGHUP, SIGTERM after
    TERMINAL_HUP_GRACE_S, SIGKILL after ``grace``; the hooks (its cgroup's
    kill, where it has one) run with the SIGKILL. Each step starts from a
    fresh scan, so children forked meanwhile are found. True when none is
    left (waits at most HUP grace + grace + TERMINAL_REAP_WAIT_S)."""
    steps = ((signal.SIGHUP, TERMINAL_HUP_GRACE_S), (signal.SIGTERM, grace),
             (signal.SIGKILL, TERMINAL_REAP_WAIT_S))
    for sig, wait in steps:
        procs = _session_processes(sid, marker)
        if sig == signal.SIGKILL:
            for hook in kill_hooks:
                try:
                    hook()
                except Exception:
                    log.exception("ending the cgroup of terminal %s failed", marker)
        if not procs:
            return True
        _signal_session(procs, marker, sig)
        _wait_gone(list(procs), time.monotonic() + wait)
    return not _session_processes(sid, marker)


# -- one session ---------------------------------------------------------------

class _TerminalClient:
    """One attached client: where it is in the scrollback and what it lost."""

    __slots__ = ("offset", "gone", "dropped", "done", "last_sent", "last_size")

    def __init__(self, offset: int) -> None:
        self.offset = offset      # absolute offset of the next byte it gets
        self.gone = False         # it detached (or its connection died)
        self.dropped = 0          # bytes that fell out of the window before it read them
        self.done = False         # it has been given the exit message
        self.last_sent = 0.0      # monotonic time and size of its last output message:
        self.last_size = 0        # a stream of big ones means a flood, worth batching


class _TerminalSession:
    """A shell on a pty, its scrollback and its clients.

    The hub thread is the only reader of the master and the only one that
    closes it; input and resize use it under ``cond``, which also guards the
    scrollback, the clients and the state. Nothing blocks while holding it.
    """

    def __init__(self, session_id: str, pty: _Pty, popen: subprocess.Popen, *, shell: str,
                 cwd: str, user: Any = None, size: Optional[Tuple[int, int]] = None) -> None:
        self.id = session_id
        self.pty = pty
        self.popen = popen
        self.pid = popen.pid
        self.shell, self.cwd, self.user = shell, cwd, user
        self.created = time.time()
        # Guards everything below, the scrollback, and the use of the master
        # fd outside the hub thread (so it is never used after its close).
        self.cond = threading.Condition(threading.Lock())
        self.cols, self.rows = size or pty.size()    # size: handed over (durability), the master may be closed
        # The newest TERMINAL_LAG_BYTES: a client that attaches starts in its
        # last SCROLLBACK_BYTES, one already attached may lag up to all of it.
        self.scrollback = _OutputBuffer(TERMINAL_LAG_BYTES)
        self.clients: List[_TerminalClient] = []
        self.dropped_bytes = 0       # what clients lost, all together (GET /terminals)
        self.shell_exited = False    # the shell's pidfd fired (not reaped yet)
        self.pty_eof = False         # EIO: no slave descriptor open any more
        self.ending = False          # the end (signals, reap) is under way, once
        self.finished = False        # reaped, master closed, output complete
        self.exit_code: Optional[int] = None
        self.finished_at: Optional[float] = None
        self.end_reason: Optional[str] = None   # "exited", or why the agent ended it
        self.kill_hooks: List[Callable[[], None]] = []   # the cgroup's kill (issue 15), run with SIGKILL
        self.confinement: Any = None     # that cgroup's confinement, for an upgrade's handover (issue 16)
        self.on_reaped: List[Callable[[int], None]] = []  # the spawner's untrack(pid)
        self.linger_timer: Any = None
        self.end_thread: Optional[threading.Thread] = None

    # -- output, from the hub thread ----------------------------------------

    def append(self, chunks: List[bytes]) -> None:
        with self.cond:
            for chunk in chunks:
                self.scrollback.append(chunk)
            self.cond.notify_all()

    # -- clients --------------------------------------------------------------

    def attach(self) -> _TerminalClient:
        """A new client, its cursor at the start of the window: it is given
        the scrollback first (what was printed while nobody was attached
        included), then live output. A pending linger ends."""
        with self.cond:
            buf = self.scrollback
            client = _TerminalClient(buf.char_start(max(buf.dropped, buf.total - SCROLLBACK_BYTES)))
            self.clients.append(client)
            self.set_linger(None)
            return client

    def detach(self, client: _TerminalClient) -> bool:
        """Forget ``client``; True when it was the last one."""
        with self.cond:
            client.gone = True
            was_attached = client in self.clients
            if was_attached:
                self.clients.remove(client)
            self.cond.notify_all()
            return was_attached and not self.clients

    def set_linger(self, timer: Any) -> None:
        """Replace the linger timer (``cond`` held by the caller or not needed:
        cancelling is a plain assignment, never a wait)."""
        old, self.linger_timer = self.linger_timer, timer
        if old is not None:
            old.cancel()

    def _has_news(self, client: _TerminalClient) -> bool:
        buf = self.scrollback
        return client.gone or client.offset < buf.dropped or client.offset < buf.end(self.finished) \
            or self.finished

    def next_messages(self, client: _TerminalClient, timeout: float) -> Tuple[List[Dict[str, Any]], bool]:
        """Wait up to ``timeout`` for output; returns (messages, done).

        Messages are ``dropped`` (what fell out of the window first), one
        ``output`` of at most TERMINAL_MESSAGE_BYTES (complete characters
        only), and at the very end ``exit``; done says the client has had
        everything (or is gone).
        """
        with self.cond:
            self.cond.wait_for(lambda: self._has_news(client), timeout)
            buf = self.scrollback
            if self._streaming(client):
                self.cond.wait_for(lambda: client.gone or self.finished or client.offset < buf.dropped
                                   or buf.end(False) - client.offset >= TERMINAL_BATCH_BYTES, TERMINAL_BATCH_S)
            if client.gone or client.done:
                return [], True
            messages: List[Dict[str, Any]] = []
            if client.offset < buf.dropped:
                lost = buf.dropped - client.offset
                client.offset = buf.dropped
                client.dropped += lost
                self.dropped_bytes += lost
                messages.append({"type": "dropped", "bytes": lost})
            text, start, stop = buf.read(client.offset, self.finished, TERMINAL_MESSAGE_BYTES)
            if stop > start:
                client.offset = stop
                client.last_sent, client.last_size = time.monotonic(), stop - start
                messages.append({"type": "output", "data": text})
            if self.finished and client.offset >= buf.total:
                client.done = True
                messages.append({"type": "exit", "code": self.exit_code})
            return messages, client.done

    def _streaming(self, client: _TerminalClient) -> bool:
        """A flood is under way for ``client`` (its last message was big and
        just now) and only a little is ready: worth waiting a moment to fill
        a message. An echo or a prompt never waits (their messages are small)."""
        ready = self.scrollback.end(False) - client.offset
        return client.last_size >= TERMINAL_BATCH_MIN_BYTES and 0 < ready < TERMINAL_BATCH_BYTES \
            and time.monotonic() - client.last_sent < TERMINAL_BATCH_S and not self.finished

    # -- input and size, from any client's thread ----------------------------

    def write(self, data: bytes, timeout: float = TERMINAL_INPUT_TIMEOUT_S) -> int:
        """Write input to the master; returns the bytes written. A terminal
        whose input queue stays full for ``timeout`` gets the rest dropped
        (a shell that reads nothing cannot hold a client thread). Input to
        a shell that has ended is ignored."""
        view = memoryview(data)
        written = 0
        deadline = time.monotonic() + timeout
        while written < len(view):
            with self.cond:
                if self.ending or self.finished or self.pty.master < 0:
                    return written
                fd = self.pty.master
                try:
                    written += os.write(fd, view[written:written + 65536])
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:        # EIO: the shell side is closed
                    return written
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return written
            poller = select.poll()      # outside the lock: only a wait, the fd is rechecked
            poller.register(fd, select.POLLOUT)
            poller.poll(min(remaining, 0.25) * 1000)
        return written

    def resize(self, cols: int, rows: int) -> None:
        with self.cond:
            if self.finished or self.pty.master < 0:
                return
            self.pty.resize(cols, rows)
            self.cols, self.rows = cols, rows

    def handle(self, message: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A client's message; an ``error`` message to send back, or None.
        Types other than input and resize are ignored (newer clients)."""
        kind = message.get("type")
        try:
            if kind == "input":
                data = message.get("data")
                if not isinstance(data, str):
                    raise BadRequest("input needs data (a string)")
                data_bytes = data.encode("utf-8", "replace")   # a lone surrogate from JSON becomes "?"
                if self.write(data_bytes) < len(data_bytes):
                    raise AgentError("input dropped: the terminal did not take it in %g s"
                                     % TERMINAL_INPUT_TIMEOUT_S, status=409, code="CONFLICT")
            elif kind == "resize":
                self.resize(_pty_dimension(message.get("cols"), "cols", self.cols),
                            _pty_dimension(message.get("rows"), "rows", self.rows))
        except AgentError as exc:
            return {"type": "error", "error": exc.message, "message": exc.message, "code": exc.code}
        return None

    # -- the end ---------------------------------------------------------------

    def finish(self, exit_code: int) -> None:
        """Reaped and drained (hub thread): the master is closed, clients get
        the rest of the output, then ``exit``."""
        with self.cond:
            self.pty.close()
            self.exit_code = exit_code
            self.finished = True
            self.finished_at = time.monotonic()
            self.cond.notify_all()

    def reap(self) -> int:
        """Reap the shell (it has exited or been killed); its exit code,
        128 + N for death by signal N, -1 if its status was lost."""
        try:
            _, status = os.waitpid(self.pid, 0)
            self.popen.returncode = os.waitstatus_to_exitcode(status)   # Popen never waits for it itself
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        except ChildProcessError:
            log.warning("terminal %s: the shell's exit status was taken elsewhere", self.id)
            self.popen.returncode = code = -1
        for hook in self.on_reaped:
            hook(self.pid)
        return code

    def hand_over(self, writer: Any) -> Dict[str, Any]:
        """Durability: the session as an upgrade's successor takes it (``cond`` held)."""
        live = not self.finished and self.pty.master >= 0
        return {"id": self.id, "pid": self.pid, "shell": self.shell, "cwd": self.cwd, "user": self.user,
                "created": self.created, "cols": self.cols, "rows": self.rows,
                "master": writer.fd(self.pty.master) if live else None,
                "scrollback": writer.blob(_tail_bytes(self.scrollback)), "total": self.scrollback.total,
                "dropped": self.dropped_bytes, "shell_exited": self.shell_exited, "pty_eof": self.pty_eof,
                "ending": self.ending, "finished": self.finished, "exit_code": self.exit_code,
                "finished_at": self.finished_at, "end_reason": self.end_reason,
                "confinement": _confinement_state(self.confinement)}

    @classmethod
    def adopted(cls, item: Dict[str, Any], reader: Any) -> "_TerminalSession":
        """A session handed over by a predecessor (its master a duplicate of the inherited one)."""
        pty = _Pty.__new__(_Pty)
        pty.master = _claim_fd(item["master"]) if item["master"] is not None else -1
        pty.slave, pty.path = -1, ""
        session = cls.__new__(cls)
        session.pty = pty
        cls.__init__(session, item["id"], pty, _AdoptedChild(item["pid"], None), shell=item["shell"],
                     cwd=item["cwd"], user=item["user"], size=(item["cols"], item["rows"]))
        session.created, session.dropped_bytes = item["created"], item["dropped"]
        session.scrollback = _restored_buffer(TERMINAL_LAG_BYTES, item["total"], reader.take(item["scrollback"]))
        for key in ("shell_exited", "pty_eof", "ending", "finished", "exit_code", "finished_at", "end_reason"):
            setattr(session, key, item[key])
        conf = _adopted_confinement(item.get("confinement"), None, None)
        if conf is not None:
            session.confinement = conf
            session.kill_hooks.append(conf.kill)
            session.on_reaped.append(lambda pid: conf.finish())
        return session

    def describe(self) -> Dict[str, Any]:
        """The session as GET /terminals lists it."""
        with self.cond:
            return {"session_id": self.id, "pid": self.pid, "cols": self.cols, "rows": self.rows,
                    "clients": len(self.clients), "created_at": _rfc3339(self.created),
                    "dropped_bytes": self.dropped_bytes,
                    "status": "exited" if self.finished else "running",
                    "exit_code": self.exit_code, "shell": self.shell, "cwd": self.cwd,
                    "user": self.user, "scrollback_bytes": min(self.scrollback.held, SCROLLBACK_BYTES),
                    "output_bytes": self.scrollback.total}


# -- the hub: one thread reads every pty ----------------------------------------

class _TerminalHub:
    """One thread that reads every session's master as soon as it has output
    and learns of each shell's exit from its pidfd (a waiter thread where
    pidfds are missing). Other threads hand it work through call(): the
    selector is only ever touched by its own thread."""

    def __init__(self, on_exit: Callable[[_TerminalSession], None],
                 on_eof: Callable[[_TerminalSession], None]) -> None:
        self._on_exit, self._on_eof = on_exit, on_eof
        self._lock = threading.Lock()    # guards _calls, _thread, _stopped, _wake
        self._calls: collections.deque = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._wake: Optional[Tuple[int, int]] = None
        self._stopped = False
        self._selector: Any = None

    def call(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the hub thread soon; False once stopped."""
        with self._lock:
            if self._stopped:
                return False
            if self._thread is None:
                self._start()
            self._calls.append(fn)
            wake = self._wake
        try:
            os.write(wake[1], b"x")
        except BlockingIOError:      # the pipe is full: the hub has wake-ups pending anyway
            pass
        return True

    def _start(self) -> None:
        """The selector, its wake-up pipe and the thread (``_lock`` held)."""
        import selectors
        selector = selectors.DefaultSelector()
        wake = os.pipe()
        os.set_blocking(wake[0], False)
        os.set_blocking(wake[1], False)
        selector.register(wake[0], selectors.EVENT_READ, None)
        thread = threading.Thread(target=self._run, name="hopx-terminals", daemon=True)
        self._selector, self._wake, self._thread = selector, wake, thread
        thread.start()

    def add(self, session: _TerminalSession) -> None:
        """Start reading ``session`` and watching its shell."""
        os.set_blocking(session.pty.master, False)
        self.call(lambda: self._add(session))

    def _add(self, session: _TerminalSession) -> None:
        import selectors
        self._selector.register(session.pty.master, selectors.EVENT_READ, (self._readable, session))
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(session.pid)
            except OSError:
                pidfd = None
        if pidfd is not None:
            self._selector.register(pidfd, selectors.EVENT_READ, (self._exited, session))
        else:   # no pidfd (old kernel, not Linux): one waiter thread for this shell
            threading.Thread(target=self._wait_shell, args=(session,), daemon=True,
                             name="hopx-term-%s-wait" % session.id[5:13]).start()

    def _wait_shell(self, session: _TerminalSession) -> None:
        try:
            os.waitid(os.P_PID, session.pid, os.WEXITED | os.WNOWAIT)
        except (ChildProcessError, OSError, AttributeError):
            pass
        self.call(lambda: self._on_exit(session))

    def _readable(self, fd: int, session: _TerminalSession) -> None:
        """Take what the master has now (up to the budget) in one append."""
        chunks: List[bytes] = []
        taken = 0
        eof = False
        while taken < TERMINAL_READ_BUDGET_BYTES:
            data = _read_pty(fd, 65536)
            if data is None:
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            taken += len(data)
        if chunks:
            session.append(chunks)
        if eof:
            self._selector.unregister(fd)
            with session.cond:
                session.pty_eof = True
            self._on_eof(session)

    def _exited(self, fd: int, session: _TerminalSession) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        self._on_exit(session)

    def release(self, session: _TerminalSession) -> None:
        """Hub thread: the last output of an ended session, then stop reading it."""
        fd = session.pty.master
        if fd < 0 or threading.current_thread() is not self._thread:
            return        # the hub has stopped (shutdown): the master is closed with the session
        if not session.pty_eof:
            self._readable(fd, session)
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except Exception:
            log.exception("the terminal hub failed")

    def _loop_once(self) -> bool:
        events = self._selector.select(None)
        for key, _ in events:
            if key.data is None:
                try:
                    while os.read(key.fd, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            handler, session = key.data
            try:
                handler(key.fd, session)
            except Exception:       # one session's failure must not stop every terminal
                log.exception("terminal %s: reading failed", session.id)
        while True:
            with self._lock:
                if not self._calls:
                    return not self._stopped
                fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("terminal hub call failed")

    def park(self, timeout: float) -> bool:
        """Durability: the hub thread stops between two reads (an upgrade in
        place hands the masters over) and waits in a call until unpark()."""
        self._resume = threading.Event()
        parked = threading.Event()
        resume = self._resume

        def hold() -> None:
            parked.set()
            resume.wait()

        return not self.call(hold) or parked.wait(timeout)

    def unpark(self) -> None:
        resume = getattr(self, "_resume", None)
        if resume is not None:
            resume.set()

    def stop(self, timeout: float) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        try:
            os.write(wake[1], b"x")
        except BlockingIOError:
            pass
        thread.join(timeout)
        if not thread.is_alive():
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.data[0] == self._exited:
                    _close_quietly(key.fd)
            self._selector.close()
            for fd in wake:
                _close_quietly(fd)


# -- the family ------------------------------------------------------------------

class _Terminals:
    """Every terminal session of the agent (``srv.terminals``): a family
    object (features(), close()). Its shells are children like any other:
    started by the manager's spawner, with the manager's environment (agent
    < global store < request), timers on its watchdog."""

    def __init__(self, config: AgentConfig, manager: "ProcessManager") -> None:
        self.linger, self.max_terminals, self.kill_grace = \
            config.terminal_linger, config.max_terminals, config.kill_grace
        self._manager = manager
        self._watchdog = manager.watchdog
        self._lock = threading.Lock()     # guards _sessions, _opening, _closed
        self._sessions: Dict[str, _TerminalSession] = {}   # in creation order
        self._opening = 0                 # slots taken by opens under way
        self._closed = False
        self.hub = _TerminalHub(self._shell_exited, self._pty_eof)

    def features(self) -> Dict[str, Any]:
        return {"terminal_access": True, "terminal_sessions": True, "pty_processes": True}

    def close(self, deadline: float) -> None:
        self.shutdown(max(0.1, deadline - time.monotonic()))

    # -- opening and finding ----------------------------------------------------

    def open(self, *, cols: int = DEFAULT_TERMINAL_COLS, rows: int = DEFAULT_TERMINAL_ROWS,
             shell: Optional[str] = None, cwd: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, spec_fields: Optional[Dict[str, Any]] = None,
             owner: Optional[Tuple[int, int]] = None) -> _TerminalSession:
        """A new session with its shell running (400 for a bad shell or cwd,
        429 over --max-terminals, 503 while shutting down). ``spec_fields``
        go to the child's _ChildSpec as they are (the limits and user of
        api.md §14); ``owner`` (uid, gid) is the user the shell runs as: it
        gets the pty, and its login shell is the default."""
        child_env = self._session_env(env)
        uid = os.getuid() if owner is None else owner[0]
        argv = _shell_argv(_resolve_shell(shell, uid, child_env.get("PATH")))
        cwd = self._manager.resolve_cwd(cwd)
        self._reserve()
        try:
            session = self._start(argv, cwd, child_env, (cols, rows), dict(spec_fields or {}), owner)
        except BaseException:
            with self._lock:
                self._opening -= 1
            raise
        with self._lock:
            self._opening -= 1
            self._sessions[session.id] = session
        self.hub.add(session)
        self._linger(session)            # until its first client attaches
        log.info("terminal %s: %s (pid %d) in %s", session.id, argv[0], session.pid, cwd)
        return session

    def _session_env(self, env: Optional[Dict[str, str]]) -> Dict[str, str]:
        child_env = self._manager.launcher.child_env(env)
        for stale in ("COLUMNS", "LINES"):      # the size is the pty's, never an inherited guess
            child_env.pop(stale, None)
        child_env["TERM"] = PTY_TERM
        return child_env

    def _reserve(self) -> None:
        """Take a slot; at the limit, the oldest exited session nobody
        watches gives its slot up (an exited shell never blocks a new one)."""
        with self._lock:
            if self._closed:
                raise Unavailable("agent is shutting down")
            if len(self._sessions) + self._opening >= self.max_terminals:
                idle = [s for s in self._sessions.values() if s.finished and not s.clients]
                if not idle:
                    raise LimitExceeded("too many terminals: %d open (--max-terminals)" % self.max_terminals)
                del self._sessions[idle[0].id]     # its linger timer finds it gone
            self._opening += 1

    def _start(self, argv: List[str], cwd: str, env: Dict[str, str], size: Tuple[int, int],
               spec_fields: Dict[str, Any], owner: Optional[Tuple[int, int]]) -> _TerminalSession:
        session_id = "term_" + secrets.token_hex(12)
        env[PROCESS_ID_ENV] = session_id          # the marker that finds escaped descendants
        spawner = self._manager.spawner
        pty = _Pty(*size)
        try:
            if owner is not None and owner[0] != os.getuid():
                pty.give_to(*owner)
            spec = _ChildSpec(argv=argv, cwd=cwd, env=env, stdin=pty.slave, stdout=pty.slave,
                              stderr=pty.slave, tty=pty.path, **spec_fields)
            popen = spawner.spawn(spec)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            pty.close()
            raise BadRequest("cannot start %s: %s" % (argv[0], exc)) from None
        except BaseException:
            pty.close()
            raise
        pty.close_slave()      # the child holds it now; EIO on the master means it is gone
        session = _TerminalSession(session_id, pty, popen, shell=argv[0], cwd=cwd,
                                   user=None if owner is None else owner[0])
        session.on_reaped.append(spawner.untrack)
        # Issue 15: a child with a cgroup has its confinement on the spec;
        # ending the session kills the cgroup too, and it is removed once reaped.
        confinement = getattr(spec, "confinement", None)
        if confinement is not None:
            session.confinement = confinement     # durability: an upgrade hands its cgroup over
            session.kill_hooks.append(confinement.kill)
            session.on_reaped.append(lambda pid: confinement.finish())
        return session

    def get(self, session_id: str) -> _TerminalSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound("terminal session not found: %s" % session_id)
        return session

    def list_json(self) -> Dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        terminals = [s.describe() for s in sessions]
        return {"terminals": terminals, "count": len(terminals)}

    # -- clients ------------------------------------------------------------------

    def attach(self, session: _TerminalSession) -> _TerminalClient:
        return session.attach()

    def detach(self, session: _TerminalSession, client: _TerminalClient) -> None:
        if session.detach(client):
            self._linger(session)

    def _linger(self, session: _TerminalSession) -> None:
        """Nobody is attached: the session waits --terminal-linger for one."""
        with session.cond:
            if not session.clients:
                session.set_linger(self._watchdog.schedule(self.linger, lambda: self._linger_expired(session)))

    def _linger_expired(self, session: _TerminalSession) -> None:
        with session.cond:
            if session.clients:
                return
        log.info("terminal %s: nobody reattached in %g s", session.id, self.linger)
        self._forget(session)
        self._end(session, "linger")

    def _forget(self, session: _TerminalSession) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)

    # -- ending --------------------------------------------------------------------

    def _shell_exited(self, session: _TerminalSession) -> None:
        """Hub thread: the shell's pidfd fired. Its last output is read until
        EIO or TERMINAL_DRAIN_S (a background job may hold the pty), then
        the session ends."""
        with session.cond:
            session.shell_exited = True
            eof = session.pty_eof
        if eof:
            self._end(session, "exited")
        else:
            self._watchdog.schedule(TERMINAL_DRAIN_S, lambda: self._end(session, "exited"))

    def _pty_eof(self, session: _TerminalSession) -> None:
        with session.cond:
            exited = session.shell_exited
        if exited:
            self._end(session, "exited")

    def _end(self, session: _TerminalSession, reason: str) -> bool:
        """Start the end of ``session`` (once) on a thread of its own: every
        process of it ended, the shell reaped, then finished on the hub."""
        with session.cond:
            if session.ending:
                return False
            session.ending = True
            session.end_reason = reason
        thread = threading.Thread(target=self._ending, args=(session,), daemon=True,
                                  name="hopx-term-%s-end" % session.id[5:13])
        session.end_thread = thread
        thread.start()
        return True

    def _ending(self, session: _TerminalSession) -> None:
        try:
            if not _end_session(session.pid, session.id, self.kill_grace, session.kill_hooks):
                log.warning("terminal %s: processes survived SIGKILL", session.id)
            code = session.reap()
        except Exception:
            log.exception("terminal %s: ending failed", session.id)
            code = -1
        if not self.hub.call(lambda: self._finished(session, code)):
            self._finished(session, code)      # the hub has stopped (shutdown): finish here

    def _finished(self, session: _TerminalSession, code: int) -> None:
        self.hub.release(session)
        session.finish(code)
        log.info("terminal %s ended (%s), exit %d", session.id, session.end_reason, code)
        with self._lock:
            known = self._sessions.get(session.id) is session
        if known:                        # an exited session keeps its scrollback this long
            self._linger(session)

    def delete(self, session_id: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """DELETE /terminals/{id}: the session is forgotten at once (a
        reattach gets 404) and every process of it ended; waits until it has."""
        session = self.get(session_id)
        self._forget(session)
        with session.cond:
            session.set_linger(None)
        ended_here = self._end(session, "deleted")
        deadline = time.monotonic() + (timeout if timeout is not None else self._end_budget())
        self.wait_finished(session, deadline - time.monotonic())
        if session.end_thread is not None:      # it only hands the finish to the hub: a moment
            session.end_thread.join(max(0.0, deadline - time.monotonic()))
        return {"session_id": session.id, "status": "terminated" if ended_here else "exited",
                "exit_code": session.exit_code}

    def discard(self, session: _TerminalSession) -> None:
        """A new session whose upgrade was refused: forget it and end it (in the background)."""
        self._forget(session)
        self._end(session, "refused")

    def _end_budget(self) -> float:
        return TERMINAL_HUP_GRACE_S + self.kill_grace + TERMINAL_REAP_WAIT_S + 1.0

    @staticmethod
    def wait_finished(session: _TerminalSession, timeout: float) -> bool:
        with session.cond:
            return session.cond.wait_for(lambda: session.finished, timeout)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """End every session (in parallel), then stop the hub."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            with session.cond:
                session.set_linger(None)
            self._end(session, "shutdown")
        deadline = time.monotonic() + (timeout if timeout is not None else self._end_budget())
        for session in sessions:
            self.wait_finished(session, max(0.0, deadline - time.monotonic()))
            if session.end_thread is not None:
                session.end_thread.join(max(0.0, deadline - time.monotonic()))
        self.hub.stop(max(0.1, deadline - time.monotonic()))

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"terminals": len(sessions), "terminals_attached": sum(1 for s in sessions if s.clients)}

    # -- durability (issue 16): an upgrade in place hands the sessions over ---------
    #
    # The hub parks between two reads; each session's master (what its shell
    # wrote since stays in the pty), its scrollback, its state and its shell's
    # pid go to the successor, which reads on where this one stopped. The
    # WebSocket clients are cut by the exec and reattach with ?session=ID
    # (their session lingers --terminal-linger from the upgrade on).

    handover_name = "terminals"

    def prepare_upgrade(self) -> None:
        if not self.hub.park(UPGRADE_PARK_S):
            raise RuntimeError("the terminal hub did not stop within %gs" % UPGRADE_PARK_S)

    def resume_upgrade(self) -> None:
        self.hub.unpark()

    def hand_over(self, writer: Any) -> Dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        items = []
        for session in sessions:
            with session.cond:
                items.append(session.hand_over(writer))
        return {"sessions": items}

    def adopt(self, part: Any, reader: Any) -> None:
        """The successor's side: every session again, read and watched as before
        (finished ones keep their scrollback for the linger time)."""
        for item in (part or {}).get("sessions", []):
            session = _TerminalSession.adopted(item, reader)
            if not session.finished:
                self._manager.spawner.adopt(session.pid)
                session.on_reaped.append(self._manager.spawner.untrack)
            with self._lock:
                self._sessions[session.id] = session
            self._adopted = getattr(self, "_adopted", []) + [session]

    def resume_adopted(self) -> None:
        """Once the successor is ready: reading, watching, ending and lingering resume."""
        for session in getattr(self, "_adopted", []):
            if not session.finished:
                self.hub.add(session)
                if session.ending:
                    session.ending = False
                    self._end(session, session.end_reason or "shutdown")
            self._linger(session)
        self._adopted = []




# ============================================================================
# Endpoints: terminal (GET /terminal over WebSocket, GET /terminals, DELETE /terminals/{id})
# ============================================================================


def _terminal(srv: "_AgentServer", req: _Request) -> _Upgrade:
    """GET /terminal: a shell on a pty over a WebSocket (api.md §12). Every
    refusal comes before the upgrade: an unknown ``session`` is 404 (never a
    new session), over --max-terminals 429, a bad shell, cwd or size 400."""
    terminals: _Terminals = srv.terminals
    cols, rows = req.param("cols"), req.param("rows")
    size = (_pty_dimension(cols, "cols", DEFAULT_TERMINAL_COLS), _pty_dimension(rows, "rows", DEFAULT_TERMINAL_ROWS))
    session_id = req.param("session")
    if session_id:
        session = terminals.get(session_id)
        if cols or rows:      # a reattach that names a size resizes; otherwise the session keeps its own
            session.resize(_pty_dimension(cols, "cols", session.cols), _pty_dimension(rows, "rows", session.rows))
        return _Upgrade(lambda ws: _terminal_ws(terminals, session, ws))
    limits, user = srv.manager.limits.resolve_text(   # api.md §14: the shell's limits and user
        {name: req.param(name) for name in tuple(_LIMIT_FIELDS) + ("user",)})
    owner = (user.uid, user.gid) if user is not None and not user.is_current else None
    session = terminals.open(cols=size[0], rows=size[1], shell=req.param("shell"), cwd=req.param("cwd"),
                             spec_fields={"limits": limits, "user": user}, owner=owner)

    return _Upgrade(lambda ws: _terminal_ws(terminals, session, ws),
                    on_refused=lambda: terminals.discard(session))     # nobody will ever see it


def _terminal_ws(terminals: _Terminals, session: _TerminalSession, ws: _WebSocket) -> None:
    """One attached client: its frames on a reader thread (input, resize),
    its messages on this one (session, replay, live output, exit, close 1000)."""
    client = terminals.attach(session)

    def on_message(opcode: int, payload: bytes) -> None:
        if opcode == _WS_BINARY:          # raw bytes: input as they are (websocat, xterm.js attach)
            session.write(payload)
            return
        try:
            message = _strict_json(payload)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            reply: Optional[Dict[str, Any]] = {"type": "error", "code": "INVALID_JSON",
                                               "error": "messages are JSON objects with a type",
                                               "message": "messages are JSON objects with a type"}
        else:
            reply = session.handle(message)
        if reply is not None:
            ws.send_json(reply)

    ws.start_reader("hopx-term-%s-ws" % session.id[5:13], lambda: terminals.detach(session, client), on_message)
    try:
        ws.send_json({"type": "session", "session_id": session.id})
        done = False
        while not done and not ws.gone:
            messages, done = session.next_messages(client, TERMINAL_WAIT_S)
            for message in messages:
                ws.send_json(message)
        if done and client.done:
            ws.close(1000, "exited")
    finally:
        terminals.detach(session, client)


def _terminals_list(srv: "_AgentServer", req: _Request) -> Dict[str, Any]:
    answer = srv.terminals.list_json()
    answer["timestamp"] = _rfc3339(time.time())
    return answer


def _terminals_delete(srv: "_AgentServer", req: _Request, session_id: str) -> Dict[str, Any]:
    return srv.terminals.delete(session_id)


_TERMINAL_ROUTES = (
    _route("GET", "/terminal", _terminal, websocket=True),
    _route("GET", "/terminals", _terminals_list),
    _route("DELETE", "/terminals/{session_id}", _terminals_delete),
)


# ============================================================================
# Endpoints: admin (upgrade in place)
# ============================================================================


def _admin_restart(srv: "_AgentServer", req: _Request) -> _Reply:
    """POST /admin/restart: upgrade in place to the file on disk, as SIGHUP
    does. The new file is checked first; a file that fails its check is a
    409 saying why, and nothing changes. Otherwise 202, and the agent execs
    the new version once this answer is out (clients see a pause under 1 s)."""
    upgrader = srv.upgrader
    if upgrader is None:
        raise Conflict("this agent cannot upgrade in place: only the CLI agent on Linux can "
                       "(python3 hopx_agent.py), and its source file must be readable")
    try:
        answer = upgrader.check()
    except _UpgradeRefused as exc:
        raise Conflict("upgrade refused: %s" % exc, details={"path": upgrader.path}) from None
    upgrader.request()
    return _Reply(202, _json_bytes({"status": "restarting", "from_version": __version__,
                                    "to_version": answer.get("version"), "path": upgrader.path,
                                    "message": "upgrading in place; running processes keep running"}))


_ADMIN_ROUTES = (
    _route("POST", "/admin/restart", _admin_restart),
)


# ============================================================================
# Entry points
# ============================================================================

# Every family's routes, in the order /info lists them.
_ROUTES = _SYSTEM_ROUTES + _CONTEXT_ROUTES + _EXECUTION_ROUTES + _ENVIRONMENT_ROUTES + _FILES_ROUTES \
    + _TERMINAL_ROUTES + _ADMIN_ROUTES


def create_server(config: AgentConfig, manager: Optional[ProcessManager] = None, *,
                  sock: Optional[socket.socket] = None) -> _AgentServer:
    """A bound server, not yet serving: run ``serve_forever()`` in a thread,
    later ``shutdown()``, ``manager.shutdown()`` and ``server_close()``.
    ``sock``: a listening socket to serve on instead of binding one."""
    if config.auth and not config.secret:
        raise ValueError("auth is on but no secret is configured")
    cls = _AgentServer6 if ":" in config.host else _AgentServer
    server = cls(config, manager or ProcessManager(config), _ROUTES, sock=sock)
    try:
        server.files = _files_service(config, server.manager.limits.run_as)
    except ValueError:
        server.server_close()
        raise
    server.families.append(server.files)
    server.contexts = _make_contexts(config, server.manager)
    server.families.append(server.contexts)
    server.terminals = _Terminals(config, server.manager)
    server.families.append(server.terminals)
    server.contexts.prestart()
    return server


def _files_service(config: AgentConfig, run_as: Optional[_RunAs] = None) -> _FileService:
    """The files family (issue 12) from the configuration; what it writes
    belongs to the --run-as user (api.md §11, §14)."""
    owner = (run_as.uid, run_as.gid) if run_as is not None and not run_as.is_current else None
    return _FileService(config.files_roots or _default_files_roots(config.workdir), config.workdir,
                        max_read_bytes=config.max_read_bytes, max_upload_bytes=config.max_upload_bytes,
                        owner=owner)



def _make_contexts(config: AgentConfig, manager: ProcessManager) -> _ContextManager:
    """The contexts family (issue 13), on the process manager's spawner, timers and env."""
    return _ContextManager(
        spawner=manager.spawner, workdir=config.workdir, kill_grace=config.kill_grace,
        max_output_bytes=config.max_output_bytes, base_env=manager.launcher.base_env,
        global_env=manager.launcher.global_env, schedule=manager.watchdog.schedule,
        python_kernel=config.python_kernel, max_contexts=config.max_contexts,
        idle_timeout=config.context_idle_timeout, watch=manager.lifecycle.exits.watch,
        limits=manager.limits.defaults, user=manager.limits.run_as)



def _keep_secret_from_children() -> bool:
    """PR_SET_DUMPABLE 0 (Linux): a child of the same uid can no longer read
    /proc/<agent>/environ or /proc/<agent>/mem, where the secret is (root
    children still can: --run-as keeps them from it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:     # 4 = PR_SET_DUMPABLE
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return True
    except (OSError, AttributeError, ImportError) as exc:
        log.warning("cannot make the agent non-dumpable (%s): same-user children can read its secret", exc)
        return False


def _warn_if_readable(path: Optional[str]) -> None:
    """A secret file readable by group or others is a secret shared with them."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o044:
        log.warning("the secret file %s is readable by group or others (mode %04o): chmod 600 it",
                    path, mode & 0o7777)


def _start_agent(config: AgentConfig) -> _AgentServer:
    """A cold start: with a state directory, the previous agent's journal is
    loaded first (its orphans ended, its records restored), then the server
    is bound. _StateDirError when the directory cannot be used."""
    manager = ProcessManager(config)
    journal = None
    if config.state_dir:
        journal = _open_journal(config)
        try:
            states = _load_journal(journal, config.kill_grace)
            _attach_journal(manager, journal)
            _restore_records(manager, states)
        except BaseException:
            journal.close()
            raise
    try:
        return create_server(config, manager)
    except BaseException:
        if journal is not None:
            journal.close()
        raise


def _adopt_server(config: AgentConfig, doc: Dict[str, Any], reader: _HandoverReader) -> Tuple[_AgentServer, Any]:
    """An upgraded agent's start from its predecessor's (checked) handover:
    the journal on the inherited lock, the records, the server on the
    inherited socket. Starts no thread (see _adopt_agent)."""
    manager = ProcessManager(config)
    journal = None
    lock_fd = doc.get("lock_fd")
    if config.state_dir and isinstance(lock_fd, int):
        journal = _open_journal(config, lock_fd=_claim_fd(lock_fd))
        journal.reopen(len(doc["records"]))
        _attach_journal(manager, journal)
    adopted = _adopt_agent(doc, reader, manager)
    server = create_server(config, manager, sock=socket.socket(fileno=_claim_fd(doc["listen_fd"])))
    now = time.monotonic()
    server.hub.adopt([(socket.socket(fileno=_claim_fd(c["fd"])), tuple(c["addr"] or ("?", 0)),
                       reader.take(c["buf"]), now - c["idle_s"], None if c["head_s"] is None else now - c["head_s"])
                      for c in doc["connections"]])
    for family in server.families:
        if hasattr(family, "adopt") and hasattr(family, "handover_name"):
            family.adopt(doc["families"].get(family.handover_name), reader)
    agent = doc["agent"]
    if isinstance(agent.get("started"), (int, float)) and isinstance(agent.get("started_mono"), (int, float)):
        server.metrics.started, server.metrics.started_mono = agent["started"], agent["started_mono"]
    counts = agent.get("metrics")
    if isinstance(counts, list) and len(counts) == 2 and all(isinstance(c, dict) for c in counts):
        server.metrics.requests.update(counts[0])
        server.metrics.errors.update(counts[1])
    return server, adopted


def _handover_check(doc: Any, argv: List[str]) -> Dict[str, Any]:
    """What a running agent runs in a child on this file before it execs it
    for an upgrade: everything the adoption parses (the handover preview,
    the command line), nothing it touches. Any exception refuses the upgrade."""
    _parse_handover(doc)
    _config_from(_build_parser().parse_args(list(argv)), dict(os.environ))
    return {"ok": True, "version": __version__}


def _make_upgrader(server: _AgentServer, wake: Callable[[], None]) -> Optional[_Upgrader]:
    """An upgrader when this process runs hopx_agent.py as its script on Linux."""
    if __name__ != "__main__" or not hasattr(os, "memfd_create") or not hasattr(os, "pidfd_open"):
        return None
    running = os.path.abspath(globals().get("__file__") or "")
    path = os.environ.get(SOURCE_ENV) or running
    source = _own_source(running)
    if source is None:
        return None
    upgrader = _Upgrader(server, path, sys.argv[1:], source)
    upgrader.request = wake           # POST /admin/restart asks the main loop, as SIGHUP does
    return upgrader


def _install_signals(stop: threading.Event, upgrade: threading.Event, wake_w: int) -> Dict[int, Any]:
    """SIGTERM/SIGINT set ``stop``, SIGHUP ``upgrade``; the wake-up fd makes the
    main thread's poll() return. Returns what to restore ({} off the main thread)."""
    previous: Dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: upgrade.set())
    # Wait in poll() on the signal wake-up fd, not in a lock: a lock wait is
    # not interrupted by signals on every Python (3.13.0 is one).
    previous[-1] = signal.set_wakeup_fd(wake_w)
    return previous


def _stop_serving(server: _AgentServer) -> None:
    """Stop accepting, end every child (TERM, grace, KILL), close the families and the journal."""
    log.info("stopping: ending every process group")
    server.shutdown()
    server.manager.shutdown(server.config.kill_grace + 1.5)
    server.server_close()
    if server.accepting is not None:
        server.accepting.join(1.0)
    journal = server.manager.registry.journal
    if journal is not None:
        journal.close(2.0)


def _run_until_signalled(server: _AgentServer) -> int:
    """Serve until SIGTERM/SIGINT, then stop accepting, end every child and exit 0.
    SIGHUP (or POST /admin/restart) upgrades in place to the file on disk.

    The handlers only set an event: server.shutdown() called from the thread
    running serve_forever() would wait for itself forever.
    """
    stop, upgrade = threading.Event(), threading.Event()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = _install_signals(stop, upgrade, wake_w)

    def request_upgrade() -> None:
        upgrade.set()
        try:
            os.write(wake_w, b"u")
        except OSError:
            pass

    server.upgrader = _make_upgrader(server, request_upgrade) if previous else None
    server.manager.enable_subreaper()
    if server.config.auth:
        _keep_secret_from_children()
    server.start_accepting()
    log.info("listening on %s", server.url)
    try:
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        while not stop.is_set():
            if previous:
                poller.poll()
                os.read(wake_r, 512)
            else:
                stop.wait()
            if upgrade.is_set() and not stop.is_set():
                upgrade.clear()
                if server.upgrader is None:
                    log.warning("SIGHUP: this agent cannot upgrade in place (not the CLI on Linux); ignored")
                else:
                    server.upgrader.run()       # returns only if the upgrade did not happen
    finally:
        if previous:
            signal.set_wakeup_fd(previous.pop(-1))
        os.close(wake_r)
        os.close(wake_w)
        _stop_serving(server)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _serve_upgraded(config: AgentConfig, handover_fd: int) -> int:
    """The start of a version exec'd by its predecessor: adopt, then serve.
    A failure before it is ready runs the previous version again (its source
    came with the handover), so the agent serves on as it was."""
    try:
        reader = _HandoverReader(handover_fd)
    except (OSError, ValueError) as exc:
        log.error("upgrade: the handover cannot be read (%s); nothing to adopt", exc)
        return 1
    try:
        doc = _parse_handover(reader.doc)
        secret = doc["agent"].get("secret")
        if config.auth and config.secret is None and isinstance(secret, str):
            config = config._replace(secret=base64.b64decode(secret))   # it made one at its start
        server, adopted = _adopt_server(config, doc, reader)
    except Exception:
        log.exception("upgrade: version %s cannot take over", __version__)
        return _fall_back(reader, handover_fd)
    _seal_fds(doc)        # ready: from here on nothing goes back to the previous version
    reader.close()
    _resume_adopted(server.manager, adopted, doc.get("journal_pending") or [])
    for family in server.families:
        if hasattr(family, "resume_adopted"):
            family.resume_adopted()
    running = sum(1 for rec, state in adopted if state.get("_run") is not None)
    log.warning("upgraded in place from %s to %s: %d records (%d running) taken over, serving %.0f ms after the exec",
                doc.get("from_version"), __version__, len(adopted), running,
                (time.monotonic() - doc.get("monotonic", time.monotonic())) * 1000)
    return _run_until_signalled(server)


def _fall_back(reader: _HandoverReader, handover_fd: int) -> int:
    source_ref = reader.doc.get("source") if isinstance(reader.doc, dict) else None
    if os.environ.get(FALLBACK_ENV) or not source_ref:
        log.error("upgrade: no previous version to go back to; the agent stops here")
        return 1
    try:
        source = reader.take(source_ref)
        log.warning("upgrade: going back to the previous version")
        _exec_previous(source, os.environ.get(SOURCE_ENV) or os.path.abspath(sys.argv[0]), sys.argv[1:],
                       handover_fd)
    except (OSError, ValueError) as exc:
        log.error("upgrade: cannot run the previous version again: %s", exc)
    return 1


def serve(config: AgentConfig) -> int:
    """Bind, serve until SIGTERM/SIGINT, clean up; the CLI's blocking call.
    With ``config.state_dir``, the journal is loaded first (see _start_agent)."""
    return _run_until_signalled(_start_agent(config))


def _limit_option(field: str) -> Callable[[str], Any]:
    """The parser of a --default-<limit> value: the request's rules (api.md §14)."""
    def parse(text: str) -> Any:
        try:
            return _parse_limit_option(text, field)
        except BadRequest as exc:
            raise ValueError(exc.message) from None
    parse.__name__ = "integer" if _LIMIT_FIELDS[field][0] else "positive number"
    return parse


def _oom_option(text: str) -> Any:
    """An oom_score_adj option: -1000 ... 1000, or "off" (leave it alone)."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    value = int(text)
    if not -1000 <= value <= 1000:
        raise ValueError("oom_score_adj must be between -1000 and 1000")
    return value


_oom_option.__name__ = "oom_score_adj"


# Options of api.md §1: flag -> (AgentConfig field, type, help). Each also reads HOPX_AGENT_<FLAG>.
_OPTIONS: Tuple[Tuple[str, str, Any, str], ...] = (
    ("--host", "host", str, "address to bind (default %s)" % DEFAULT_HOST),
    ("--port", "port", int, "port to bind, 0 for any free one (default %d)" % DEFAULT_PORT),
    ("--workdir", "workdir", str, "default working directory (default /workspace if it exists, else .)"),
    ("--max-running", "max_running", int, "children running at once; more are queued (default %d)" % MAX_RUNNING),
    ("--max-output-bytes", "max_output_bytes", int, "output kept per stream (default %d)" % MAX_OUTPUT_BYTES),
    ("--retain", "retain", int, "finished records kept (default %d)" % RETAIN_RECORDS),
    ("--output-budget", "output_budget", int,
     "output bytes kept across all finished records (default %d)" % OUTPUT_BUDGET_BYTES),
    ("--kill-grace", "kill_grace", float, "seconds between SIGTERM and SIGKILL (default %g)" % KILL_GRACE_S),
    ("--max-connections", "max_connections", int, "open connections before 503 (default %d)" % MAX_CONNECTIONS),
    ("--audience", "audience", str, "require this JWT aud claim"),
    ("--issuer", "issuer", str, "require this JWT iss claim"),
    ("--algorithms", "algorithms", str, "JWT algorithms accepted, comma-separated (default HS256,HS384,HS512)"),
    ("--log-level", "log_level", str, "debug, info, warning or error (default info)"),
    ("--log-format", "log_format", str, "text or json (default text)"),
    # limits, users and the agent's own safety (issue 15)
    ("--limits-mechanism", "limits_mechanism", str,
     "auto (cgroup v2, else v1, else rlimits), cgroup_v2, cgroup_v1 or rlimit (default auto)"),
    ("--default-memory-limit-mb", "default_memory_limit_mb", _limit_option("memory_limit_mb"),
     "memory_limit_mb of requests that name none"),
    ("--default-cpu-limit", "default_cpu_limit", _limit_option("cpu_limit"), "cpu_limit (cores) likewise"),
    ("--default-pids-limit", "default_pids_limit", _limit_option("pids_limit"), "pids_limit likewise"),
    ("--default-cpu-time-limit-s", "default_cpu_time_limit_s", _limit_option("cpu_time_limit_s"),
     "cpu_time_limit_s likewise"),
    ("--default-file-size-limit-mb", "default_file_size_limit_mb", _limit_option("file_size_limit_mb"),
     "file_size_limit_mb likewise"),
    ("--run-as", "run_as", str, "user (name or uid) children run as unless a request names one; needs root"),
    ("--agent-oom-score-adj", "agent_oom_score_adj", _oom_option,
     "the agent's own oom_score_adj, or off (default %d; needs CAP_SYS_RESOURCE)" % AGENT_OOM_SCORE_ADJ),
    ("--child-oom-score-adj", "child_oom_score_adj", _oom_option,
     "every child's oom_score_adj, or off: the agent's value at start (default %d)" % CHILD_OOM_SCORE_ADJ),
    # files (issue 12); --files-root is repeatable, so it is declared in _build_parser
    ("--max-read-bytes", "max_read_bytes", int,
     "largest file /files/read answers in JSON (default %d; more: /files/download)" % FILES_MAX_READ_BYTES),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest upload (default: no limit but the disk)"),
    # contexts (issue 13)
    ("--python-kernel", "python_kernel", str,
     "the default Python context of /execute: off, lazy (started on first use) or prestart (default lazy)"),
    ("--max-contexts", "max_contexts", int, "named contexts at once (default %d)" % MAX_CONTEXTS),
    ("--context-idle-timeout", "context_idle_timeout", float,
     "seconds after which an idle named context ends, 0 for never (default %g)" % CONTEXT_IDLE_TIMEOUT_S),
    # Terminals (issue 14)
    ("--terminal-linger", "terminal_linger", float,
     "seconds a detached terminal session waits for a reattach (default %g)" % TERMINAL_LINGER_S),
    ("--max-terminals", "max_terminals", int, "terminal sessions at once (default %d)" % MAX_TERMINALS),
    # durability (issue 16)
    ("--state-dir", "state_dir", str, "the journal's private directory, 'none' for no journal (default: "
                                      "$XDG_STATE_HOME/hopx-agent/PORT, /var/lib/hopx-agent/PORT or "
                                      "$TMPDIR/hopx-agent-UID/PORT; none with --port 0)"),
)


def _env_name(flag: str) -> str:
    return "HOPX_AGENT_" + flag.lstrip("-").replace("-", "_").upper()


def _build_parser() -> Any:
    import argparse
    parser = argparse.ArgumentParser(
        prog="hopx_agent.py", description="In-sandbox execution agent speaking the HopX VM agent API.",
        epilog="Every option also reads HOPX_AGENT_<OPTION> (e.g. HOPX_AGENT_PORT); the flag wins. "
               "The secret comes from HOPX_AGENT_SECRET or --secret-file.")
    parser.add_argument("--version", action="version", version="hopx_agent " + __version__)
    parser.add_argument("--secret-file", help="file whose bytes (less one trailing newline) are the HMAC key")
    parser.add_argument("--no-auth", action="store_true", default=None,
                        help="accept every request without a token (loudly logged; never on a shared network)")
    for flag, _, kind, help_text in _OPTIONS:
        parser.add_argument(flag, type=kind, help=help_text)
    parser.add_argument("--files-root", action="append", metavar="DIR",
                        help="a directory the files API may reach (repeatable or a comma list; default: the "
                             "working directory and the temp directory; / allows everything)")
    sub = parser.add_subparsers(dest="command")
    token = sub.add_parser("token", help="print a JWT signed with the configured secret")
    token.add_argument("--ttl", type=int, default=TOKEN_TTL_S, help="lifetime in seconds (default %d)" % TOKEN_TTL_S)
    token.add_argument("--sub", default="hopx-client", help="the token's subject (default hopx-client)")
    token.add_argument("--secret-file", default=argparse.SUPPRESS, help="as above, also accepted here")
    return parser


def _read_secret(args: Any, environ: Dict[str, str]) -> Optional[bytes]:
    path = args.secret_file or environ.get(_env_name("--secret-file"))
    if path:
        with open(path, "rb") as fh:
            data = fh.read()
        return data[:-1] if data.endswith(b"\n") else data
    text = environ.get(SECRET_ENV)
    return None if text is None else text.encode("utf-8")


def _config_from(args: Any, environ: Dict[str, str]) -> AgentConfig:
    """Flags win over HOPX_AGENT_* variables, which win over the defaults."""
    values: Dict[str, Any] = {}
    for flag, field, kind, _ in _OPTIONS:
        value = getattr(args, field)
        if value is None and environ.get(_env_name(flag)) not in (None, ""):
            try:
                value = kind(environ[_env_name(flag)])
            except ValueError:
                raise ValueError("%s=%r is not a valid %s" % (_env_name(flag), environ[_env_name(flag)],
                                                              kind.__name__)) from None
        if value is not None:
            values[field] = value
    if "algorithms" in values:
        values["algorithms"] = tuple(a.strip() for a in values["algorithms"].split(",") if a.strip())
        if not values["algorithms"] or set(values["algorithms"]) - set(_HASHES):
            raise ValueError("--algorithms takes a comma list of HS256, HS384, HS512")
    no_auth = args.no_auth if args.no_auth is not None else \
        environ.get(_env_name("--no-auth"), "").lower() in ("1", "true", "yes", "on")
    values["auth"] = not no_auth
    values["secret"] = _read_secret(args, environ)
    roots = args.files_root or ([environ[_env_name("--files-root")]] if environ.get(_env_name("--files-root")) else [])
    if roots:
        values["files_roots"] = tuple(r.strip() for item in roots for r in item.split(",") if r.strip())
    _check_options(values)
    if "state_dir" not in values:          # durability: one per port by default, none for --port 0
        values["state_dir"] = _default_state_dir(values.get("port", DEFAULT_PORT), environ)
    elif values["state_dir"].strip().lower() in ("", "none", "off"):
        values["state_dir"] = None
    if "workdir" in values and not os.path.isdir(values["workdir"]):
        raise ValueError("--workdir %s is not a directory" % values["workdir"])
    _check_limit_options(values)
    return AgentConfig(**values)


def _check_limit_options(values: Dict[str, Any]) -> None:
    """--limits-mechanism, --run-as and the oom options (issue 15); "off" becomes None."""
    for field in ("agent_oom_score_adj", "child_oom_score_adj"):
        if values.get(field) == "off":
            values[field] = None
    mechanism = values.get("limits_mechanism", "auto")
    if mechanism not in ("auto",) + _MECHANISMS:
        raise ValueError("--limits-mechanism takes auto, %s" % ", ".join(_MECHANISMS))
    if values.get("run_as") is not None:
        try:
            _check_switchable(_resolve_user(values["run_as"], "--run-as"))
        except BadRequest as exc:
            raise ValueError(exc.message) from None


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS = ("text", "json")


def _check_options(values: Dict[str, Any]) -> None:
    """Every option within its range, or ValueError naming it (main() exits 2)."""
    for field in ("max_running", "max_output_bytes", "retain", "max_connections", "output_budget"):
        if field in values and values[field] < 1:
            raise ValueError("--%s must be at least 1" % field.replace("_", "-"))
    if "port" in values and not 0 <= values["port"] <= 65535:
        raise ValueError("--port must be between 0 and 65535")
    if "kill_grace" in values and not (math.isfinite(values["kill_grace"]) and 0 <= values["kill_grace"] <= 3600):
        raise ValueError("--kill-grace must be a number of seconds from 0 to 3600")
    if "log_level" in values and values["log_level"].lower() not in _LOG_LEVELS:
        raise ValueError("--log-level must be one of %s" % ", ".join(_LOG_LEVELS))
    if "log_format" in values and values["log_format"].lower() not in _LOG_FORMATS:
        raise ValueError("--log-format must be text or json")
    # files (issue 12)
    for field in ("max_read_bytes", "max_upload_bytes"):
        if field in values and values[field] < 0:
            raise ValueError("--%s must be at least 0" % field.replace("_", "-"))
    # contexts (issue 13)
    if values.get("python_kernel", "lazy") not in PYTHON_KERNEL_MODES:
        raise ValueError("--python-kernel must be one of %s" % ", ".join(PYTHON_KERNEL_MODES))
    if "max_contexts" in values and values["max_contexts"] < 0:
        raise ValueError("--max-contexts must not be negative")
    if "context_idle_timeout" in values and not (math.isfinite(values["context_idle_timeout"])
                                                 and values["context_idle_timeout"] >= 0):
        raise ValueError("--context-idle-timeout must be a number of seconds, 0 for never")
    # Terminals (issue 14)
    if "max_terminals" in values and not 1 <= values["max_terminals"] <= 10000:
        raise ValueError("--max-terminals must be from 1 to 10000")
    if "terminal_linger" in values and not (math.isfinite(values["terminal_linger"])
                                            and 0 <= values["terminal_linger"] <= 7 * 86400):
        raise ValueError("--terminal-linger must be a number of seconds from 0 to 604800")


_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _TextFormatter(logging.Formatter):
    """The text log format, one line per record: control characters in the
    message (a newline in a command, say) are escaped, so none forges a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return _CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()), line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _rfc3339(record.created), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(config: AgentConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_format.lower() == "json" else
                         _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hopx_agent")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
    root.propagate = False


def _print_token(config: AgentConfig, args: Any) -> int:
    """``token``: a JWT signed with the configured secret, on stdout."""
    if not config.secret:
        print("hopx_agent: no secret configured (set HOPX_AGENT_SECRET or --secret-file)", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("hopx_agent: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: Dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if config.audience:
        claims["aud"] = config.audience
    if config.issuer:
        claims["iss"] = config.issuer
    print(encode_jwt(claims, config.secret, config.algorithms[0]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line of api.md §1; returns the exit status."""
    try:    # an upgraded agent's handover: never passed on to a child
        handover_fd = _take_handover_env(os.environ)
    except ValueError as exc:
        print("hopx_agent: %s" % exc, file=sys.stderr)
        return 2
    parser = _build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:       # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    environ = dict(os.environ)
    try:
        config = _config_from(args, environ)
    except (OSError, ValueError) as exc:
        print("hopx_agent: %s" % exc, file=sys.stderr)
        return 2
    if config.secret is not None and not config.secret:
        print("hopx_agent: the secret is empty; refusing to start", file=sys.stderr)
        return 2
    if args.command == "token":
        return _print_token(config, args)
    _setup_logging(config)
    if config.auth:
        _warn_if_readable(args.secret_file or environ.get(_env_name("--secret-file")))
    if handover_fd is not None:
        return _serve_upgraded(config, handover_fd)
    generated = config.auth and config.secret is None
    if generated:
        config = config._replace(secret=secrets.token_bytes(32))
    elif config.auth and len(config.secret or b"") < MIN_SECRET_BYTES:
        log.warning("the secret is shorter than %d bytes; use a longer random one", MIN_SECRET_BYTES)
    try:
        server = _start_agent(config)
    except _StateDirError as exc:
        log.error("state directory %s: %s (--state-dir none runs without a journal)", config.state_dir, exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return 1
    except ValueError as exc:       # a --files-root that is not a directory
        log.error("%s", exc)
        return 2
    if not config.auth:
        log.warning("AUTHENTICATION IS DISABLED (--no-auth): anyone who can reach %s can run code", server.url)
    if generated:
        now = int(time.time())
        token = encode_jwt({"sub": "hopx-client", "iat": now, "exp": now + TOKEN_TTL_S}, config.secret or b"")
        print("hopx_agent: no secret configured; made a random one for this run.\n"
              "hopx_agent: token (valid %dh): %s\n"
              "hopx_agent: try: curl -H \"Authorization: Bearer %s\" %s/execute/processes"
              % (TOKEN_TTL_S // 3600, token, token, server.url), file=sys.stderr, flush=True)
    return _run_until_signalled(server)


if __name__ == "__main__":
    sys.exit(main())
