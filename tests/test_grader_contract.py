"""What graders run on the model: the textbook PGD steps on its input gradient, in both input layouts.

A grader loads the model the platform's way (`Net().load_for_testing()`, which leaves it channels_last)
and attacks it through its own gradients. The textbook L2 step flattens the gradient with `.view`, which
fails on a gradient whose strides are not those of a contiguous tensor; so the gradient must come back in
the input's own layout, contiguous in it.
"""
import pytest
import torch
import torch.nn.functional as F

import model as M

LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
EPS_LINF, EPS_L2 = 8 / 255, 0.5


@pytest.fixture(scope="module")
def committed(repo_root):
    return M.Net().load_for_testing(project_dir=str(repo_root))


@pytest.fixture
def tiny_channels_last(tiny_trained):
    return tiny_trained.to(memory_format=torch.channels_last).eval()


def _images(val_set, layout, n=6):
    x = (val_set[0][:n].float() / 255).contiguous(memory_format=LAYOUTS[layout])
    return x, val_set[1][:n]


def _assert_layout(grad, x):
    assert grad.shape == x.shape and grad.stride() == x.stride(), (grad.stride(), x.stride())


def _layout_of(x):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _l2_step(model, x, y):
    """torchattacks' PGDL2 step, `.view` included (it crashed on a channels_last gradient)."""
    n = len(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=_layout_of(x))
    x_adv = (x + 0.01 * noise).clamp(0, 1).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    _assert_layout(grad, x_adv)
    # .view(n, -1) works on an NCHW-contiguous gradient only; on channels_last images it fails for any model
    # (the images themselves cannot be viewed so), and a grader feeding those flattens with reshape
    flat = grad.view(n, -1) if _layout_of(x) == torch.contiguous_format else grad.reshape(n, -1)
    grad_norms = torch.norm(flat, p=2, dim=1) + 1e-10
    x_adv = x_adv.detach() + 0.125 * grad / grad_norms.view(n, 1, 1, 1)
    delta = x_adv - x
    factor = (EPS_L2 / delta.reshape(n, -1).norm(p=2, dim=1)).clamp(max=1.0)
    return (x + delta * factor.view(n, 1, 1, 1)).clamp(0, 1)


def _linf_step(model, x, y):
    x_adv = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    _assert_layout(grad, x)
    return (x + (x_adv.detach() + 2 / 255 * grad.sign() - x).clamp(-EPS_LINF, EPS_LINF)).clamp(0, 1)


def _backward_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    _assert_layout(x.grad, x)
    assert float(x.grad.abs().sum()) > 0
    return x.grad


def _contract(model, x, y):
    l2 = _l2_step(model, x, y)
    assert float((l2 - x).flatten(1).norm(dim=1).max()) <= EPS_L2 + 1e-5 and float(l2.min()) >= 0
    linf = _linf_step(model, x, y)
    assert float((linf - x).abs().max()) <= EPS_LINF + 1e-6 and float(linf.max()) <= 1
    _backward_grad(model, x, y)
    with torch.no_grad():
        assert model(x).shape == (len(x), 10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_committed_model_takes_the_graders_steps(committed, val_set, layout):
    x, y = _images(val_set, layout)
    _contract(committed, x, y)
    committed.zero_grad(set_to_none=True)
    with M.bpda(committed):              # the same under straight-through gradients
        _linf_step(committed, x, y)
        _l2_step(committed, x, y)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_channels_last_model_takes_the_graders_steps(tiny_channels_last, val_set, layout):
    x, y = _images(val_set, layout, n=80)          # more than a CPU chunk: the split path too
    _contract(tiny_channels_last, x, y)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_layout_in_train_mode_and_for_an_nchw_model(tiny_trained, val_set, layout):
    x, y = _images(val_set, layout, n=8)
    _backward_grad(tiny_trained.train(), x, y)                      # NCHW weights
    _backward_grad(tiny_trained.to(memory_format=torch.channels_last).train(), x, y)


def test_the_layout_does_not_change_the_logits_or_the_gradient(tiny_channels_last, val_set):
    x, y = _images(val_set, "NCHW", n=8)
    grads = {}
    for name, layout in LAYOUTS.items():
        xl = x.contiguous(memory_format=layout).requires_grad_(True)
        logits = tiny_channels_last(xl)
        grads[name], = torch.autograd.grad(F.cross_entropy(logits, y), xl)
    assert torch.equal(grads["NCHW"], grads["channels_last"].contiguous())
