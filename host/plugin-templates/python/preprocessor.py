"""A Poseidon preprocessor plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).

Import every module at the top of this file: componentize-py bundles only what module-level
imports pull in when it builds, so a module imported only inside a method builds but is
missing when the method runs (ModuleNotFoundError). ssl and networking (sockets, name
lookup) are not available.
"""

from wit_world import exports
from componentize_py_types import Err
from wit_world.imports import types


class Preprocessor(exports.Preprocessor):
    def preprocess_execute(self, request: types.ExecuteRequest) -> types.ExecuteRequest:
        """Refuses privileged executions (HTTP 400 with the message), passes everything else."""
        if request.privileged:
            raise Err("privileged execution is not allowed")
        return request

    def preprocess_files(self, update: types.FileUpdate) -> types.FileUpdate:
        """Passes file updates unchanged."""
        return update
