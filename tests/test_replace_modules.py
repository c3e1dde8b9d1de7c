import copy

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


def test_replace_modules_swaps_conv_norms_and_attention():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(2, 8),
                                torch.nn.Flatten(2), torch.nn.BatchNorm1d(8))
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    twin, twin_mha = copy.deepcopy(model), copy.deepcopy(mha)
    fusedstab.nn.replace_modules(model)
    fusedstab.nn.replace_modules(mha)
    assert [type(m) for m in model] == [torch.nn.Conv2d, fusedstab.nn.BatchNorm2d, fusedstab.nn.GroupNorm,
                                        torch.nn.Flatten, fusedstab.nn.BatchNorm1d]
    assert type(mha) is fusedstab.nn.MultiheadAttention
    assert model[1].activation is None and repr(model) == repr(twin)
    for _ in range(2):  # training steps: outputs and running statistics as torch's
        x, s = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 16)
        torch.testing.assert_close(model(x), twin(x))
        torch.testing.assert_close(mha(s, s, s, need_weights=False)[0], twin_mha(s, s, s, need_weights=False)[0])
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
