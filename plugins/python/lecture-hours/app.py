"""lecture-hours: a pool sizer written in Python (WIT poseidon:plugins@0.2.0).

Keeps `busy` idle runners during lecture hours — local time in the entry's time zone,
daylight saving time applied by the host — and the configured pool size otherwise.

Configuration (the `config:` of the plugin's entry):
  busy      idle runners wanted during lecture hours (default 10)
  hours     "HH:MM-HH:MM", local time (default "08:00-18:00"); may cross midnight
  weekdays  "mon-fri", "mon,wed,fri", "all", ... (default "mon-fri")
"""

from wit_world import exports
from wit_world.imports import host, types

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def parse_minutes(text: str) -> int:
    hours, minutes = text.strip().split(":")
    value = int(hours) * 60 + int(minutes)
    if not 0 <= value <= 24 * 60:
        raise ValueError(f"{text!r} is not a time of day")
    return value


def parse_weekdays(text: str) -> set[int]:
    if text.strip() == "all":
        return set(range(7))
    days: set[int] = set()
    for part in text.split(","):
        part = part.strip().lower()
        if "-" in part:
            first, last = (DAYS.index(day) for day in part.split("-"))
            days.update(range(first, last + 1) if first <= last else [*range(first, 7), *range(0, last + 1)])
        else:
            days.add(DAYS.index(part))
    return days


def in_lecture_hours(local: types.LocalTime, hours: str, weekdays: str) -> bool:
    start, end = (parse_minutes(t) for t in hours.split("-"))
    now = local.hour * 60 + local.minute
    if start <= end:
        return local.weekday in parse_weekdays(weekdays) and start <= now < end
    # Crossing midnight: the early part belongs to the day before.
    if now >= start:
        return local.weekday in parse_weekdays(weekdays)
    return now < end and (local.weekday - 1) % 7 in parse_weekdays(weekdays)


class PoolSizer(exports.PoolSizer):
    def wanted_idle(self, environment: types.Environment, state: types.PoolState) -> int:
        busy = int(host.config_get("busy") or "10")
        hours = host.config_get("hours") or "08:00-18:00"
        weekdays = host.config_get("weekdays") or "mon-fri"
        try:
            lecture = in_lecture_hours(state.local, hours, weekdays)
        except ValueError as error:
            # A bad configuration traps the call: the host counts the failure, shows it
            # as the plugin's lastError and keeps the configured pool size.
            raise ValueError(f"bad configuration: {error}") from error
        wanted = max(busy, state.configured_size) if lecture else state.configured_size
        host.log(
            host.LogLevel.DEBUG,
            f"environment {environment.id}: {state.local.time_zone} "
            f"{state.local.hour:02}:{state.local.minute:02}, wanting {wanted} idle runners",
        )
        return wanted
