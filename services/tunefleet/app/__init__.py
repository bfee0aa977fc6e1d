"""The top package: the services put on servers and assembled into a process. Nothing in
tunefleet imports it but the `tunefleet serve` command."""
