"""Test fixture: a pool sizer that reads a secret through an import the host does not offer."""

from wit_world import exports
from wit_world.imports import secrets, types


class PoolSizer(exports.PoolSizer):
    def wanted_idle(self, environment: types.Environment, state: types.PoolState) -> int:
        return int(secrets.get("pool-size") or "1")
