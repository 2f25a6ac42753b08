"""The multi-task training programs' library (datasets, metrics, ...)."""
