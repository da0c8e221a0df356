"""The meta-head: the policy's own pass-rate and length prediction from one hidden state.

Input h: the final hidden state (after the final norm) at the last prompt token of the solution
prompt, computed by the actor in a prompt-only forward before generation, on the last pipeline
stage. Output: a pass-rate probability p = sigmoid(w_p . h + b_p) and a log length
u = w_l . h + b_l of a correct solution.

Loss per step, on that step's observed statistics (empirical pass rate p_obs of the G solutions,
mean length of the correct ones, L_obs):

    loss = mean_q [ -p_obs log p - (1 - p_obs) log(1 - p) ]                  (soft cross-entropy)
         + mean_{q: some correct} Huber_delta(u - log L_obs)                 (masked when none)

Gating rule with the head: the chance that all G rollouts agree is p^G + (1-p)^G; cutoff is
margin * exp(u) (see policies.py). The head has its own Adam optimiser and is fitted on detached
hidden states. With `masa.head_loss_weight` w > 0 its loss also trains the backbone: the PPO
update minimises policy loss + w * loss(h), the head's parameters held constant there
(`JointHeadLoss`). It is saved in checkpoints and exported next to the HF weights as
`meta_head.safetensors` with tensors `pass_rate.weight [1, H]`, `pass_rate.bias [1]`,
`log_length.weight [1, H]`, `log_length.bias [1]` (fp32) and metadata {"hidden_size": H,
"format": "masa-meta-head-v1"}.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "meta_head.safetensors"
FORMAT = "masa-meta-head-v1"


class MetaHead(nn.Module):
    def __init__(self, hidden_size: int, init_log_length: float = math.log(256.0)):
        super().__init__()
        self.hidden_size = hidden_size
        self.pass_rate = nn.Linear(hidden_size, 1)
        self.log_length = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.pass_rate.weight)
        nn.init.zeros_(self.pass_rate.bias)
        nn.init.zeros_(self.log_length.weight)
        nn.init.constant_(self.log_length.bias, init_log_length)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, H] -> (p [N] in (0, 1), log length [N])."""
        hidden = hidden.float()
        return torch.sigmoid(self.pass_rate(hidden)).squeeze(-1), self.log_length(hidden).squeeze(-1)

    def row_losses(self, hidden: torch.Tensor, pass_rates: torch.Tensor, log_lengths: torch.Tensor,
                   huber_delta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row [N]: -p_obs log p - (1 - p_obs) log(1 - p), Huber_delta(u - log L_obs) (0 where
        log_lengths is not finite: no correct solution), and the pass-rate logit."""
        logit = self.pass_rate(hidden.float()).squeeze(-1)
        ce = F.binary_cross_entropy_with_logits(logit, pass_rates.float(), reduction="none")
        u = self.log_length(hidden.float()).squeeze(-1)
        has_len = torch.isfinite(log_lengths)
        target = torch.where(has_len, log_lengths.float(), u.detach())  # no NaN in the graph
        huber = F.huber_loss(u, target, delta=huber_delta, reduction="none")
        return ce, torch.where(has_len, huber, 0.0), logit

    def loss(self, hidden: torch.Tensor, pass_rates: torch.Tensor,
             mean_correct_lengths: torch.Tensor, huber_delta: float = 1.0) -> tuple[torch.Tensor, dict]:
        """pass_rates [N] in [0,1]; mean_correct_lengths [N] (NaN where no solution was correct)."""
        log_lengths = torch.log(mean_correct_lengths.float())  # NaN / -inf where none
        ce, huber, logit = self.row_losses(hidden, pass_rates, log_lengths, huber_delta)
        ce = ce.mean()
        huber = huber.sum() / torch.isfinite(log_lengths).sum().clamp_min(1)
        p = torch.sigmoid(logit.detach())
        return ce + huber, {"head/loss_ce": ce.item(), "head/loss_len": huber.item(),
                            "head/train_mae": (p - pass_rates).abs().mean().item()}


class JointHeadLoss:
    """The actor's `prompt_state_loss` for joint training (masa.head_loss_weight = w > 0).

    Rows i of a micro-batch: h_i the final hidden state at the last prompt token (with grad),
    targets (p_obs_i, log L_obs_i) of its problem, NaN where none (meta samples; no correct
    solution). With N_p, N_L the mini-batch's counts of each target (over DP):

        term = w * [ sum_i CE(p_obs_i, p(h_i)) / N_p + sum_i Huber(u(h_i) - log L_obs_i) / N_L ]

    Every solution group keeps its G samples, which share the prompt and so h, hence the term is w
    times `MetaHead.loss` over the mini-batch's problems. The head's parameters are constants here:
    the term trains the backbone, the head is fitted by its own optimiser.
    """

    def __init__(self, head: MetaHead, weight: float):
        self.head, self.weight = head, float(weight)

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor,
                 normalisers: torch.Tensor) -> torch.Tensor:
        head = copy.deepcopy(self.head).to(hidden.device).requires_grad_(False)
        pass_rates, log_lengths = targets[:, 0], targets[:, 1]
        has_rate = torch.isfinite(pass_rates)
        ce, huber, _ = head.row_losses(hidden, torch.where(has_rate, pass_rates, 0.0), log_lengths)
        ce = torch.where(has_rate, ce, 0.0)
        counts = normalisers.clamp_min(1)
        return self.weight * (ce.sum() / counts[0] + huber.sum() / counts[1])


def joint_targets(pass_rates, mean_correct_lengths) -> torch.Tensor:
    """[N, 2] (p_obs, log L_obs) rows for `JointHeadLoss`; None entries become NaN."""
    nan = float("nan")
    return torch.tensor([[nan if p is None else float(p),
                          nan if not n else math.log(n)]
                         for p, n in zip(pass_rates, mean_correct_lengths)],
                        dtype=torch.float32).reshape(-1, 2)


class MetaHeadTrainer:
    """The head, its optimiser, and the per-step update on detached hidden states.

    With `data_parallel_group`, every update fits the rows of all data-parallel ranks (gathered in
    rank order), so the head, its optimiser state and its metrics are the same on every rank."""

    def __init__(self, hidden_size: int, lr: float = 1e-3, steps_per_update: int = 20,
                 data_parallel_group=None):
        self.head = MetaHead(hidden_size)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.steps_per_update = steps_per_update
        self.data_parallel_group = data_parallel_group

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> list[tuple[float, float]]:
        p, u = self.head(hidden)
        return list(zip(p.tolist(), u.tolist()))

    def update(self, hidden: Optional[torch.Tensor], pass_rates: Sequence[float],
               mean_correct_lengths: Sequence[Optional[float]]) -> dict:
        """hidden [N, H] (None: no row on this rank; with a data-parallel group every rank calls
        this, with or without rows). Returns {} when no rank had a row."""
        if hidden is None:
            hidden, pass_rates, mean_correct_lengths = torch.zeros(0, self.head.hidden_size), [], []
        rows = torch.cat([hidden.detach().float(),
                          torch.tensor(list(pass_rates), dtype=torch.float32).reshape(-1, 1),
                          torch.tensor([float("nan") if v is None else float(v)
                                        for v in mean_correct_lengths],
                                       dtype=torch.float32).reshape(-1, 1)], dim=1)
        if self.data_parallel_group is not None:
            from masa_megatron.parallel import all_gather_rows
            rows = all_gather_rows(rows, self.data_parallel_group)
        if not len(rows):
            return {}
        hidden, target_p, target_l = rows[:, :-2], rows[:, -2], rows[:, -1]
        metrics: dict = {}
        for _ in range(self.steps_per_update):
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self.head.loss(hidden, target_p, target_l)
            loss.backward()
            self.optimizer.step()
        metrics["head/loss"] = metrics["head/loss_ce"] + metrics["head/loss_len"]
        return metrics

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def export_meta_head(head: MetaHead, folder: str | Path) -> Path:
    from safetensors.torch import save_file
    path = Path(folder) / HEAD_FILE
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"hidden_size": str(head.hidden_size), "format": FORMAT})
    return path


def load_meta_head(folder: str | Path) -> MetaHead:
    from safetensors import safe_open
    path = Path(folder) / HEAD_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (metadata {meta})")
        head = MetaHead(int(meta["hidden_size"]))
        head.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return head
