"""poisonaudit benchmarks: `python -m bench [NAME ...]` (ratios measured side by side in one run)."""
