"""A Poseidon authenticator plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).

Import every module at the top of this file: componentize-py bundles only what module-level
imports pull in when it builds, so a module imported only inside a method builds but is
missing when the method runs (ModuleNotFoundError). ssl and networking (sockets, name
lookup) are not available.
"""

import hmac

from wit_world import exports
from componentize_py_types import Err
from wit_world.imports import host, types


class Authenticator(exports.Authenticator):
    def authenticate(self, request: types.AuthRequest) -> types.Principal:
        """The tenant whose `token.TENANT` configuration value is the request's Poseidon-Token."""
        token = (request.poseidon_token or "").encode()
        tenant = None
        # Every entry is compared, each with hmac.compare_digest (its time does not tell
        # where a guess differs); `==` would stop at the first difference.
        for key, value in host.config_entries():
            if key.startswith("token.") and hmac.compare_digest(value.encode(), token) and tenant is None:
                tenant = key[len("token."):]
        if not token or tenant is None:
            raise Err(types.Denial(status=401, message="unknown Poseidon-Token"))
        return types.Principal(tenant=tenant, environments=None)
