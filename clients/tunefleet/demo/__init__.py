"""`make demo`: the end-to-end tour of tunefleet on one machine (see `tour`)."""
