"""On/off switches read from environment variables, one spelling for all of them.

`env_switch(name, default)`: unset or empty is `default`; 1/on/true/yes turn it on and 0/off/false/no off
(any case, spaces around ignored); anything else is a ValueError naming the variable, rather than a value
one switch reads as on and another as off.
"""

from __future__ import annotations

import os

ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


def env_switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"${name}={raw!r} is not a switch: use one of {'/'.join(ON)} (on) or {'/'.join(OFF)} (off), "
                     f"any case, or leave it unset (default: {'on' if default else 'off'})")


def option_or_env(option: str, flag: bool | None, name: str, default: bool) -> bool:
    """An on/off option that None leaves to the environment switch `name` (`env_switch`)."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"{option} must be True, False or None (${name}), got {flag!r}")
    return env_switch(name, default) if flag is None else flag
