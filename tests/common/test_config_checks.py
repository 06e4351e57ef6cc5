"""sdt.common.config_checks: the strict constructor and the Literal choice check every config dataclass uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from sdt.common.config_checks import check_all, check_literal_fields, from_mapping, literal_choices
from sdt.common.errors import UserError

Mode = Literal["fast", "slow"]


@dataclass
class Example:
    mode: Mode = "fast"
    optional_mode: Mode | None = None
    name: str = "x"

    def __post_init__(self) -> None:
        check_literal_fields(self, "example")


def test_unknown_keys_are_named_with_their_prefix_and_the_valid_options():
    assert from_mapping(Example, {"mode": "slow"}, "example") == Example(mode="slow")
    assert from_mapping(Example, None, "example") == Example()
    with pytest.raises(
        UserError, match=r"unknown example option\(s\) \['mdoe'\] \(example\.mdoe\); valid options: mode"
    ):
        from_mapping(Example, {"mdoe": "slow"}, "example")
    with pytest.raises(UserError, match="example must be a mapping, got list"):
        from_mapping(Example, ["mode"], "example")


def test_literal_fields_accept_only_their_values():
    assert literal_choices(Mode) == ("fast", "slow")
    assert literal_choices(Mode | None) == ("fast", "slow", None)
    assert literal_choices(str) is None
    Example(optional_mode="slow")
    with pytest.raises(UserError, match="example.mode must be one of fast, slow; got 'quick'"):
        Example(mode="quick")
    with pytest.raises(UserError, match="example.optional_mode must be one of fast, slow, null; got 'quick'"):
        Example(optional_mode="quick")


def test_check_all_raises_the_first_failing_message():
    check_all([(True, "a")])
    with pytest.raises(UserError, match="^b$"):
        check_all([(True, "a"), (False, "b"), (False, "c")])
