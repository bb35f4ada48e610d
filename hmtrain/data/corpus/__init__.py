"""Where documents come from: readers (documents.py), importers (import_dictd.py), the synthetic corpus."""
