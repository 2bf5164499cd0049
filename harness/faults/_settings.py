"""Range checks for numeric settings, shared by every kind; the message names the key."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults.base import Fault, FaultError


def setting(fault: Fault, key: str, default: Any, *, minimum: float,
            exclusive: bool = False) -> Any:
    """``table[key]`` (or ``default``), refused unless it is >= ``minimum`` (> if exclusive).
    The base class has already checked the type against ``params``."""
    value = fault.table.get(key, default)
    if value is None:
        raise FaultError(f"{fault.where}: kind {fault.kind!r} needs {key!r}")
    if value < minimum or (exclusive and value == minimum):
        relation = ">" if exclusive else ">="
        raise FaultError(f"{fault.where}: {key} must be {relation} {minimum}, got {value}")
    return value


def refuse(fault: Fault, keys: tuple[str, ...], why: str) -> None:
    """Refuse common keys a kind cannot honour, rather than ignore them silently."""
    for key in keys:
        if key in fault.table:
            raise FaultError(f"{fault.where}: kind {fault.kind!r} does not take {key!r}: {why}")
