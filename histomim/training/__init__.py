"""The training loops that ``scripts/`` call, with shared Accelerate helpers."""
