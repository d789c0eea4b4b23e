"""A Poseidon observer plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).
"""

from wit_world import exports
from wit_world.imports import host, types


class Observer(exports.Observer):
    def observe(self, events: list[types.LifecycleEvent]) -> None:
        """Logs how many events arrived."""
        host.log(host.LogLevel.INFO, f"{len(events)} events")
