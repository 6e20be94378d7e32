"""Settings for sagaplatform, driven by environment variables (see `.env.example`).

Two ways to run, one codebase:

* embedded (the default, no variable set): one SQLite file per service under `var/`, Celery on
  the in-memory transport with worker threads inside the web process, in-memory channel layer;
* production: `DATABASE_URL` points at PostgreSQL (one database per service is derived from it,
  or given one by one with `DATABASE_URL_<SERVICE>`), `REDIS_URL` at Redis (Celery broker and
  channel layer), and separate `celery worker` processes consume the service queues.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

# Generic Django classes (`admin.ModelAdmin[Order]`, `QuerySet[Saga]`) subscriptable at run time,
# as the type checker sees them (django-stubs).
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    # An empty variable counts as unset: `FOO=` in a shell or an env file means "no value".
    return os.environ.get(name) or default


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None


# --- Core -----------------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off")
    SECRET_KEY = "embedded-insecure-key-only-for-local-use"
ALLOWED_HOSTS = [h for h in env_str("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
VAR_DIR = Path(env_str("SAGA_VAR_DIR", str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "daphne",
    "sagaplatform.admin_site.AdminConfig",  # django.contrib.admin, with pages that are no model's
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",  # API tokens for clients (`POST /api/auth/token/`)
    "axes",  # lockout after repeated wrong passwords (form, HTTP Basic, token endpoint)
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_structlog",
    "sagaplatform.observability",  # metrics, structured logs, traces (after django_structlog)
    "sagaplatform",  # the composition root: operational commands (serve, setup, demo data)
    "sagaplatform.kernel",
    "orders",
    "inventory",
    "payments",
    "shipping",
    "notifications",
    "orchestration",
    # Benchmarks, the load ramp and the simulation (their management commands); no tasks module,
    # so production workers never import it (the benchmark's own worker includes its tasks).
    "loadtest",
]

MIDDLEWARE = [
    # First, so it times the whole stack and counts every answer (docs/OPERATIONS.md, "HTTP").
    "sagaplatform.observability.http.HttpMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # A request id and the user on every log line of a request, and one line per request.
    "django_structlog.middlewares.RequestMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Turns a login refused for a lockout into its answer (429); the middlewares above it then
    # treat that answer as any other.
    "axes.middleware.AxesMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, so that it sees the views' exceptions: a database down or saturated is a 503.
    "sagaplatform.overload.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "sagaplatform.urls"
WSGI_APPLICATION = "sagaplatform.wsgi.application"
ASGI_APPLICATION = "sagaplatform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Tests only (tests/conftest.py sets it): a fast, insecure hash instead of PBKDF2, so that the
# suite's hundreds of users cost nothing. Never set it anywhere else.
FAST_PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
if env_bool("SAGA_INSECURE_FAST_PASSWORDS", default=False):
    PASSWORD_HASHERS = FAST_PASSWORD_HASHERS

# --- Security: login lockout, HTTPS, fault injection, health details --------------------------
# Every password check (login form, admin, HTTP Basic, `POST /api/auth/token/`) counts failures
# per username and per client address (django-axes, rows on `default`). Either one reaching the
# limit refuses further checks with 429 until AUTH_LOCKOUT_MINUTES pass without a failure. A
# locked user's API token and open sessions keep working. `manage.py axes_reset_username <name>`
# (or `axes_reset_ip`, or the admin) lifts a lockout early.
AUTHENTICATION_BACKENDS = [
    "sagaplatform.security.LockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("AUTH_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = env_float("AUTH_LOCKOUT_MINUTES", 15.0) / 60  # hours, as a float
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_CLIENT_IP_CALLABLE = "sagaplatform.security.client_address"
AXES_LOCKOUT_CALLABLE = "sagaplatform.security.lockout_response"
# A row per successful login would be a write per HTTP Basic request.
AXES_DISABLE_ACCESS_LOG = True
AXES_VERBOSE = False
# A successful HTTP Basic check is remembered this long in the web process's memory (keyed by a
# keyed hash of the credentials, never the password): each check costs a PBKDF2 hash otherwise.
API_BASIC_AUTH_CACHE_SECONDS = env_int("API_BASIC_AUTH_CACHE_SECONDS", 300)

# HTTPS. Off by default (the embedded mode serves plain HTTP on 127.0.0.1); the production
# configuration in .env.example turns them on, and `manage.py check --deploy` is then clean.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", default=False)
# Behind a proxy that terminates TLS: the header it sets, e.g. `HTTP_X_FORWARDED_PROTO,https`.
_proxy_ssl_header = env_str("DJANGO_SECURE_PROXY_SSL_HEADER")
if _proxy_ssl_header:
    _header, _, _value = _proxy_ssl_header.partition(",")
    if not _header.startswith("HTTP_") or not _value:
        raise ImproperlyConfigured(
            f"DJANGO_SECURE_PROXY_SSL_HEADER must look like HTTP_X_FORWARDED_PROTO,https, got {_proxy_ssl_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_header, _value)
# Origins (scheme://host[:port]) trusted besides the request's own, for forms and websockets.
CSRF_TRUSTED_ORIGINS = [o for o in env_str("DJANGO_CSRF_TRUSTED_ORIGINS").split(",") if o]
# `/api/faults/` and the fault rule admin break orders on purpose: on with DEBUG only, unless set.
SAGA_FAULT_INJECTION = env_bool("SAGA_FAULT_INJECTION", default=DEBUG)
# `/healthz` shows anonymous callers only its status; staff, or this bearer token, see details.
SAGA_HEALTHZ_TOKEN = env_str("SAGA_HEALTHZ_TOKEN")
# Seals the card token in the message that registers it with payments (a Fernet key; derived
# from SECRET_KEY when empty). Every process that places orders or runs payments needs the same.
PAYMENT_TOKEN_SEAL_KEY = env_str("PAYMENT_TOKEN_SEAL_KEY")

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/orders/"
LOGOUT_REDIRECT_URL = "/"

# --- Databases: one per service ----------------------------------------------------------------
# The orchestrator (sagas, users, sessions, admin) lives on `default`; every service app on the
# alias named after it. `sagaplatform.routers.ServiceRouter` keeps each app on its own alias and
# forbids relations across them.

SERVICE_ALIASES = ("orders", "inventory", "payments", "shipping", "notifications")
DATABASE_ALIASES = ("default", *SERVICE_ALIASES)


def _process_role() -> str:
    """What this process is (`web`, `celery-worker`, `celery-beat` or a command's name): its
    PostgreSQL sessions carry it as `application_name`, so pg_stat_activity counts them per role."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m <package>
        program = os.path.basename(os.path.dirname(sys.argv[0]))
    if "celery" in sys.argv[0]:
        return "celery-" + next((arg for arg in sys.argv[1:] if arg in {"worker", "beat"}), "command")
    if program == "manage.py" and len(sys.argv) > 1:
        return "web" if sys.argv[1] == "serve" else sys.argv[1]
    return "web" if program in {"daphne", "uvicorn", "gunicorn", "hypercorn"} else program


PROCESS_ROLE = _process_role()
# The web process (daphne) runs every request in a thread of its own, and Django keeps a
# persistent connection (CONN_MAX_AGE) per thread, which it does not support under ASGI: the web
# process held 6 to 28 connections at 5 orders/s and exhausted PostgreSQL at 20/s. It borrows
# connections from one psycopg pool per alias instead, so it never holds more than
# DATABASE_POOL_MAX_SIZE per alias; a request that waits DATABASE_POOL_TIMEOUT seconds for one is
# answered 503. Celery workers keep CONN_MAX_AGE (their Django fixup closes a pool after every
# prefork task): a worker child holds at most one connection per alias. Budget: ARCHITECTURE.md.
DATABASE_POOL = env_bool("DATABASE_POOL", default=PROCESS_ROLE == "web")
DATABASE_POOL_MIN_SIZE = env_int("DATABASE_POOL_MIN_SIZE", 1)
DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 4)
DATABASE_POOL_TIMEOUT = env_float("DATABASE_POOL_TIMEOUT", 5.0)
# Send query parameters apart from the query (psycopg's server-side binding) so that psycopg
# prepares a statement on the server once a connection has run it 5 times, and from then on
# sends only its name and parameters: the worker neither quotes the values into the SQL nor
# has the server parse and plan it again. Measured with `make bench`: 8-13 % less CPU per saga
# order, nearly all in the worker (nothing without the preparation). On in Celery workers,
# whose tasks run again on a plan that a migration made stale (`SagaTask`); off elsewhere, and
# for a pooler in transaction mode older than PgBouncer 1.21 (prepared statements are
# per session).
DATABASE_PREPARED_STATEMENTS = env_bool("DATABASE_PREPARED_STATEMENTS", default=PROCESS_ROLE == "celery-worker")
# Django's server-side binding prepares nothing unless told when (psycopg's own default is 5).
PREPARED_STATEMENT_OPTIONS = {"server_side_binding": True, "prepare_threshold": 5}


def _postgres(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(f"Unsupported database URL scheme {parts.scheme!r}: {url}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # Opening a PostgreSQL connection costs ~5 ms here, more than a whole saga step: keep
        # connections (CONN_MAX_AGE) and check them before use (CONN_HEALTH_CHECKS) so a
        # restarted server costs one failed check, not a failed task.
        "CONN_MAX_AGE": 0 if DATABASE_POOL else env_int("DATABASE_CONN_MAX_AGE", 600),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "application_name": f"sagaplatform-{PROCESS_ROLE}"[:63],
            **(PREPARED_STATEMENT_OPTIONS if DATABASE_PREPARED_STATEMENTS else {}),
            **({"pool": _pool_options()} if DATABASE_POOL else {}),
        },
        "TEST": {"NAME": f"test_{unquote(parts.path.lstrip('/'))}", "DEPENDENCIES": []},
    }


def _pool_options() -> dict:
    return {"min_size": DATABASE_POOL_MIN_SIZE, "max_size": DATABASE_POOL_MAX_SIZE, "timeout": DATABASE_POOL_TIMEOUT}


def _sqlite(alias: str) -> dict:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / f"{alias}.sqlite3",
        # Measured here: the defaults gave 113 "database is locked" errors in 400 threaded
        # transactions; IMMEDIATE + WAL + a busy timeout gave 400 of 400.
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
        # Threaded tests need a file (WAL does not apply to shared in-memory databases).
        "TEST": {"NAME": str(VAR_DIR / f"test_{alias}.sqlite3"), "DEPENDENCIES": []},
    }


def _database(alias: str) -> dict:
    explicit = env_str(f"DATABASE_URL_{alias.upper()}")
    if explicit:
        return _postgres(explicit)
    base = env_str("DATABASE_URL")
    if base:
        base = base.rstrip("/")
        return _postgres(f"{base}_{alias}")
    return _sqlite(alias)


DATABASES = {alias: _database(alias) for alias in DATABASE_ALIASES}
DATABASE_ROUTERS = ["sagaplatform.routers.ServiceRouter"]
EMBEDDED_DATABASES = all(db["ENGINE"].endswith("sqlite3") for db in DATABASES.values())

# --- Celery ---------------------------------------------------------------------------------
# Reasons for each delivery setting are in docs/ARCHITECTURE.md ("Delivery").

REDIS_URL = env_str("REDIS_URL")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "memory://")
EMBEDDED_BROKER = CELERY_BROKER_URL.startswith("memory://")
# In the embedded mode the web process runs the workers as threads; a production web process
# only publishes.
SAGA_EMBEDDED_WORKER = env_bool("SAGA_EMBEDDED_WORKER", default=EMBEDDED_BROKER)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = (
    # The memory transport polls its queues; its 1 s default would add a second per hop.
    {"polling_interval": 0.005}
    if EMBEDDED_BROKER
    else {
        # A message a dead worker held comes back once this old, found by every live worker's
        # scan of the unacknowledged messages each restore interval. It must outlast the
        # longest live hold (the hard time limit: no message carries a countdown), or a running task is
        # delivered twice: docs/ARCHITECTURE.md, "Delivery".
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 300),
        "unacked_restore_interval": env_int("CELERY_UNACKED_RESTORE_INTERVAL", 10),
        "unacked_restore_throttle": 1,
        # A worker killed while scanning holds the scan's lock until it expires (default 300 s).
        "unacked_mutex_expire": 60,
        "health_check_interval": 25,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }
)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A task whose process died goes back as a retry, so a message that kills its worker every
# time (a poison message) is dropped after max_retries (3) instead of looping; the step's lease
# then turns it into a timed-out attempt.
CELERY_TASK_RETRY_ON_WORKER_LOST = True
CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT = True
# Recycle a pool child after this many tasks (0: never). Metrics stay right across recycling:
# docs/OPERATIONS.md, "Metrics".
CELERY_WORKER_MAX_TASKS_PER_CHILD = env_int("CELERY_WORKER_MAX_TASKS_PER_CHILD", 0) or None
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "orchestrator"
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 150)
if not EMBEDDED_BROKER and CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] <= CELERY_TASK_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_VISIBILITY_TIMEOUT must exceed CELERY_TASK_TIME_LIMIT")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Poison messages: a message that is not JSON, not an envelope, bigger than this, undecodable or
# for an unknown task is recorded as a dead letter and acknowledged; the worker carries on.
SAGA_MAX_MESSAGE_BYTES = env_int("SAGA_MAX_MESSAGE_BYTES", 1024 * 1024)
if CELERY_BROKER_URL.startswith("redis://"):
    CELERY_BROKER_TRANSPORT = "sagaplatform.kernel.deadletters:RedisTransport"
CELERY_WORKER_CONSUMER = "sagaplatform.kernel.deadletters:Consumer"
# Keep database connections across tasks: Celery's Django fixup otherwise closes every connection
# after each task, which cost 4,000 new PostgreSQL sessions per 1,000 orders here.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1_000_000)
SAGA_QUEUES = ("orchestrator", *SERVICE_ALIASES)
SAGA_SWEEP_INTERVAL = env_float("SAGA_SWEEP_INTERVAL", 2.0)
# A module whose `modes(current)` returns the definitions to run instead of the built-in ones,
# by mode (`orchestration.definitions`): the tests deploy changed definitions with it.
SAGA_DEFINITIONS_MODULE = env_str("SAGA_DEFINITIONS_MODULE")
# Shorten every step timeout / saga deadline (seconds), for tests and demos of timeouts.
SAGA_STEP_TIMEOUT_OVERRIDE = env_float("SAGA_STEP_TIMEOUT_OVERRIDE", 0.0)
# A step's lease runs from when a worker starts the attempt: a command (or its answer) still
# queued when the lease expires extends it, for up to this many seconds after it was sent.
SAGA_QUEUE_WAIT_LIMIT = env_float("SAGA_QUEUE_WAIT_LIMIT", 300.0)
# Cap every retry backoff (seconds), for tests and demos that should not wait a minute.
SAGA_RETRY_MAX_INTERVAL_OVERRIDE = env_float("SAGA_RETRY_MAX_INTERVAL_OVERRIDE", 0.0)
SAGA_DEADLINE_OVERRIDE = env_float("SAGA_DEADLINE_OVERRIDE", 0.0)
# Chaos: publish every message twice, as an at-least-once broker may deliver it.
SAGA_FAULT_DUPLICATE_DELIVERY = env_bool("SAGA_FAULT_DUPLICATE_DELIVERY", default=False)
# A worker that commits a message for a queue it consumes runs it itself, right after the
# commit, instead of a Celery hop (kernel/outbox.py, `runs_here`): a service's reply, and with
# SAGA_INLINE_COMMANDS the engine's commands to the services, round after round (a drain). Past
# SAGA_INLINE_BUDGET_MS of one drain, what is left is published. Off: every command is a Celery
# task of its own (each visible in Flower; a slow gateway call delays no other saga's steps).
SAGA_INLINE_DELIVERY = env_bool("SAGA_INLINE_DELIVERY", default=True)
SAGA_INLINE_COMMANDS = env_bool("SAGA_INLINE_COMMANDS", default=True)
SAGA_INLINE_BUDGET_MS = env_float("SAGA_INLINE_BUDGET_MS", 1000.0)
# A saga's parallel steps in one round of a drain: one runs here; each other one is published to
# run meanwhile in another process only if what runs here before it is expected to take this
# long (each operation's moving average in this process; unknown counts as long). Quicker ones run
# here, one after another: a broker hop costs more than they would wait. 0: always published.
SAGA_FAN_OUT_AFTER_MS = env_float("SAGA_FAN_OUT_AFTER_MS", 25.0)
# Batches (kernel/batching.py): a worker takes up to SAGA_BATCH_SIZE of a service's commands at
# once, waiting at most SAGA_BATCH_WAIT_MS for more, runs them in one transaction and applies
# their replies in one more. 1 turns batching off (a command per task, as before).
SAGA_BATCH_SIZE = max(1, env_int("SAGA_BATCH_SIZE", 32))
SAGA_BATCH_WAIT_MS = env_float("SAGA_BATCH_WAIT_MS", 2.0)
# Off: a message reaching a worker that holds at most one other message goes at once (a lone
# order's hops wait for no batch). On: it waits SAGA_BATCH_WAIT_MS for company even then.
SAGA_BATCH_WAIT_WHEN_IDLE = env_bool("SAGA_BATCH_WAIT_WHEN_IDLE", default=False)
# A batch holds its messages unacknowledged until it is done: a worker may hold a batch's worth
# across its pool (a quarter batch per process of the usual `-c 4`); 1 without batches.
CELERY_WORKER_PREFETCH_MULTIPLIER = env_int("CELERY_WORKER_PREFETCH_MULTIPLIER", max(1, SAGA_BATCH_SIZE // 4))
SAGA_ANTI_ENTROPY_INTERVAL = env_float("SAGA_ANTI_ENTROPY_INTERVAL", 10.0)
# Each database's relay runs this often: it publishes delayed outbox rows (retries, handling
# windows) once due on the database clock, so a retry goes out at most this late.
SAGA_RELAY_INTERVAL = env_float("SAGA_RELAY_INTERVAL", 1.0)

# Retention (seconds): published outbox rows, and barrier rows of sagas that ended, are purged
# after these ages by `manage.py purge` and by beat, per database. Why the ages are safe, and the
# floor the barrier's age never goes below: docs/ARCHITECTURE.md, "Retention".
OUTBOX_RETENTION = env_int("OUTBOX_RETENTION", 24 * 3600)
BARRIER_RETENTION = env_int("BARRIER_RETENTION", 7 * 24 * 3600)
RETENTION_PURGE_INTERVAL = env_float("RETENTION_PURGE_INTERVAL", 3600.0)
# Finished sagas' step-level timeline is purged this many days after they ended (0: kept
# forever), by `manage.py purge_sagas` and by beat (orchestration/retention.py).
SAGA_RETENTION_DAYS = env_float("SAGA_RETENTION_DAYS", 0.0)


def _periodic(task: str, queue: str, every: float, *args) -> dict:
    # No `expires`: it is a time on beat's clock that the worker judges on its own, and a worker
    # ten minutes ahead dropped every relay as expired. Runs queued while no worker listened
    # each find nothing left to do (one indexed query).
    return {"task": task, "schedule": every, "args": args, "options": {"queue": queue}}


CELERY_BEAT_SCHEDULE = {
    "orchestrator-sweep": _periodic("orchestration.sweep", "orchestrator", SAGA_SWEEP_INTERVAL),
    # Each database is relayed on its owner's queue, from its owner's worker.
    "default-relay": _periodic("kernel.relay_outbox", "orchestrator", SAGA_RELAY_INTERVAL, "default"),
    **{
        f"{alias}-relay": _periodic("kernel.relay_outbox", alias, SAGA_RELAY_INTERVAL, alias)
        for alias in SERVICE_ALIASES
    },
    # Messages a broker restart can lose after they were published, with no lease to notice:
    "orders-reannounce": _periodic("orders.reannounce_pending", "orders", SAGA_ANTI_ENTROPY_INTERVAL),
    "notifications-redeliver": _periodic("notifications.redeliver_queued", "notifications", SAGA_ANTI_ENTROPY_INTERVAL),
    # Idempotency keys past IDEMPOTENCY_KEY_TTL (a replay after that places a new order anyway).
    "orders-purge-idempotency-keys": _periodic("orders.purge_idempotency_keys", "orders", 3600.0),
    # Retention, in each database by a worker of its own queue.
    **{
        f"{alias}-purge": _periodic(
            "kernel.purge", alias if alias in SERVICE_ALIASES else "orchestrator", RETENTION_PURGE_INTERVAL, alias
        )
        for alias in DATABASE_ALIASES
    },
    "orchestrator-purge-sagas": _periodic("orchestration.purge_sagas", "orchestrator", RETENTION_PURGE_INTERVAL),
    # One alert per dead letter (a message a worker recorded and acknowledged instead of running).
    "orchestrator-dead-letters": _periodic(
        "orchestration.alert_dead_letters", "orchestrator", SAGA_ANTI_ENTROPY_INTERVAL
    ),
}

# --- Channels -------------------------------------------------------------------------------

# Probe an idle Redis connection after 10 s, then every 5 s; three misses and it is dead.
_REDIS_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)  # Linux names; elsewhere the system's defaults apply
}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # A websocket's channel holds at most `capacity` undelivered messages; past that
            # channels_redis drops them silently. The publisher sends one batch per 50 ms and
            # the consumers heal any loss from the database, so this only bounds a slow client.
            #
            # A consumer waits for messages in BZPOPMIN, which Redis itself ends after 5 s, so
            # the socket needs no timeout of its own (redis-py's default, 5 s, dropped idle
            # websockets). None also keeps redis-py from writing under asyncio.wait_for, which on
            # Python 3.11 loses a cancellation that lands as the write completes: the closed
            # websocket's receive task then polled Redis forever. A dead Redis is found by TCP
            # keepalive instead (about 25 s).
            "CONFIG": {
                "hosts": [
                    {
                        "address": env_str("CHANNEL_LAYER_URL", REDIS_URL),
                        "socket_timeout": None,
                        "socket_keepalive": True,
                        "socket_keepalive_options": _REDIS_KEEPALIVE,
                    }
                ],
                "capacity": 500,
                "expiry": 30,
            },
        }
    }
    # Shared by every process: throttling counters, worker heartbeats, live-feed watch marks.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": env_str("CACHE_URL", REDIS_URL),
            "KEY_PREFIX": "saga",
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # One process in the embedded mode: its memory is shared by everything.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# The live feed (orchestration/live.py): committed saga changes pushed to websockets.
SAGA_FEED_ENABLED = env_bool("SAGA_FEED_ENABLED", default=True)
# The publisher gathers this long before sending (fewer, larger messages under load).
FEED_BATCH_SECONDS = env_float("FEED_BATCH_SECONDS", 0.05)
# A websocket sends at most one update per this interval (coalescing the rest).
FEED_FLUSH_SECONDS = env_float("FEED_FLUSH_SECONDS", 0.1)
# A dashboard is sent at most this many saga rows a second (more waits and coalesces): what a
# browser applies and paints without falling behind (measured with `make bench-feed`).
FEED_MAX_ROWS_PER_SECOND = env_float("FEED_MAX_ROWS_PER_SECOND", 1500.0)
# Consumers compare what they sent with the database this often (heals lost messages).
FEED_RECONCILE_SECONDS = env_float("FEED_RECONCILE_SECONDS", 5.0)
# Workers announce themselves this often (the dashboard's "live workers").
WORKER_HEARTBEAT_SECONDS = env_float("WORKER_HEARTBEAT_SECONDS", 10.0)

# --- Service registry (sagaplatform/kernel/registry.py; docs/OPERATIONS.md, "Service registry") ---
SAGA_REGISTRY_BACKEND = env_str("SAGA_REGISTRY_BACKEND", "sagaplatform.kernel.registry.DatabaseRegistry")
# An instance expires this long after its last heartbeat (0: three heartbeats).
SAGA_REGISTRY_TTL = env_float("SAGA_REGISTRY_TTL", 0.0)
# Expired instances are forgotten (and leave the dashboard) this long after they expired.
SAGA_REGISTRY_FORGET_AFTER = env_float("SAGA_REGISTRY_FORGET_AFTER", 3600.0)
# Each process reads the live set at most this often, each read bounded by this timeout.
SAGA_REGISTRY_CACHE_SECONDS = env_float("SAGA_REGISTRY_CACHE_SECONDS", 1.0)
SAGA_REGISTRY_TIMEOUT = env_float("SAGA_REGISTRY_TIMEOUT", 0.2)
# The orchestrator sends commands where the registry says, and a step whose service has no live
# instance waits (its retries and the saga deadline not consumed) up to SAGA_NO_WORKER_WAIT_LIMIT
# seconds in all (0: never waits), asking again every SAGA_NO_WORKER_RECHECK seconds.
SAGA_REGISTRY_DISCOVERY = env_bool("SAGA_REGISTRY_DISCOVERY", default=True)
SAGA_NO_WORKER_WAIT_LIMIT = env_float("SAGA_NO_WORKER_WAIT_LIMIT", 600.0)
SAGA_NO_WORKER_RECHECK = env_float("SAGA_NO_WORKER_RECHECK", 2.0)
# What the workers report as their code version (default: the checkout's git commit).
SAGA_CODE_VERSION = env_str("SAGA_CODE_VERSION")

# --- REST API -------------------------------------------------------------------------------


def env_rate(name: str, default: str) -> str:
    """A DRF throttle rate, `<count>/<second|minute|hour|day>`, checked here rather than on the first request."""
    rate = env_str(name, default)
    count, _, period = rate.partition("/")
    if not count.isdigit() or period[:1] not in {"s", "m", "h", "d"}:
        raise ImproperlyConfigured(f"{name} must look like 60/minute, got {rate!r}")
    return rate


REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first: the first class's challenge is the WWW-Authenticate header of every 401.
        "sagaplatform.authentication.TokenAuthentication",
        "sagaplatform.authentication.SessionAuthentication",
        "sagaplatform.authentication.BasicAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["sagaplatform.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "sagaplatform.schema.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    # Every list: `?page=` and `?page_size=` (at most `sagaplatform.api.Pagination.max_page_size`, 200).
    "DEFAULT_PAGINATION_CLASS": "sagaplatform.api.Pagination",
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50),
    # Counted per user (per client address for the token endpoint) in the default cache.
    "DEFAULT_THROTTLE_RATES": {
        "orders_create": env_rate("API_THROTTLE_ORDERS_CREATE", "60/minute"),
        "auth_token": env_rate("API_THROTTLE_AUTH_TOKEN", "10/minute"),
    },
    # Proxies in front of the web process: the client address is the one they add to
    # X-Forwarded-For. 0 (the default) trusts no such header, which a client could forge.
    "NUM_PROXIES": env_int("API_NUM_PROXIES", 0),
    "EXCEPTION_HANDLER": "sagaplatform.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "sagaplatform API",
    "DESCRIPTION": "Place orders that run as distributed transactions across services.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # The long description (authentication, errors, pagination, idempotency) lives beside the API code.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "sagaplatform.api.describe_api"],
}
# How long an order's Idempotency-Key is remembered (seconds, default 24 h); after that the same
# key places a new order. `manage.py purge_idempotency_keys` deletes the expired ones.
IDEMPOTENCY_KEY_TTL = env_int("IDEMPOTENCY_KEY_TTL", 24 * 3600)
# A request body larger than this is refused before it is parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 64 * 1024)
# Admission: a new order is refused (503 `overloaded`, with Retry-After) while this many orders
# are pending, accepted and not yet decided by their saga; 0 = no limit. Size it as the sagas/s
# the workers complete times the queueing delay you accept (docs/ARCHITECTURE.md, "Admission").
ORDERS_MAX_PENDING = env_int("ORDERS_MAX_PENDING", 50)
# Seconds a 503 (overloaded, or a database unavailable or saturated) tells the client to wait.
API_RETRY_AFTER = env_int("API_RETRY_AFTER", 2)
# HTTP requests the web process serves at once; more are answered 503 at the door, before
# Django (sagaplatform/overload.py). 0 = no limit.
WEB_MAX_CONCURRENT_REQUESTS = env_int("WEB_MAX_CONCURRENT_REQUESTS", 16)

# --- Services -------------------------------------------------------------------------------

EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "orders@sagaplatform.local")
SMS_BACKEND = env_str("SMS_BACKEND", "notifications.sms.LoggingSmsBackend")
# Simulated card network: how long the "hang" test card blocks a charge.
PAYMENT_GATEWAY_HANG_SECONDS = env_float("PAYMENT_GATEWAY_HANG_SECONDS", 30.0)
# How long a booked parcel waits before it is dispatched (the point of no return); customers can
# cancel until then.
SHIPPING_HANDLING_SECONDS = env_float("SHIPPING_HANDLING_SECONDS", 10.0)
# A charge whose payment method is not registered yet fails transiently (and is retried) until
# it has waited this long (on the payments database's clock, from the first attempt that missed
# it) or reaches this attempt; then it fails for good with `payment_method_unknown`.
PAYMENT_METHOD_WAIT_SECONDS = env_float("PAYMENT_METHOD_WAIT_SECONDS", 10.0)
PAYMENT_METHOD_WAIT_ATTEMPTS = env_int("PAYMENT_METHOD_WAIT_ATTEMPTS", 4)
# Optimistic locking on stock: attempts before a reservation gives up as a transient error.
INVENTORY_MAX_LOCK_ATTEMPTS = env_int("INVENTORY_MAX_LOCK_ATTEMPTS", 25)

# --- Alert delivery (orchestration/alerting.py, docs/OPERATIONS.md "Alerts") ---------------
# Rules are evaluated by beat this often; a firing group is notified again after the repeat
# interval; a webhook or e-mail delivery is tried this many times, backing off exponentially.
ALERT_EVALUATION_INTERVAL = env_float("ALERT_EVALUATION_INTERVAL", 15.0)
ALERT_REPEAT_INTERVAL = env_float("ALERT_REPEAT_INTERVAL", 4 * 3600.0)
ALERT_DELIVERY_MAX_ATTEMPTS = env_int("ALERT_DELIVERY_MAX_ATTEMPTS", 6)
ALERT_DELIVERY_BACKOFF = env_float("ALERT_DELIVERY_BACKOFF", 2.0)  # first retry after this, then doubled
ALERT_DELIVERY_BACKOFF_MAX = env_float("ALERT_DELIVERY_BACKOFF_MAX", 300.0)
ALERT_WEBHOOK_TIMEOUT = env_float("ALERT_WEBHOOK_TIMEOUT", 5.0)
# Channels from the environment (kept as channels named `env-email` and `env-webhook`).
ALERT_EMAIL_TO = env_str("ALERT_EMAIL_TO")
ALERT_WEBHOOK_URL = env_str("ALERT_WEBHOOK_URL")
ALERT_WEBHOOK_SECRET = env_str("ALERT_WEBHOOK_SECRET")
if ALERT_WEBHOOK_URL and not ALERT_WEBHOOK_SECRET.startswith("whsec_"):
    raise ImproperlyConfigured("ALERT_WEBHOOK_URL needs ALERT_WEBHOOK_SECRET, a Standard Webhooks key (whsec_...)")
# The rules' thresholds.
ALERT_STUCK_GRACE = env_float("ALERT_STUCK_GRACE", 60.0)  # past its deadline this long: stuck
ALERT_FAILURE_WINDOW = env_float("ALERT_FAILURE_WINDOW", 300.0)
ALERT_FAILURE_RATE = env_float("ALERT_FAILURE_RATE", 0.2)
ALERT_FAILURE_MIN_STEPS = env_int("ALERT_FAILURE_MIN_STEPS", 5)
ALERT_OUTBOX_AGE = env_float("ALERT_OUTBOX_AGE", 60.0)
# Where the runbook links point (docs/OPERATIONS.md in the repository by default).
ALERT_RUNBOOK_BASE = env_str("ALERT_RUNBOOK_BASE", "docs/OPERATIONS.md")
# A link back to the platform in each notification (Alertmanager's externalURL).
ALERT_EXTERNAL_URL = env_str("ALERT_EXTERNAL_URL", "http://127.0.0.1:8000/dashboard/")
CELERY_BEAT_SCHEDULE["orchestrator-alerts"] = _periodic(
    "orchestration.evaluate_alerts", "orchestrator", ALERT_EVALUATION_INTERVAL
)

# --- Circuit breakers (sagaplatform/kernel/breakers.py, orchestration/engine/deferral.py) -----------
# Per service and around the payment gateway: open at BREAKER_FAILURE_RATE of transient failures
# over BREAKER_WINDOW seconds (at least BREAKER_MIN_CALLS calls), stay open BREAKER_OPEN_SECONDS,
# then admit BREAKER_HALF_OPEN_PROBES probes. Deferred steps resume spread over
# BREAKER_RESUME_SPREAD seconds.
BREAKER_ENABLED = env_bool("BREAKER_ENABLED", default=True)
BREAKER_WINDOW = env_int("BREAKER_WINDOW", 30)
BREAKER_MIN_CALLS = env_int("BREAKER_MIN_CALLS", 10)
BREAKER_FAILURE_RATE = env_float("BREAKER_FAILURE_RATE", 0.5)
BREAKER_OPEN_SECONDS = env_float("BREAKER_OPEN_SECONDS", 10.0)
BREAKER_HALF_OPEN_PROBES = env_int("BREAKER_HALF_OPEN_PROBES", 3)
BREAKER_PROBE_WAIT = env_float("BREAKER_PROBE_WAIT", 2.0)
BREAKER_RESUME_SPREAD = env_float("BREAKER_RESUME_SPREAD", 10.0)

# --- Logging --------------------------------------------------------------------------------

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# Structured logs (sagaplatform/observability/logging.py): JSON lines in production, readable
# key=value lines in the embedded mode (DJANGO_DEBUG on), unless LOG_FORMAT says otherwise.
LOG_FORMAT = env_str("LOG_FORMAT", "console" if DEBUG else "json")
if LOG_FORMAT not in ("json", "console"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or console, got {LOG_FORMAT!r}")


def _log_formatter():
    from sagaplatform.observability.logging import formatter

    return formatter(json=LOG_FORMAT == "json")


LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structured": _log_formatter()},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        app: {"level": LOG_LEVEL}
        for app in (
            "sagaplatform",
            "orders",
            "inventory",
            "payments",
            "shipping",
            "notifications",
            "orchestration",
            "django_structlog",
        )
    },
}
# django-structlog's per-task lines (enqueued, started, succeeded) at DEBUG: a saga's own lines
# say what happened; its request lines stay at INFO.
DJANGO_STRUCTLOG_CELERY_DEFAULT_LOG_LEVEL = logging.DEBUG
DJANGO_STRUCTLOG_CELERY_TASK_FAILURE_LOG_LEVEL = logging.WARNING

# --- Observability --------------------------------------------------------------------------
# docs/OPERATIONS.md. /metrics needs this bearer token; without one it is open only with
# DJANGO_DEBUG on. Tracing is configured by the standard OTEL_* variables (off by default).
SAGA_METRICS_TOKEN = env_str("SAGA_METRICS_TOKEN", "")
# The dashboard links a saga's trace id here, e.g. http://jaeger:16686/trace/{trace_id}
SAGA_TRACE_URL_TEMPLATE = env_str("SAGA_TRACE_URL_TEMPLATE", "")


def _not_a_503(record) -> bool:
    # Django logs every 5xx as an error. A 503 is a refusal under load (80 a second in a ramp);
    # the database errors behind the others are logged where they are turned into a 503.
    return getattr(record, "status_code", None) != 503


LOGGING["filters"] = {"not_a_503": {"()": "django.utils.log.CallbackFilter", "callback": _not_a_503}}
LOGGING["loggers"]["django.request"] = {"filters": ["not_a_503"]}

# --- Composition ----------------------------------------------------------------------------
# Ports (sagaplatform/kernel/ports.py): how one part reads or asks another without importing it.
SAGA_SUMMARY_READER = "orchestration.selectors.saga_summary"
SAGA_PLAN_READER = "orchestration.selectors.saga_plan"
SAGA_EXISTENCE_READER = "orchestration.selectors.sagas_known"
SAGA_CANCELLER = "orchestration.engine.saga_cancel"
STOCK_AVAILABILITY_READER = "inventory.selectors.stock_available"
STOCK_CONTENTION_READER = "inventory.contention.summary"
SAGA_ENDED_READER = "orchestration.selectors.sagas_ended_before"
