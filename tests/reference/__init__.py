"""Independent ground-truth implementations used by the tests (no imports from `model`)."""
