"""A slow, literal float64 transcription of TAM / AdaTAM / AdaTAMW (arXiv:2412.18790, the update rule in tam.py's
module docstring), used only by the tests.

It shares no code with ``tam.py`` on purpose: one loop per step, one line per equation, Python floats for
the per-tensor scalars, so a mistake in the fast paths cannot hide in a helper both of them call.
"""

from __future__ import annotations

import math

import torch


class ReferenceTorque:
    """Holds float64 copies of the parameters and their state; ``step(grads)`` applies one update.

    ``adaptive=False`` is TAM (``beta1`` is the momentum), ``adaptive=True`` AdaTAM, and with
    ``decoupled=True`` AdaTAMW. A ``None`` gradient skips that tensor (state untouched; under the global
    scope its ``s`` follows the group's).
    """

    def __init__(self, params, *, adaptive, lr, beta1, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=False, maximize=False, decay_rate=0.9, damping_eps=1e-8, cosine_scope="tensor",
                 fixed_damping=None, bias_correction=False):
        self.params = [p.detach().clone().double() for p in params]
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)
        self.s = [None] * len(self.params)
        self.adaptive, self.lr, self.beta1, self.beta2, self.eps = adaptive, lr, beta1, beta2, eps
        self.weight_decay, self.decoupled, self.maximize = weight_decay, decoupled, maximize
        self.gamma, self.damping_eps, self.scope = decay_rate, damping_eps, cosine_scope
        self.fixed_damping = fixed_damping
        self.bias_correction = bias_correction
        self.t = [0] * len(self.params)

    def step(self, grads):
        active = [i for i, g in enumerate(grads) if g is not None]
        g = {}
        for i in active:
            gi = grads[i].detach().double()
            if self.maximize:
                gi = -gi
            if self.weight_decay != 0.0 and not self.decoupled:
                gi = gi + self.weight_decay * self.params[i]
            g[i] = gi
            if self.m[i] is None:
                self.m[i] = torch.zeros_like(self.params[i])
                self.v[i] = torch.zeros_like(self.params[i])
                existing = [x for x in self.s if x is not None]
                self.s[i] = existing[0] if (self.scope == "global" and existing) else 0.0

        if self.fixed_damping is not None:
            for i in active:
                self.s[i] = 2.0 * self.fixed_damping - 1.0
        elif self.scope == "global":
            dot = sum(float((self.m[i] * g[i]).sum()) for i in active)
            norm_m = math.sqrt(sum(float((self.m[i] * self.m[i]).sum()) for i in active))
            norm_g = math.sqrt(sum(float((g[i] * g[i]).sum()) for i in active))
            c = self._cosine(dot, norm_m, norm_g)
            s_prev = next(x for x in self.s if x is not None)
            s_new = self.gamma * s_prev + (1.0 - self.gamma) * c
            self.s = [s_new if x is not None else None for x in self.s]
        else:
            for i in active:
                dot = float((self.m[i] * g[i]).sum())
                norm_m = math.sqrt(float((self.m[i] * self.m[i]).sum()))
                norm_g = math.sqrt(float((g[i] * g[i]).sum()))
                c = self._cosine(dot, norm_m, norm_g)
                self.s[i] = self.gamma * self.s[i] + (1.0 - self.gamma) * c

        for i in active:
            d = (1.0 + self.s[i]) / 2.0
            self.m[i] = self.beta1 * self.m[i] + (d + self.damping_eps) * g[i]
            if not self.adaptive:
                self.params[i] = self.params[i] - self.lr * self.m[i]
                continue
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * g[i] * g[i]
            self.t[i] += 1
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bias_correction:
                m_hat = m_hat / (1.0 - self.beta1 ** self.t[i])
                v_hat = v_hat / (1.0 - self.beta2 ** self.t[i])
            p = self.params[i]
            if self.decoupled:
                p = p * (1.0 - self.lr * self.weight_decay)
            self.params[i] = p - self.lr * m_hat / (torch.sqrt(v_hat) + self.eps)

    @staticmethod
    def _cosine(dot, norm_m, norm_g):
        if norm_m == 0.0 or norm_g == 0.0:
            return 0.0
        c = dot / (norm_m * norm_g)
        return max(-1.0, min(1.0, c)) if math.isfinite(c) else 0.0

    def damping(self):
        return [None if x is None else (1.0 + x) / 2.0 for x in self.s]
