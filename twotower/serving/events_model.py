"""The event endpoint's Triton python-backend model, copied into the export as ``record_events/1/model.py``.

Clients send ``user_id``, ``item_id`` and ``timestamp`` (integer seconds) rows, and optionally
``label`` (a rating or label), [n, 1] each. A batch is checked whole first; a bad one is
INVALID_ARGUMENT with one line and changes nothing. A good one is appended to the run's event log
(fsynced) and then to the live store every served version reads (``twotower.store.events``),
before the call returns OK with the number of events accepted.
"""
# ruff: noqa: E402  (the path and the telemetry switch must come before the other imports)
# isort: skip_file

import os
import sys

# As in executor_model.py: the stub's embedded interpreter ignores PYTHONPATH.
sys.path[:0] = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]

import twotower  # noqa: F401  first of the project: telemetry off before anything else is imported

import json
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from twotower.serving.errors import RequestError
from twotower.serving.events import EVENTS_SETTINGS, check_events, events_dir_of
from twotower.store.events import open_live_store, record_events


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((version_dir / EVENTS_SETTINGS).read_text())
        self.events_dir = events_dir_of(version_dir, settings["events_dir"])
        self.text_ids = settings["text_ids"]
        self.live_store = open_live_store(self.events_dir)

    def execute(self, requests):
        return [self._record(request) for request in requests]

    def _record(self, request):
        def column(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy().reshape(-1)

        try:
            batch = check_events(
                column("user_id"), column("item_id"), column("timestamp"), column("label"), self.text_ids
            )
            record_events(self.events_dir, batch, self.live_store)
        except RequestError as error:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
            )
        except Exception as error:  # noqa: BLE001 - a fault must become a response, not a dead model
            pb_utils.Logger.log_error(f"record_events: request failed:\n{traceback.format_exc()}")
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(
                    f"events not recorded ({type(error).__name__}); details are in the server log",
                    pb_utils.TritonError.UNAVAILABLE,
                ),
            )
        return pb_utils.InferenceResponse([pb_utils.Tensor("accepted", np.full((len(batch), 1), 1, dtype=np.int64))])

    def finalize(self):
        self.live_store.close()
