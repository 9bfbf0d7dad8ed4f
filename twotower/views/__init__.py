"""What people look at: figures (``plots``) and tables and summaries (``explore``) that the
notebooks and the benchmarks share.
"""

from twotower.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "plots": ["plot_training", "plot_data_overview", "plot_projection"],
        "explore": [
            "head_lines",
            "dataset_summary",
            "schema_table",
            "most_specific_category",
            "pca_2d",
            "find_items",
            "similar_items",
            "directory_tree",
        ],
    },
)
