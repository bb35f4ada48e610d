"""What a prepared directory holds on disk and how it is read: shards, manifest, sequence index."""
