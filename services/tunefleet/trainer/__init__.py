"""The trainer: the program inside a training job (`python -m tunefleet.trainer --spec FILE`)."""
