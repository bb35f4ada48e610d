"""Evaluation of trained checkpoints: held-out perplexity, long-tail probes and routing agreement, memory-model
scores, deep routing, and the results tables (`hmtrain eval`)."""
