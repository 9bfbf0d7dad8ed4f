"""What a run writes and every part reads: atomic writes and locks (``atomic``), the run's
ledger and the checks that its parts match (``manifest``), the saved tables, splits, item vectors
and tower signatures (``artifacts``), the Feast repository's online side (``features``) and the
saved FAISS index with its search (``index``). Nothing here imports the stages, models or
serving: they all read the run through it.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "artifacts": [
            "EXTERNAL_ID",
            "DataError",
            "RecipeData",
            "Split",
            "SPLITS",
            "load_recipe_data",
            "load_split",
            "known_before_test",
            "has_text_ids",
            "model_features",
            "display_column",
            "category_feature",
            "item_names",
            "save_item_vectors",
            "load_item_vectors",
            "ServingSignature",
            "call_signature",
        ],
        "atomic": ["atomic_dir", "atomic_file", "staging_dir", "exclusive_lock"],
        "manifest": [
            "ArtifactMismatch",
            "read_manifest",
            "fingerprint",
            "check_export",
            "check_prerank",
            "recorded_stage",
        ],
        "features": [
            "USER_VIEW",
            "QUERY_VIEW",
            "ITEM_VIEW",
            "ENCODED_PREFIX",
            "OnlineReader",
            "online_user_features",
            "served_copy",
        ],
        "index": ["ItemIndex", "load_index", "save_index", "add_items"],
    },
)
