"""Token-budget policy: cheap state features -> a categorical over the budget set, plus a value.

The features must not need the audio encoder's output, else skipping audio saves nothing.
Stage B trains it (policy gradient with this value as baseline); Stage C distils it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.distributions import Categorical


@dataclass
class PolicyActions:
    """One decision per example. ``budgets`` are token counts; ``actions`` index the budget set."""

    actions: torch.Tensor  # (B,) long, index into token_budgets
    budgets: torch.Tensor  # (B,) long, the chosen number of audio tokens (0 = skip audio)
    log_probs: torch.Tensor  # (B,) log pi(action | state), for the chosen action whatever it is
    values: torch.Tensor  # (B,) value baseline
    entropy: torch.Tensor  # (B,)


class AudioPolicyNetwork(nn.Module):
    def __init__(self, state_feature_dim: int, token_budgets: Sequence[int] = (0, 4, 8, 12), hidden_size: int = 64):
        super().__init__()
        budgets = sorted(int(b) for b in token_budgets)
        if 0 not in budgets or len(set(budgets)) != len(budgets):
            raise ValueError(f"token_budgets must be unique and contain 0, got {list(token_budgets)}")
        self.state_feature_dim = state_feature_dim
        self.register_buffer("token_budgets", torch.tensor(budgets, dtype=torch.long), persistent=False)
        self.trunk = nn.Sequential(
            nn.LayerNorm(state_feature_dim),
            nn.Linear(state_feature_dim, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
        )
        self.policy_head = nn.Linear(hidden_size, len(budgets))
        self.value_head = nn.Linear(hidden_size, 1)

    def forward(self, state_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the budget set (B, n_budgets) and values (B,)."""
        hidden = self.trunk(state_features)
        return self.policy_head(hidden), self.value_head(hidden).squeeze(-1)

    def get_actions(
        self,
        state_features: torch.Tensor,
        deterministic: bool = False,
        actions: Optional[torch.Tensor] = None,
        has_audio: Optional[torch.Tensor] = None,
    ) -> PolicyActions:
        """Sample (or take the argmax of, or score given) actions for a batch of states.

        ``has_audio`` (B,) bool: rows without a clip can only take budget 0, and their
        distribution says so (probability 1, log-probability 0), so skipped rows never carry a
        wrong log-probability into the policy gradient.
        """
        logits, values = self(state_features)
        if has_audio is not None:
            no_clip = ~has_audio.to(logits.device).bool()
            positive = (self.token_budgets > 0)[None, :]
            # The dtype's most negative number, not -inf: softmax gives exactly 0 and entropy stays finite.
            logits = logits.masked_fill(no_clip[:, None] & positive, torch.finfo(logits.dtype).min)
        distribution = Categorical(logits=logits)
        if actions is None:
            actions = logits.argmax(-1) if deterministic else distribution.sample()
        return PolicyActions(
            actions=actions,
            budgets=self.token_budgets[actions],
            log_probs=distribution.log_prob(actions),
            values=values,
            entropy=distribution.entropy(),
        )
