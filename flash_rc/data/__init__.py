"""Data: the problem reader (``problems.py``) and data prep, local datasets -> verl-schema RL parquet files
(``flash-rc data``, see ``cli.py``)."""
