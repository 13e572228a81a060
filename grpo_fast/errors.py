"""The error that stops a run that went wrong while training (import-light: the command line
catches it without loading torch or transformers).

`ConfigError` (config.py) and `DataError` (data.py) are the errors of bad input, raised before
training starts; `TrainingStopped` is raised during training, naming the step.
"""


class TrainingStopped(RuntimeError):
    """A run stopped for a reason the user must act on (non-finite numbers, a reward function
    returning something unusable); the message names the step. The command line prints it as
    one line and exits with status 1."""
