"""The OpenAI-compatible HTTP front: `/v1/models`, chat and text completions (with prompt
log-probabilities), files and fine-tuning jobs in OpenAI's shapes, each handler a translation onto
the tunefleet SDK's `AsyncClient`. It holds no state and no logic of its own: every answer comes
from the gRPC services, and every refusal is theirs in OpenAI's error envelope."""
