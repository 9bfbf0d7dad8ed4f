"""Serving: the graph's operators (``ops/``), the graph over a run's artifacts (``graph``), its
export into a Triton model repository (``export``), the owned ``tritonserver`` process
(``triton``), the executor model Triton runs (``executor_model``), the event endpoint beside it
(``events``, ``events_model``), the errors it answers with
(``errors``), the gRPC client (``client``) and batch top-k without a server (``batch``).
Serving reads saved artifacts only (``twotower.store``); it never imports the stages.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "graph": ["build_ensemble", "recipe_ensemble", "load_external_ids", "popular_items"],
        "export": ["MODEL_NAME", "export_ensemble", "export_version", "load_exported_ensemble", "recommend_in_process"],
        "triton": ["TritonServer", "triton_server", "PortInUse"],
        "client": ["recommend", "send_events", "print_recommendations", "demo_users", "user_id_request"],
        "events": ["EVENTS_MODEL", "export_events_model", "check_events"],
        "batch": ["run_recommend", "RecommendError"],
        "errors": ["RequestError", "ServiceUnavailable"],
    },
)
