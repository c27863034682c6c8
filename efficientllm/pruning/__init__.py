"""What to remove and how: groups of coupled slices, the budget and its plan, saliency scores,
the decision, physical removal, compensation, and the one-shot baseline.

Torch-free at import: ``groups`` and ``budget`` are pure Python, so the app can plan a budget
without loading torch.
"""
