"""Data layer: canonical schema, sharded Parquet store, synthetic world, real-log adapters."""
