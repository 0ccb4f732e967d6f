"""On-disk formats sensq writes and reads (probe HDF5; later rankings, plans, checkpoints)."""
