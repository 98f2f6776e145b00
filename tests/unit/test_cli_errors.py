"""The CLI shows an admin API error as an operator reads it: the message, the field or line, each failure."""

from __future__ import annotations

import json

from playbus.admin import _readable


def test_errors_are_readable() -> None:
    body = {"error": "the script's test vectors fail (2); nothing was stored", "failures": ["case a:\n-x\n+y", "b"]}
    assert _readable(json.dumps(body).encode()) == ("the script's test vectors fail (2); nothing was stored\n"
                                                   "case a:\n-x\n+y\nb")
    assert _readable(b'{"error": "bad", "field": "rules[0].emits[1]"}') == "bad (field rules[0].emits[1])"
    assert _readable(b'{"error": "q:3: syntax", "line": 3}') == "q:3: syntax (line 3)"
    assert _readable(b"not json") == "not json"
    assert _readable(b'["a"]') == '["a"]'
