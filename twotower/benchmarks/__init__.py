"""The benchmarks, one module each (``make benchmark-<name>``): ``quality``, ``models``,
``prerank``, ``serving``, ``faults``, ``scale``, ``training``, ``cold_start`` and ``replay``, over
``harness`` (derived runs, free ports, tables and JSON reports). Each prints a table and writes a
JSON report whose path is its last line; ``support/`` holds what only they use. Their tables,
dates and commands are in docs/benchmarks.md.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "quality": ["run_quality_benchmark"],
        "models": ["run_model_benchmark"],
        "prerank": ["run_prerank_benchmark"],
        "serving": ["run_serving_benchmark"],
        "faults": ["run_fault_benchmark"],
        "scale": ["run_scale_benchmark"],
        "training": ["run_train_benchmark"],
        "cold_start": ["run_cold_start_benchmark"],
        "replay": ["run_replay_benchmark"],
    },
)
