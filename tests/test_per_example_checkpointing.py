"""Per-example norms under non-reentrant activation checkpointing: the rule layers' inputs inside a checkpointed
block are not held from the forward (the memory checkpointing frees), but saved by the checkpoint and read back
after its recomputation. References: the same model without checkpointing, one example at a time (float64), and
p.grad of a plain checkpointed step."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from noisescale.per_example import PerExampleGradNorms

from test_per_example import assert_relclose, generator, naive_per_example, regression_loss

B, T, D = 4, 6, 5


class Block(nn.Module):
    """Rule layers called every way a rule takes its input: (B, T, d); B T rows in blocks of T; (T, B, d)
    sequence-first; positions of a batch of one, shared by all; one layer called twice; one whose output is not used."""

    def __init__(self):
        super().__init__()
        self.norm, self.rows, self.seq = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)
        self.positions = nn.Embedding(T, D)   # on positions (1, T), as HF's position embeddings
        self.twice, self.unused = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        h = self.norm(h)
        rows = self.rows(torch.tanh(h).reshape(-1, D)).view(h.shape)
        seq = self.seq(torch.sin(h).transpose(0, 1)).transpose(0, 1)
        self.unused(torch.cos(h))
        return torch.tanh(rows + seq + self.positions(torch.arange(T)[None])) * self.twice(torch.tanh(self.twice(h)))


class Net(nn.Module):
    def __init__(self, checkpointed=True):
        super().__init__()
        self.embed, self.head, self.checkpointed = nn.Linear(3, D), nn.Linear(D, 2), checkpointed
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return self.head(h)


def _case(model, seeds):
    """A copy of the model for plain steps, a batch, and the loop's norms on the model without checkpointing."""
    reference = copy.deepcopy(model)
    reference.checkpointed = False
    x = torch.randn(B, T, 3, dtype=torch.float64, generator=generator(seeds[0]))
    y = torch.randn(B, T, 2, dtype=torch.float64, generator=generator(seeds[1]))
    return copy.deepcopy(model), x, y, naive_per_example(reference, regression_loss, x, y)


def assert_as_the_loop(by_parameter, expected):
    for name, values in expected.items():
        assert_relclose(by_parameter[name], values)


def assert_grads_equal(model, plain):
    for p, q in zip(model.parameters(), plain.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def _inputs_alive_after_forward(model, run_forward):
    """How many inputs of the blocks' rule layers are still alive between the forward and the backward."""
    taken = []
    handles = [layer.register_forward_hook(lambda m, args, out: taken.append(weakref.ref(args[0])))
               for block in model.blocks for layer in (block.rows, block.seq, block.twice, block.unused)]
    loss = run_forward()
    gc.collect()
    alive = sum(ref() is not None for ref in taken)
    for handle in handles:
        handle.remove()
    return loss, alive, len(taken)


@pytest.mark.parametrize("early_stop", [True, False])
def test_checkpointed_inputs_are_not_held_and_the_norms_are_exact(early_stop):
    torch.manual_seed(0)
    model = Net().double()
    plain, x, y, expected = _case(model, (1, 2))
    with set_checkpoint_early_stop(early_stop):
        _, plain_alive, calls = _inputs_alive_after_forward(plain, lambda: regression_loss(plain(x), y).mean())
        norms = PerExampleGradNorms(model, regression_loss, by_parameter=True)
        for _ in range(2):   # the first call sends the (T, B, d) layer to the vmap, the second probes it
            norms(x, y)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with norms.observe(B, model_inputs=x) as observed:
                loss, alive, _ = _inputs_alive_after_forward(model, lambda: regression_loss(model(x), y).mean())
                loss.backward()
            regression_loss(plain(x), y).mean().backward()
            assert (alive, calls) == (plain_alive, 10) and alive == 0
            assert_as_the_loop(observed.by_parameter, expected)
            assert set(observed.backend_of.values()) == {"ghost"}
            assert_grads_equal(model, plain)
            plain.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        assert_as_the_loop(norms(x, y).by_parameter, expected)


def test_a_checkpoint_inside_a_checkpoint():
    """Nested non-reentrant checkpoints: the inner block's replay runs inside the outer's."""
    class Nested(Net):
        def forward(self, x):
            h = self.embed(x)
            both = (lambda h: self.blocks[1](checkpoint(self.blocks[0], h, use_reentrant=False)))
            return self.head(checkpoint(both, h, use_reentrant=False) if self.checkpointed else both(h))

    torch.manual_seed(0)
    model = Nested().double()
    plain, x, y, expected = _case(model, (3, 4))
    regression_loss(plain(x), y).mean().backward()
    norms = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        assert_as_the_loop(norms(x, y).by_parameter, expected)
        assert_grads_equal(model, plain)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_the_whole_model_vmap_runs_checkpointed_blocks_plainly(use_reentrant):
    """torch.utils.checkpoint called directly (not through HuggingFace's flag) inside the whole-model vmap: a
    reentrant checkpoint hid the parameters inside it from torch.func's grad (a tiny model's norms 44 % off,
    silently), a non-reentrant one raised on the shapes of its recomputed tensors. Both now run plainly inside the
    pass, and torch's checkpoint is as it was afterwards."""
    import torch.utils.checkpoint as torch_checkpoint

    originals = torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.checkpointed = True

        def forward(self, x):
            block, h = (lambda h: torch.tanh(self.inner(h))), self.embed(x)
            return self.out(checkpoint(block, h, use_reentrant=use_reentrant) if self.checkpointed else block(h))

    torch.manual_seed(0)
    model = Checkpointed().double()
    reference = copy.deepcopy(model)
    reference.checkpointed = False   # torch.autograd.grad does not go through a reentrant checkpoint
    x = torch.randn(B, 6, 3, dtype=torch.float64, generator=generator(5))
    y = torch.randn(B, 6, 2, dtype=torch.float64, generator=generator(6))
    expected = naive_per_example(reference, regression_loss, x, y)
    result = PerExampleGradNorms(model, regression_loss, by_parameter=True, backend="vmap")(x, y)
    assert_as_the_loop(result.by_parameter, expected)
    assert (torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator) == originals


@pytest.mark.parametrize("early_stop", [True, False])
def test_a_second_backward_through_a_checkpointed_block_is_the_callers_as_without_noisescale(early_stop):
    """backward(retain_graph=True) and a second backward through the same checkpointed forward (two losses on one
    trunk): the second replays the block again after the first read the saved inputs. Every input saved in the
    forward is saved again in that replay, so torch's count of saved tensors holds: the caller's p.grad is a plain
    step's and noisescale refuses the pass after the caller's backward (as without checkpointing), instead of
    torch raising CheckpointError inside it."""
    torch.manual_seed(0)
    model = Net().double()
    plain = copy.deepcopy(model)
    x = torch.randn(B, T, 3, dtype=torch.float64, generator=generator(7))
    y = torch.randn(B, T, 2, dtype=torch.float64, generator=generator(8))

    def two_losses(net):
        out = net(x)
        regression_loss(out, y).mean().backward(retain_graph=True)
        out.square().mean().backward()

    with set_checkpoint_early_stop(early_stop):
        two_losses(plain)
        norms = PerExampleGradNorms(model, regression_loss, by_parameter=True)
        norms(x, y)
        norms(x, y)
        model.zero_grad(set_to_none=True)
        with pytest.raises(ValueError, match="more than one backward"):
            with norms.observe(B, model_inputs=x):
                two_losses(model)
    assert_grads_equal(model, plain)


def test_observe_refuses_a_parameter_whose_gradient_a_reentrant_checkpoint_splits():
    """A module's own parameter used both outside and inside a reentrant checkpoint in its forward: its gradient
    arrives from two backwards. A call refused it; observe gave its norms 62 % off, silently (a review's case). Now
    refused too, after the caller's backward, whose p.grad is a plain step's."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(D))

        def forward(self, h):
            return h * self.s + checkpoint(lambda h: torch.tanh(h * self.s), h, use_reentrant=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, D), Scaled(), nn.Linear(D, 2)).double()
    plain = copy.deepcopy(model)
    x = torch.randn(B, T, 3, dtype=torch.float64, generator=generator(9))
    y = torch.randn(B, T, 2, dtype=torch.float64, generator=generator(10))
    regression_loss(plain(x), y).mean().backward()
    norms = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    with pytest.raises(ValueError, match="'1.s' received its gradient in two parts"):
        with norms.observe(B, model_inputs=x):
            regression_loss(model(x), y).mean().backward()
    assert_grads_equal(model, plain)
