"""A Poseidon pool-sizer plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).

Import every module at the top of this file: componentize-py bundles only what module-level
imports pull in when it builds, so a module imported only inside a method builds but is
missing when the method runs (ModuleNotFoundError). ssl and networking (sockets, name
lookup) are not available.
"""

from wit_world import exports
from wit_world.imports import types


class PoolSizer(exports.PoolSizer):
    def wanted_idle(self, environment: types.Environment, state: types.PoolState) -> int:
        """Keeps one more idle runner than configured during working hours (local time)."""
        working = state.local.weekday < 5 and 8 <= state.local.hour < 18
        return state.configured_size + (1 if working else 0)
