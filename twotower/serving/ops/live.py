"""Live events folded into the rows a request reads from Feast (used by ``OnlineQueryFeatures``).

A user's events since the run's features were built (``twotower.store.events``) count as their
latest interactions: each item joins ``seen_items`` (never recommended again) and, when it is a
positive (no label, or a label of at least ``data.min_rating``), the end of the encoded history,
whose oldest entries drop beyond the history length. A user with events but no Feast row gets
one: every feature in its out-of-vocabulary bucket, the history from the events. Events the
version's Feast rows already hold (logged before its data stage ran, and known before the test
period) are skipped by sequence, so none counts twice. Events keep ids
as clients sent them, so each served version encodes them with its own vocabulary
(``live_encoding.json`` in its Feast repository, written by the features stage).
"""

from __future__ import annotations

import json
from pathlib import Path

from twotower.store.events import LiveEvent, RedisLiveStore, SqliteLiveStore
from twotower.store.features import ENCODED_PREFIX, LIVE_ENCODING

UNKNOWN_ITEM = -1  # an event's item outside the data set: kept out of seen_items, history's unknown code


ENCODED_HISTORY = ENCODED_PREFIX + "history"


class LiveRows:
    def __init__(self, feature_repo: Path, store: SqliteLiveStore | RedisLiveStore, item_codes: dict[str, int] | None):
        encoding = json.loads((Path(feature_repo) / LIVE_ENCODING).read_text())
        self.history_length: int = encoding["history_length"]
        self.min_rating: float | None = encoding["min_rating"]
        self.history_code = dict(zip(encoding["history_items"], encoding["history_codes"]))
        self.unknown_item_code: int | None = encoding["unknown_item_code"]
        self.unknown_user: dict = encoding["unknown_user"]
        self.folded = frozenset(encoding["folded_sequences"])
        self.store = store
        self.item_codes = item_codes  # text item ids -> the recipe's int ids; None: events carry the int ids

    def _item(self, item_id: str) -> int:
        if self.item_codes is not None:
            return self.item_codes.get(item_id, UNKNOWN_ITEM)
        return int(item_id)

    def _positive(self, event: LiveEvent) -> bool:
        return self.min_rating is None or event.label is None or event.label >= self.min_rating

    def fold(self, user_keys: list[str], encoded_rows: list[dict | None], seen_rows: list[dict | None]) -> None:
        """Fold each user's live events into their rows (in place): ``encoded_rows`` of the query view,
        ``seen_rows`` holding ``seen_items``; ``user_keys``: the request's ids as text."""
        events = self.store.items_of(user_keys)
        for row, key in enumerate(user_keys):
            fresh = [event for event in events.get(key, []) if event.sequence not in self.folded]
            if not fresh:
                continue
            items = [self._item(event.item_id) for event in fresh]
            encoded = dict(encoded_rows[row] or self.unknown_user)
            earlier = (seen_rows[row] or {}).get("seen_items") or []
            seen = {"seen_items": [*earlier, *(item for item in items if item != UNKNOWN_ITEM)]}
            if self.history_length:
                positives = [item for item, event in zip(items, fresh) if self._positive(event)]
                codes = [self.history_code.get(item, self.unknown_item_code) for item in positives]
                encoded[ENCODED_HISTORY] = [*(encoded[ENCODED_HISTORY] or []), *codes][-self.history_length :]
            encoded_rows[row], seen_rows[row] = encoded, seen
