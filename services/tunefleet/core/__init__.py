"""The low package: what every part of tunefleet may import and which imports none of them:
errors, resource names, adapter kinds per engine, small protobuf and asyncio helpers."""
