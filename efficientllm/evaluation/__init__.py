"""Measuring a model: held-out perplexity, the lm-eval harness glue and the offline
``next_sentence`` task built from held-out text."""
