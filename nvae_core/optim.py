"""Adamax exactly as torch.optim.Adamax computes it, without torch.optim's machinery.

Constructing any torch.optim optimizer imports torch._dynamo (about 150 MB of resident memory with
the PyPI build), a tenth of a small model's CPU training budget; the update is a few tensor ops.
The object quacks like a torch optimizer where TrainStep, GradScaler and checkpoints need it.
"""
import torch


class Adamax:
    """Adamax with L2 weight decay: m = lerp(m, g, 1 - b1); u = max(b2 u, |g| + eps);
    p -= lr / (1 - b1^t) * m / u."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.param_groups = [{"params": list(params), "lr": lr, "betas": betas, "eps": eps,
                              "weight_decay": weight_decay}]
        # State made now, not at the first step, so it sits below the activations in the heap.
        self.state = {}
        for p in self.param_groups[0]["params"]:
            self._state(p)

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            states = [self._state(p) for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_infs = [s["exp_inf"] for s in states]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_infs, beta2)
            abs_grads = torch._foreach_abs(grads)
            torch._foreach_add_(abs_grads, group["eps"])
            torch._foreach_maximum_(exp_infs, abs_grads)
            steps = []
            for s in states:
                s["step"] += 1
                steps.append(-group["lr"] / (1 - beta1 ** s["step"]))
            torch._foreach_addcdiv_(params, exp_avgs, exp_infs, steps)

    def _state(self, p):
        if p not in self.state:
            self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_inf": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[p]

    def state_dict(self):
        """Like torch's: per-parameter state keyed by the parameter's index, and the groups."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict):
        params = [p for g in self.param_groups for p in g["params"]]
        if len(state_dict["param_groups"]) != len(self.param_groups) or \
                sum(len(g["params"]) for g in state_dict["param_groups"]) != len(params):
            raise ValueError("optimizer state does not match this model's parameters")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {"step": int(s["step"]), "exp_avg": s["exp_avg"].to(p.device),
                             "exp_inf": s["exp_inf"].to(p.device)}
