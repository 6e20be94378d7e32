"""Print the environment `make test` runs the suite with.

PostgreSQL and Redis on 127.0.0.1 are used when they answer (the production mode, with real
worker processes); otherwise the suite runs embedded on SQLite and says what it skipped. With
`--require` (or CI=true) a missing service is an error instead.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys

DEFAULTS = {
    "DATABASE_URL": ("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/sagaplatform", ("127.0.0.1", 5432)),
    "REDIS_URL": ("TEST_REDIS_URL", "redis://127.0.0.1:6379/15", ("127.0.0.1", 6379)),
}


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def main() -> int:
    required = "--require" in sys.argv or os.environ.get("CI", "").lower() == "true"
    for name, (override, default, address) in DEFAULTS.items():
        value = os.environ.get(override, default)
        if reachable(address):
            print(f"export {name}={shlex.quote(value)}")
        elif required:
            print(f"echo '{name}: nothing answers on {address[0]}:{address[1]}' >&2; exit 1")
            return 0
        else:
            print(f"echo 'note: {name} not reachable on {address[0]}:{address[1]}; running embedded' >&2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
