"""Hadamard matrices of the widths Llama-family models use, and the transform x -> x @ H.T / sqrt(n).

A width n = m * 2^k gets H = H_m (x) H_{2^k}: Sylvester's construction for the power of two and Paley's
construction for m = q + 1, q a prime = 3 (mod 4) (12, 20, 24, 44, 48, 72, ...): 576 = 72 x 8,
1536 = 12 x 128, 3072 = 12 x 256, 5632 = 44 x 128; powers of two need no Paley factor."""

from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 (mod 4) (Paley's first construction)."""
    squares = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    jacobsthal = torch.where(diff == 0, 0.0, torch.where(
        torch.tensor([d in squares for d in range(q)])[diff], 1.0, -1.0))
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1)


def factor(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and H_m buildable (m = 1 or a Paley order); None if none."""
    p = 1 << ((n & -n).bit_length() - 1)  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m, p
        p //= 2
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix [n, n] (H @ H.T = n I), or None if this construction has none of order n."""
    f = factor(n)
    if f is None:
        return None
    m, p = f
    return sylvester(p) if m == 1 else torch.kron(paley(m - 1), sylvester(p))


def has_hadamard(n: int) -> bool:
    return factor(n) is not None


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x @ H.T / sqrt(n) for H = hadamard_matrix(n), in O(n log n + n m) per row."""
    n = x.shape[-1]
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} from the Sylvester/Paley constructions")
    m, p = f
    shape = x.shape
    y = x.reshape(-1, m, p)
    h = 1
    while h < p:  # Sylvester butterflies along the power-of-two axis
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("ab,rbp->rap", paley(m - 1).to(y.dtype).to(y.device), y)
    return (y / n ** 0.5).reshape(shape)


def random_hadamard(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """An orthogonal [n, n] matrix H diag(s) / sqrt(n) with random signs s (QuaRot / SpinQuant init)."""
    h = hadamard_matrix(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n}")
    signs = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    return h.to(dtype) * signs[None, :] / n ** 0.5
