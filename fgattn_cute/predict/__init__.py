"""Training-free predictors that return a ``KeyIndex`` (``calibrate``, ``pooled_top_p``): not
written yet."""
