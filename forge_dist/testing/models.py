"""Tiny models and batches shared by the test suites (checkpoint and conversion tests)."""
import torch

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)


def make_model(seed: int = 0, **extra):
    """A tiny GPT in eval mode whose norms, offsets and scalars are perturbed away from their
    initial values, so a conversion that drops or swaps one of them shows in the logits."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def fixed_batch(vocab_size: int = 64, shape=(2, 16)):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, shape, generator=g), torch.randint(0, vocab_size, shape, generator=g)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
