"""Two-tower retrieval on NVIDIA Merlin: data to a served top-k endpoint."""
