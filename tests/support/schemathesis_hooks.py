"""What schemathesis needs for playbus beyond its built-ins, loaded by tests/e2e/test_openapi.py with
SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks: msgpack request bodies, and a check that an admin operation sent
without the token is refused with 401 (and one sent with it is not).
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import schemathesis

TOKEN_HEADER = "authorization"


@schemathesis.serializer("application/msgpack", "application/x-msgpack")
def msgpack_body(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    return msgpack.packb(_fits(value))  # type: ignore[no-any-return]


def _fits(value: Any) -> Any:
    """msgpack holds integers of 64 bits: a larger generated one goes as its text (the server rejects it alike)."""
    if isinstance(value, bool) or not isinstance(value, int | dict | list):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {k: _fits(v) for k, v in value.items()}
    return [_fits(v) for v in value]


@schemathesis.check
def admin_token_decides(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                        case: schemathesis.Case) -> bool | None:
    """An admin operation (one with `security`) answers 401 exactly when the request does not carry the server's
    token (PLAYBUS_ADMIN_TOKEN in the environment of the run)."""
    if not case.operation.definition.raw.get("security"):
        return None
    sent = {k.lower(): v for k, v in response.request.headers.items()}.get(TOKEN_HEADER)
    right = sent == f"Bearer {os.environ['PLAYBUS_ADMIN_TOKEN']}"
    assert (response.status_code == 401) != right, \
        f"an admin operation {'with' if right else 'without'} the token answered {response.status_code}"
    return True
