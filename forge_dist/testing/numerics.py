"""Numerical test helpers shared by the test suites."""
import torch


def gradcheck_module(module, x, eps: float = 1e-6, atol: float = 1e-5) -> bool:
    """torch.autograd.gradcheck in float64 over the input and every parameter of ``module``."""
    names, params = zip(*[(n, p.detach().double().requires_grad_()) for n, p in module.named_parameters()])

    def f(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    return torch.autograd.gradcheck(f, (x.double().requires_grad_(), *params), eps=eps, atol=atol)
