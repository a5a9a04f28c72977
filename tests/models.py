"""Small models built in the tests (no downloads)."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=48, h=80):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    """Embedding -> two blocks -> tied lm_head: exercises skip lists, tied weights and 3-D inputs."""

    def __init__(self, vocab=37, d=48, h=80):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, h), Block(d, h)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return TinyNet().eval()


def calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 37, (2, 9), generator=g) for _ in range(n)]
