"""The job store's Lua scripts, one file each in ``core/lua/``, each with ``prelude.lua`` in front.

Redis runs a script atomically: the multi-key state changes that must not interleave with
another client's (create a job while its dataset is deleted, cancel while the worker starts,
requeue while a runner renews) are scripts.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import redis
from redis.commands.core import Script


@cache
def script_text(name: str) -> str:
    """``prelude.lua`` and ``<name>.lua``, as one script."""
    folder = files("core") / "lua"
    return (folder / "prelude.lua").read_text(encoding="utf-8") + "\n" + (folder / f"{name}.lua").read_text("utf-8")


def register(client: redis.Redis, name: str) -> Script:
    """The script ``name`` on ``client``: called with ``keys=`` and ``args=``, loaded on first use."""
    return client.register_script(script_text(name))
