"""A Poseidon observer plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).

Import every module at the top of this file: componentize-py bundles only what module-level
imports pull in when it builds, so a module imported only inside a method builds but is
missing when the method runs (ModuleNotFoundError). ssl and networking (sockets, name
lookup) are not available.
"""

from wit_world import exports
from wit_world.imports import host, types


class Observer(exports.Observer):
    def observe(self, events: list[types.LifecycleEvent]) -> None:
        """Logs how many events arrived."""
        host.log(host.LogLevel.INFO, f"{len(events)} events")
