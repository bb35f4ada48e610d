"""Serving a trained model: `hmtrain export` (memory-mapped bank tables + anchor, tree, tokenizer) and
`hmtrain generate` (route a prompt, fetch its path's memory, continue it)."""
