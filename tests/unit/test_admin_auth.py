"""Admin tokens: one per operator or tool, each with the label the audit log records."""

from __future__ import annotations

import pytest

from playbus.actors.service.admin import admin_tokens


def test_admin_tokens_have_labels_and_a_bad_list_names_its_item() -> None:
    assert admin_tokens({}) == {}
    assert admin_tokens({"PLAYBUS_ADMIN_TOKEN": "t0"}) == {"admin": "t0"}
    assert admin_tokens({"PLAYBUS_ADMIN_TOKEN": "t0", "PLAYBUS_ADMIN_TOKENS": " ops:abcdefgh , ci-bot:12345678,"}) == {
        "admin": "t0", "ops": "abcdefgh", "ci-bot": "12345678"}
    for bad, msg in (("ops", "item 1: expected 'label:token'"), ("ops:short", "item 1: expected"),
                     ("a:abcdefgh,b c:abcdefgh", "item 2: expected"),
                     ("a:abcdefgh,a:ijklmnop", "item 2: label 'a' is given twice")):
        with pytest.raises(ValueError, match=msg):
            admin_tokens({"PLAYBUS_ADMIN_TOKENS": bad})
