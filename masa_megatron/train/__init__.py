"""Training: the Megatron actor (log-probs, PPO update, supervised step), batching, optimizer and
LR schedule, checkpoints, and the RL loop.

- `actor.Actor`: log-probs / update / sft_step / prompt_last_hidden through Megatron's
  forward_backward_func at any TP/PP/DP layout.
- `batching`: the TrainBatch format; data-parallel split (groups whole), mini- and micro-batches.
- `optim`: Megatron DDP, optimizer, LR schedule and their dist checkpoints.
- `checkpoint`, `loop`, `main`: checkpoint folders, the RL loop and the `masa train` entry.
"""
