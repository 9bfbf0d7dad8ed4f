"""The serving graph's operators, one module per family: ``features`` (Feast lookup),
``query_tower`` (the SavedModel), ``retrieval`` (FAISS top-k, multi-vector retrieval) and
``prerank`` (the cascade's pre-ranking stage), over ``base`` (what they share).
"""
