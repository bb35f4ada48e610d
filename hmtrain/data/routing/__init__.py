"""Routing documents to tree paths: embedders, hierarchical k-means, the tree."""
