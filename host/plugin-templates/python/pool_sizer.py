"""A Poseidon pool-sizer plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).
"""

from wit_world import exports
from wit_world.imports import types


class PoolSizer(exports.PoolSizer):
    def wanted_idle(self, environment: types.Environment, state: types.PoolState) -> int:
        """Keeps one more idle runner than configured during working hours (local time)."""
        working = state.local.weekday < 5 and 8 <= state.local.hour < 18
        return state.configured_size + (1 if working else 0)
