"""A served run's life after the first export: new items without retraining (``refresh``,
``twotower refresh-items``) and new interactions with a warm-started retrain (``retrain``,
``twotower retrain``), each rolled out as a new model version without downtime; and live events
(``events``, ``twotower events``), which shape the next answer without a new version.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "refresh": ["refresh_items", "RefreshRefused", "RolloutFailed"],
        "retrain": ["retrain", "RetrainRefused"],
        "events": ["send_events_file", "EventsRefused"],
    },
)
