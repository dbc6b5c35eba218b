"""The drop-in promise: a DQN written in CleanRL's shape (its dqn.py, shortened) gets Hare & Tortoise,
ReDo and lifecycle layers from the lines the diff in docs/interventions.md adds, and each of them acts."""

import copy
import random
import re

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from conftest import ROOT
from torch import nn

from rlplastic.interventions import HareTortoise, Interventions, ReDo, lifecycle_metrics, swap_in_lifecycle


class QNetwork(nn.Module):
    def __init__(self, env):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(np.array(env.single_observation_space.shape).prod(), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, env.single_action_space.n),
        )

    def forward(self, x):
        return self.network(x)


class _Scalars:
    """Stands in for tensorboard's SummaryWriter: keeps what add_scalars receives."""

    def __init__(self):
        self.logged = []

    def add_scalars(self, tag: str, values: dict, step: int) -> None:
        self.logged.append((tag, dict(values), step))


def linear_schedule(start_e: float, end_e: float, duration: int, t: int):
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def cleanrl_dqn(total_timesteps=600, learning_starts=100, seed=1):
    """CleanRL's dqn.py loop (its replay buffer replaced by a list): with the docs' added lines."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
    writer = _Scalars()
    q_network = QNetwork(envs)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=2.5e-4)
    swap_in_lifecycle(q_network, optimizer=optimizer, lifespan=(50, 100), recovery=(10, 20))  # + lifecycle layers
    target_network = copy.deepcopy(q_network)  # + the same layers, lifecycle buffers included
    buffer = []
    interventions = Interventions([  # + Hare & Tortoise (the target is the tortoise) and ReDo
        HareTortoise(hare=q_network, tortoise=target_network, momentum=0.99, reset_every=100),
        ReDo(q_network, optimizer, batch_fn=lambda: torch.tensor(np.array([b[0] for b in buffer[-256:]])), every=50),
    ])  # fmt: skip

    obs, _ = envs.reset(seed=seed)
    for global_step in range(total_timesteps):
        epsilon = linear_schedule(1.0, 0.05, 0.5 * total_timesteps, global_step)
        if random.random() < epsilon:
            actions = np.array([envs.single_action_space.sample() for _ in range(envs.num_envs)])
        else:
            q_values = q_network(torch.Tensor(obs))
            actions = torch.argmax(q_values, dim=1).cpu().numpy()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        real_next_obs = next_obs.copy()
        buffer.append((obs[0], real_next_obs[0], actions[0], rewards[0], terminations[0]))
        obs = next_obs
        if global_step > learning_starts:
            batch = random.sample(buffer, 32)
            b_obs, b_next, b_act, b_rew, b_done = (torch.tensor(np.array(x)) for x in zip(*batch, strict=True))
            with torch.no_grad():
                target_max, _ = target_network(b_next).max(dim=1)
                td_target = b_rew.float() + 0.99 * target_max * (1 - b_done.float())
            old_val = q_network(b_obs).gather(1, b_act[:, None]).squeeze()
            loss = F.mse_loss(td_target, old_val)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            interventions.step()  # + after every optimizer step (the EMA target update included)
            writer.add_scalars("interventions", interventions.metrics() | lifecycle_metrics(q_network), global_step)
    envs.close()
    return q_network, interventions, loss, writer


def test_the_readme_diff_adds_three_interventions_to_cleanrl_dqn_and_each_acts():
    q_network, interventions, loss, writer = cleanrl_dqn()
    hare_tortoise, redo = interventions
    assert hare_tortoise.resets == 4  # 498 updates, a reset every 100
    assert len(redo.recycled) == 9  # scored every 50 updates
    assert lifecycle_metrics(q_network)["lifecycle/dead"] > 0 or any(
        (m.life < m.lifespan).any() for m in q_network.modules() if hasattr(m, "lifecycle_step")
    )  # the clock ran: once per optimizer step
    lifecycle_layers = [m for m in q_network.modules() if hasattr(m, "lifecycle_step")]
    assert len(lifecycle_layers) == 2 and all(int((m.lifespan - m.life).max()) > 0 for m in lifecycle_layers)
    assert torch.isfinite(loss)
    last = writer.logged[-1][1]  # the activity users look at first
    assert last["hare_tortoise/resets"] == 4 and "re_do/recycled" in last and "lifecycle/dead" in last
    # the docs' diff adds exactly these lines
    section = (ROOT / "docs" / "interventions.md").read_text().split("### The diff for a CleanRL DQN", 1)[1]
    diff = re.search(r"```diff\n(.*?)```", section, re.S).group(1)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and line[1:].strip()]
    source = (ROOT / "tests" / "test_cleanrl_dropin.py").read_text()
    missing = [line for line in added if line not in source]
    assert added and not missing, missing
