"""Rollout engines: turn prompt token ids into sampled completions with their log-probs.

`base` holds the engine interface, the request/result types and the engine registry;
`embedded` is the engine that generates with the trainer's own (sharded) Megatron model;
`sampling` is the logits processing that every engine and the actor agree on.
"""
