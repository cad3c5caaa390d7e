"""The Lua scripts (shared/lua/) as a contract: flags declared, keys and arguments named."""

from __future__ import annotations

import re
from importlib.resources import files

import pytest

SCRIPTS = sorted(p.name for p in (files("shared") / "lua").iterdir() if p.name.endswith(".lua"))
# a local bound straight from ARGV/KEYS slots, e.g. `local now, ttl = ARGV[1], tonumber(ARGV[2])`
NAMED = re.compile(r"^\s*local [a-z_][a-z0-9_]*(, [a-z_][a-z0-9_]*)* =")


def _code(name: str) -> list[str]:
    text = (files("shared") / "lua" / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if not line.lstrip().startswith("--")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_declares_its_flags(name: str) -> None:
    """Each script starts with a ``#!lua`` shebang, so Redis applies its flags (a full Redis
    refuses a writing script whole, before its first write, unless it is allowed to go on)."""
    first = (files("shared") / "lua" / name).read_text(encoding="utf-8").splitlines()[0]
    assert re.fullmatch(r"#!lua( flags=(allow-oom|no-writes))?", first), first


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_argument_is_read_into_a_named_local(name: str) -> None:
    """``ARGV[...]`` is read only where a named local is bound (no argument used by its number
    in the middle of the logic), and no Lua code spells an ``arq:`` key itself: every key
    comes in KEYS, from ``shared.contract.Keys``."""
    for line in _code(name)[1:]:
        if "ARGV[" in line:
            assert NAMED.match(line) or line.lstrip().startswith("ARGV["), line
        assert "'arq:" not in line and '"arq:' not in line, line
