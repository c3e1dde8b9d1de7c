import torch

import fusedstab


def test_replace_modules_swaps_norms_and_keeps_numbers():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.RMSNorm(16, eps=1e-6)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 8)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fusedstab.nn.replace_modules(model) is model
    assert type(model[1]) is fusedstab.nn.LayerNorm
    assert type(model[3][1]) is fusedstab.nn.RMSNorm
    assert type(model[0]) is torch.nn.Linear
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert model[1].weight.grad is not None and model[3][1].weight.grad is not None
