"""The hospital: PQ-channel ingest service and the encrypted, hash-chained reading store."""
