"""One WGAN-GP critic step (Gulrajani et al., 2017) on the digits: the Wasserstein
critic loss plus the gradient penalty, whose gradient needs a second derivative.

    python examples/gradient_penalty.py

For real images x and generated ones x~, at random points x^ between them the critic's
gradient with respect to its input should have norm 1:

    loss = D(x~).mean() - D(x).mean() + 10 * ((||dD(x^)/dx^||_2 - 1)^2).mean()

The penalty's gradient with respect to the critic's weights differentiates
dD(x^)/dx^ once more: ``md.grad(..., create_graph=True)`` keeps that gradient as a graph.
The critic has no batch norm, as the paper advises (it would couple the samples' gradients).
"""
import argparse

import numpy as np

import minidense as md
from minidense import nn


class Critic(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(2 * channels, 1)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(md.global_avg_pool2d(x))


def critic_loss(critic, real, fake, penalty_weight=10.0, rng=None):
    """(loss, penalty) of one WGAN-GP critic step."""
    rng = rng or np.random.default_rng(0)
    eps = md.tensor(rng.uniform(size=(len(real), 1, 1, 1)).astype(real.dtype))
    between = (eps * real + (1 - eps) * fake).detach().requires_grad_()
    (g,) = md.grad(critic(between).sum(), [between], create_graph=True)
    norms = ((g * g).reshape(len(real), -1).sum(axis=1) + 1e-12) ** 0.5
    penalty = ((norms - 1) ** 2).mean()
    wasserstein = critic(fake).mean() - critic(real).mean()
    return wasserstein + penalty_weight * penalty, penalty


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=16, help="image side (the 8x8 digits, upsampled)")
    args = parser.parse_args(argv)
    md.manual_seed(0)
    rng = np.random.default_rng(0)
    digits = md.data.Digits(size=args.size)
    critic = Critic()
    optimizer = md.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for step in range(args.steps):
        pick = rng.choice(len(digits.images), args.batch_size, replace=False)
        real = md.tensor(digits.images[pick, :, :, :1].transpose(0, 3, 1, 2) / 255.0, dtype=np.float32)
        fake = md.tensor(rng.uniform(size=real.shape).astype(np.float32))   # a generator's output
        loss, penalty = critic_loss(critic, real, fake, rng=rng)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}: critic loss {loss.item():.4f}, gradient penalty {penalty.item():.4f}")


if __name__ == "__main__":
    main()
