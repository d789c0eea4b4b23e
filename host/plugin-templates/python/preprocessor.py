"""A Poseidon preprocessor plugin in Python (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

Build it with ./build.sh (componentize-py); the host functions are in
wit_world.imports.host (log, config_get, config_entries).
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
