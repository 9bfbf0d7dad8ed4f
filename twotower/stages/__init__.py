"""The recipe's stages, each a module: ``data`` (load and split through the declared schema),
``workflow`` (NVTabular), ``train``, ``evaluate`` (whole-catalogue metrics), ``baselines``
(popularity, EASE), ``index`` (FAISS kinds built and chosen by measured recall) and ``features``
(the Feast store built and materialized). ``twotower.pipeline`` wires them; each reads its
inputs through ``twotower.store``.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "data": ["load_dataset", "movielens_dir", "make_synthetic", "from_frames", "positives", "split_by_time"],
        "workflow": [
            "build_workflow",
            "fit_workflow",
            "load_workflow",
            "load_saved_workflows",
            "category_table",
            "encoded_catalogue",
            "encode_users",
            "encoded_users",
        ],
        "train": [
            "TrainingInputs",
            "load_training_inputs",
            "build_model",
            "fit_model",
            "evaluate_on_test",
            "save_training",
            "train_and_save",
        ],
        "evaluate": [
            "RECALL_KS",
            "EvalSet",
            "build_eval_set",
            "ranking_metrics",
            "evaluate_embeddings",
            "saved_query_vectors",
        ],
        "baselines": ["evaluate_popularity", "evaluate_ease"],
        "index": ["build_index", "exact_search", "overlap_at_k"],
        "features": ["TEMPLATE_DIR", "DEFINITION_FILES", "feature_tables", "build_feature_store"],
    },
)
