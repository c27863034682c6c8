"""Token-matched quality benchmark: does pruning-aware pretraining beat its alternatives?

    python -m bench.quality --scale cpu     # ~1 hour on 2 cores
    python -m bench.quality --scale gpu     # one H200, ~10 minutes

Four arms at the same final parameter count, the same data and order, the same training tokens
and the same evaluation (see arms.py). Writes results.json / results.md / perplexity.{html,png}.
"""
