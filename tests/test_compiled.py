"""Models compiled by ``torch.compile``: the measured passes run the model eagerly (``noisescale._compiled``), so the
norms, the Hessian proxies and p.grad are those of the uncompiled model, and the unmeasured steps still run compiled.

The compiler backend is ``aot_eager``: Dynamo and AOTAutograd, where the hooks and the graphs meet, without
inductor's C++ code generation (a compiler at run time, and seconds a graph)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _ranks import one_rank_process_group
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from noisescale.distributed import unwrapped_module
from noisescale.monitor import NoiseScaleMonitor
from noisescale.per_example import PerExampleGradNorms
from noisescale.training import AdaptiveTrainer

BACKEND = "aot_eager"


def per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def batches(sizes):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=generator)) for size in sizes]


def compiled(model: nn.Module, how: str) -> nn.Module:
    """``torch.compile(model)`` (an OptimizedModule around the model) or ``model.compile()`` (in place)."""
    torch._dynamo.reset()
    if how == "wrapped":
        return torch.compile(model, backend=BACKEND)
    model.compile(backend=BACKEND)
    return model


def sgd_trainer(model: nn.Module, target: nn.Module, inputs, targets, **options) -> AdaptiveTrainer:
    """AdaptiveTrainer over ``target`` (the model, or a wrapper of it), SGD on the model's parameters."""
    return AdaptiveTrainer(target, per_example_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                           TensorDataset(inputs, targets), progress=False, **options)


def naive_sqnorms(model: nn.Module, inputs, targets) -> torch.Tensor:
    """|g_i|^2 one example at a time, on the eager model."""
    parameters = list(model.parameters())
    rows = []
    for i in range(inputs.shape[0]):
        loss = per_example_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum()
        rows.append(sum(g.square().sum() for g in torch.autograd.grad(loss, parameters)))
    return torch.stack(rows)


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
@pytest.mark.parametrize("backend", ["ghost", "auto", "vmap"])
def test_the_norms_of_a_compiled_model_are_the_eager_models(how, backend):
    """Before, ghost found no layer call (the compiled graph ran without the hooks: "their module's forward was
    never called") and auto failed inside Dynamo, which traced its hooks."""
    model = mlp()
    target = compiled(model, how)
    (inputs, targets), = batches([6])
    loss = per_example_loss(target(inputs), targets).mean()   # compiled before the hooks are installed
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with PerExampleGradNorms(target, per_example_loss, backend=backend) as norms:
        for _ in range(3):   # Dynamo recompiles with dynamic shapes after the first calls
            model.zero_grad()
            result = norms(inputs, targets)
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(result.sqnorms, naive_sqnorms(model, inputs, targets), rtol=1e-10, atol=0)
            model.zero_grad()
            per_example_loss(target(inputs), targets).mean().backward()   # a plain compiled step, hooks installed
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
            if backend == "vmap":   # observe reads the hooks, which backend="vmap" has none of
                continue
            model.zero_grad()
            with norms.observe(inputs.shape[0]) as observed:   # the caller's own pass of the compiled model
                per_example_loss(target(inputs), targets).mean().backward()
            torch.testing.assert_close(observed.sqnorms, result.sqnorms, rtol=1e-12, atol=0)
            for p, expected in zip(model.parameters(), reference):
                torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)


def test_observe_runs_eagerly_a_compiled_wrapper_it_was_not_given():
    """nanoGPT's pattern: the norms are made on the raw model, the caller's pass runs through torch.compile(model).
    Before, Dynamo recompiled with the active hooks inside (graph breaks, then its recompile limit: minutes with
    inductor); now no graph is compiled in the observed passes, and the norms are the eager model's."""
    model = mlp()
    target = compiled(model, "wrapped")
    (inputs, targets), = batches([6])
    per_example_loss(target(inputs), targets).mean().backward()   # compiled here
    model.zero_grad()
    graphs = counters["stats"]["unique_graphs"]
    with PerExampleGradNorms(model, per_example_loss) as norms:
        for _ in range(3):
            model.zero_grad()
            with norms.observe(inputs.shape[0]) as observed:
                per_example_loss(target(inputs), targets).mean().backward()
            torch.testing.assert_close(observed.sqnorms, naive_sqnorms(model, inputs, targets), rtol=1e-10, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs


@torch.compile(backend=BACKEND)
def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


class CompiledBlock(nn.Module):
    """A forward that calls a compiled function, which calls the hooked layers (no compiled module to find)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return _run(self.net, x)


def test_a_compiled_function_that_calls_the_layers_is_measured_eagerly():
    """Before, Dynamo traced the active hooks inside the compiled function (a new user's case: 48 graphs, the
    recompile limit, minutes with inductor); now no graph is compiled in the measured passes."""
    torch._dynamo.reset()
    model = CompiledBlock()
    (inputs, targets), = batches([6])
    per_example_loss(model(inputs), targets).mean().backward()   # compiled here
    expected = naive_sqnorms(model, inputs, targets)   # (compiles for batches of 1)
    model.zero_grad()
    graphs = counters["stats"]["unique_graphs"]
    with PerExampleGradNorms(model, per_example_loss) as norms:
        for _ in range(3):
            model.zero_grad()
            torch.testing.assert_close(norms(inputs, targets).sqnorms, expected, rtol=1e-10, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs


def test_observe_refuses_backend_vmap_on_a_compiled_model_as_on_any_other():
    target = compiled(mlp(), "wrapped")
    with PerExampleGradNorms(target, per_example_loss, backend="vmap") as norms:
        with pytest.raises(ValueError, match="backend='vmap' has none"):
            with norms.observe(6):
                pass


@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_a_monitor_of_a_compiled_model_records_what_it_records_uncompiled(how):
    """measure_every=2 and hessian_every=2: the measured and Hessian steps run eagerly, the others compiled, with
    the monitor's hooks installed (and idle); float64, so the compiled steps round as the eager ones here."""
    def run(compile_as):
        model = mlp()
        target = model if compile_as is None else compiled(model, compile_as)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = NoiseScaleMonitor(target, per_example_loss, measure_every=2, hessian_every=2,
                                    hessian_examples=4, optimizer=optimizer)
        for inputs, targets in batches([6] * 6 + [5, 4]):   # a last batch smaller: shapes change
            optimizer.zero_grad()
            monitor(inputs, targets)
            optimizer.step()
        return model, monitor.history

    eager_model, eager_history = run(None)
    model, history = run(how)
    assert history["grad_sqnorm"].notna().sum() == 4 and history["g_h_g"].notna().sum() == 4
    for column in ("loss", "grad_sqnorm", "trace_sigma", "trace_h", "g_h_g", "trace_h_sigma", "fisher_trace"):
        torch.testing.assert_close(torch.tensor(history[column].to_numpy()),
                                   torch.tensor(eager_history[column].to_numpy()),
                                   rtol=1e-12, atol=0, equal_nan=True, msg=column)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_a_compiled_trainers_checkpoint_resumes_in_an_eager_trainer_and_back():
    """The trainer's checkpoint holds the model's own parameter names, as under DDP: before, one saved with
    ``torch.compile(model)`` held ``_orig_mod.``-prefixed names, and resuming it without compiling (or an eager
    run's checkpoint with compiling) failed in load_state_dict (missing and unexpected keys)."""
    inputs, targets = batches([64])[0]

    def trainer(compile_as):
        model = mlp()
        target = model if compile_as is None else compiled(model, compile_as)
        return model, sgd_trainer(model, target, inputs, targets, batch_size=8, monitor_options={"measure_every": 2})

    reference_model, reference = trainer(None)
    for _ in range(4):
        reference.step()
    for save_as, resume_as in (("wrapped", None), (None, "wrapped"), ("wrapped", "wrapped"), ("in_place", None)):
        _, saving = trainer(save_as)
        for _ in range(2):
            saving.step()
        state = saving.state_dict()
        assert all(not name.startswith("_orig_mod.") for name in state["model"]), list(state["model"])
        saving.close()
        model, resumed = trainer(resume_as)
        resumed.load_state_dict(state)
        for _ in range(2):
            resumed.step()
        resumed.close()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_a_checkpoint_saved_with_the_compiled_names_still_resumes():
    """Checkpoints of earlier versions hold ``_orig_mod.``-prefixed names: they load compiled or not."""
    inputs, targets = batches([32])[0]
    model = mlp()
    saving = sgd_trainer(model, model, inputs, targets, batch_size=8)
    saving.step()
    state = saving.state_dict()
    state["model"] = {"_orig_mod." + name: value for name, value in state["model"].items()}   # as saved before
    saving.close()
    for compile_as in (None, "wrapped"):
        fresh = mlp()
        target = fresh if compile_as is None else compiled(fresh, compile_as)
        resumed = sgd_trainer(fresh, target, inputs, targets, batch_size=8)
        resumed.load_state_dict(state)
        for p, q in zip(fresh.parameters(), model.parameters()):
            assert torch.equal(p, q)
        resumed.close()


def test_a_compiled_ddp_model_is_seen_as_ddp_in_either_order():
    """``torch.compile(DistributedDataParallel(model))``, as accelerate builds it (the HF Trainer's
    ``torch_compile=True`` under DDP): before, the trainer and the integrations saw no DDP inside the compile
    wrapper (every rank drew the whole batch; the HF Trainer logged each rank's own estimate as the global one), and
    the Hessian proxies ran DDP's forward under torch.func ("Cannot access data pointer of Tensor that doesn't have
    storage"). Now both orders give the process group, and the module itself for the Hessian proxies and
    checkpoints."""
    inputs, targets = batches([16])[0]
    with one_rank_process_group():
        model = mlp()
        for wrapped in (torch.compile(DistributedDataParallel(model), backend=BACKEND),
                        DistributedDataParallel(torch.compile(model, backend=BACKEND))):
            assert unwrapped_module(wrapped) is model
            trainer = sgd_trainer(model, wrapped, inputs, targets, batch_size=8, monitor_options={"hessian_every": 1})
            assert trainer.monitor.process_group is not None
            row = trainer.step()
            assert all(name in row for name in ("trace_sigma", "g_h_g"))
            assert all(not name.startswith(("module.", "_orig_mod.")) for name in trainer.state_dict()["model"])
            trainer.close()


def test_measuring_without_compiling_does_not_import_dynamo():
    """Entering the eager stance imports Dynamo (seconds); where nothing was compiled it is skipped, so ``observe``
    and ``__call__`` on a plain model leave ``torch._dynamo`` unimported."""
    script = (
        "import sys, torch, torch.nn.functional as F\n"
        "from noisescale.per_example import PerExampleGradNorms\n"
        "model = torch.nn.Linear(3, 2)\n"
        "norms = PerExampleGradNorms(model, lambda o, t: F.cross_entropy(o, t, reduction='none'))\n"
        "x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])\n"
        "norms(x, y)\n"
        "with norms.observe(4):\n"
        "    F.cross_entropy(model(x), y).backward()\n"
        "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
