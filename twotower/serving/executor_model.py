"""The executor's Triton python-backend model, copied into the export as ``executor_model/1/model.py``.

It runs only inside Triton's python backend stub. Merlin's own executor model answers
every exception with INTERNAL and the full traceback, server file paths included.
This one loads the graph the same way (it subclasses Merlin's) and answers:

- ``RequestError`` (the client's mistake): INVALID_ARGUMENT with the error's one line;
- ``ServiceUnavailable`` (e.g. the online store is down): UNAVAILABLE with its one line;
- anything else: INTERNAL with a short message; the traceback goes to the server log only.
"""
# ruff: noqa: E402  (the path and the telemetry switch must come before the other imports)
# isort: skip_file

import os
import sys

# Triton's python stub embeds an interpreter that ignores PYTHONPATH (its isolated configuration), so a
# server started with a checkout on PYTHONPATH would import the installed twotower, not the code that
# exported this graph and started the server: the variable is applied here as Python applies it.
sys.path[:0] = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]

import twotower  # noqa: F401  first of the project: telemetry off (and the egress guard) before Feast is imported

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
from merlin.systems.triton.conversions import match_representations, triton_request_to_tensor_table
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel

from twotower.serving.errors import RequestError, ServiceUnavailable


def _triton_response(outputs, schema) -> "pb_utils.InferenceResponse":
    """Merlin's conversion, except that text outputs (item ids of a data set whose ids are text)
    go out as BYTES: Merlin turns them into NumPy unicode arrays, which pb_utils refuses."""
    aligned = match_representations(schema, outputs.to_dict())
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor(name, np.char.encode(array, "utf-8").astype(object) if array.dtype.kind == "U" else array)
            for name, array in aligned.items()
        ]
    )


def _error_response(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel(MerlinExecutorModel):
    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            inputs = triton_request_to_tensor_table(request, self.ensemble.input_schema)
            outputs = self.ensemble.transform(inputs, runtime=TritonExecutorRuntime())
            return _triton_response(outputs, self.ensemble.output_schema)
        except RequestError as error:
            return _error_response(str(error), pb_utils.TritonError.INVALID_ARG)
        except ServiceUnavailable as error:
            return _error_response(str(error), pb_utils.TritonError.UNAVAILABLE)
        except Exception as error:  # noqa: BLE001 - any fault must become a response, not a dead model
            pb_utils.Logger.log_error(f"executor_model: request failed:\n{traceback.format_exc()}")
            return _error_response(
                f"internal error in the serving graph ({type(error).__name__}); details are in the server log",
                pb_utils.TritonError.INTERNAL,
            )
