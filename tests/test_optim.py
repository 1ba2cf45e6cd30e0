"""nvae_core's Adamax against torch.optim.Adamax, and its state round trip."""
import copy

import torch

from nvae_core.optim import Adamax


def _run(make_optimizer, steps=6, scaler=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    optimizer = make_optimizer(model.parameters())
    data = torch.randn(steps, 16, 5)
    for x in data:
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return model, optimizer


def test_matches_torch_adamax_with_weight_decay():
    """Same parameters as torch.optim.Adamax after several steps with weight decay and large eps."""
    kwargs = dict(lr=1e-2, eps=1e-3, weight_decay=3e-4)
    ours, _ = _run(lambda p: Adamax(p, **kwargs))
    theirs, _ = _run(lambda p: torch.optim.Adamax(p, **kwargs))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_works_under_an_enabled_grad_scaler():
    """GradScaler unscales our param groups and steps us like a torch optimizer."""
    kwargs = dict(lr=1e-2, eps=1e-3)
    ours, _ = _run(lambda p: Adamax(p, **kwargs), scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    theirs, _ = _run(lambda p: torch.optim.Adamax(p, **kwargs))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    """Saving, loading into a fresh optimizer and stepping on gives the same parameters."""
    model, optimizer = _run(lambda p: Adamax(p, lr=1e-2, eps=1e-3), steps=3)
    twin = copy.deepcopy(model)
    restored = Adamax(twin.parameters(), lr=0.5, eps=1e-3)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert restored.param_groups[0]["lr"] == 1e-2
    x = torch.randn(16, 5)
    for m, opt in ((model, optimizer), (twin, restored)):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
