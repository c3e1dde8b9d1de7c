"""Backward runs on the backend chosen when forward ran, wherever backward() is called."""
import threading

import torch

import fusedstab
from fusedstab import backend


def _spy(monkeypatch, op, name):
    calls = []
    impl, ok = backend._impls[op][name]

    def spy(*args):
        calls.append(threading.get_ident())
        return impl(*args)

    monkeypatch.setitem(backend._impls[op], name, (spy, ok))
    return calls


def test_backward_outside_use_backend_block_keeps_forward_choice(monkeypatch):
    calls = _spy(monkeypatch, "layer_norm_bwd", "triton")
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(10, requires_grad=True)
    with fusedstab.use_backend("triton"):
        y = fusedstab.functional.layer_norm(x, (10,), w)
    with fusedstab.use_backend("torch"):  # a different choice is active when backward runs
        (y * torch.randn_like(y)).sum().backward()
    assert len(calls) == 1


def test_backward_on_another_thread_keeps_forward_choice(monkeypatch):
    calls = _spy(monkeypatch, "layer_norm_bwd", "triton")
    x = torch.randn(3, 5, requires_grad=True)
    with fusedstab.use_backend("triton"):
        y = fusedstab.functional.rms_norm(x, (5,))
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join()
    assert len(calls) == 1 and calls[0] != threading.get_ident()
    assert x.grad is not None
