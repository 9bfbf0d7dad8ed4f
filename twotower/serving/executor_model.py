"""The executor's Triton python-backend model, copied into the export as ``executor_model/1/model.py``.

It runs only inside Triton's python backend stub. Merlin's own executor model answers
every exception with INTERNAL and the full traceback, server file paths included.
This one loads the graph the same way (it subclasses Merlin's). Requests that Triton's dynamic
batcher hands over together are answered by one pass of the graph over all their users, each
request getting its own rows back; should the graph refuse the batch, each request is answered
alone, so only the faulty one gets the error. It answers:

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
from merlin.systems.triton.conversions import match_representations
from merlin.table import TensorTable
from merlin.systems.triton.models.executor_model import TritonPythonModel as MerlinExecutorModel

from twotower.serving.errors import RequestError, ServiceUnavailable


def _triton_response(outputs: dict[str, np.ndarray]) -> "pb_utils.InferenceResponse":
    """Text outputs (item ids of a data set whose ids are text) go out as BYTES: Merlin turns them
    into NumPy unicode arrays, which pb_utils refuses."""
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor(name, np.char.encode(array, "utf-8").astype(object) if array.dtype.kind == "U" else array)
            for name, array in outputs.items()
        ]
    )


def _error_response(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _user_ids(request) -> np.ndarray:
    """The request's user ids, [n, 1] on the wire, as the graph reads them: [n]."""
    return pb_utils.get_input_tensor_by_name(request, "user_id").as_numpy().reshape(-1)


class TritonPythonModel(MerlinExecutorModel):
    def execute(self, requests):
        user_ids = [_user_ids(request) for request in requests]
        if len(requests) > 1:
            try:
                outputs = self._recommend(np.concatenate(user_ids))
            except ServiceUnavailable as error:  # the same for every request: no point asking again
                return [_error_response(str(error), pb_utils.TritonError.UNAVAILABLE) for _ in requests]
            except Exception:  # noqa: BLE001 - answered request by request below, each with its own status
                pass
            else:
                ends = np.cumsum([len(ids) for ids in user_ids])
                return [
                    _triton_response({name: rows[end - len(ids) : end] for name, rows in outputs.items()})
                    for ids, end in zip(user_ids, ends)
                ]
        return [self._respond(ids) for ids in user_ids]

    def _recommend(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for ``user_ids``, a row per user ([n, 1] where the graph gives [n])."""
        outputs = self.ensemble.transform(TensorTable({"user_id": user_ids}), runtime=TritonExecutorRuntime())
        aligned = match_representations(self.ensemble.output_schema, outputs.to_dict())
        return {name: array.reshape(len(array), -1) for name, array in aligned.items()}

    def _respond(self, user_ids: np.ndarray):
        try:
            return _triton_response(self._recommend(user_ids))
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
