"""What only the benchmarks use: the public NVIDIA example's serving graph to compare against
(``reference_graph``), the recipe's model in plain tf.keras (``plain_keras``) and an owned
``redis-server`` (``redis_server``).
"""
