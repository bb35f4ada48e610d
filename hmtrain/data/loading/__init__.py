"""Train-time reading: the step loader, the stream order, batches and their labels."""
