"""PerExampleGradNorms.observe: ghost norms read from a forward and backward the caller runs itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisescale.per_example import PerExampleGradNorms


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def _per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _naive_sqnorms(model, inputs, targets):
    """|dl_i/dtheta|^2 one example at a time: the independent reference."""
    sqnorms = []
    for x, y in zip(inputs, targets):
        grads = torch.autograd.grad(_per_example_loss(model(x[None]), y[None]).sum(), list(model.parameters()))
        sqnorms.append(sum(g.pow(2).sum() for g in grads))
    return torch.stack(sqnorms)


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (6,), generator=generator)


@pytest.mark.parametrize("loss_scale", [1.0, 0.25])
def test_observed_norms_match_a_naive_loop_and_leave_the_gradient_as_it_was(loss_scale):
    model, (inputs, targets) = _model(), _batch()
    plain = _model()
    (_per_example_loss(plain(inputs), targets).mean() * loss_scale).backward()
    norms = PerExampleGradNorms(model, _per_example_loss)
    with norms.observe(6, loss_scale=loss_scale) as observed:
        (_per_example_loss(model(inputs), targets).mean() * loss_scale).backward()
    torch.testing.assert_close(observed.sqnorms, _naive_sqnorms(_model(), inputs, targets), rtol=1e-10, atol=0)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_sum_of_weighted_terms_observed_with_loss_scale_batch_size_gives_each_terms_norm():
    model, (inputs, targets) = _model(), _batch()
    weights = torch.arange(1.0, 7.0, dtype=torch.float64) / 10
    with PerExampleGradNorms(model, _per_example_loss).observe(6, loss_scale=6) as observed:
        (weights * _per_example_loss(model(inputs), targets)).sum().backward()
    expected = weights.square() * _naive_sqnorms(_model(), inputs, targets)
    torch.testing.assert_close(observed.sqnorms, expected, rtol=1e-10, atol=0)


class _Scale(nn.Module):
    """A module with a parameter but no ghost rule: the per-module fallback measures it from its recorded call."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight


def test_a_module_without_a_rule_is_observed_by_the_per_module_fallback():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 3), _Scale()).double()

    model, (inputs, targets) = make(), _batch()
    with PerExampleGradNorms(model, _per_example_loss).observe(6) as observed:
        _per_example_loss(model(inputs), targets).mean().backward()
    torch.testing.assert_close(observed.sqnorms, _naive_sqnorms(make(), inputs, targets), rtol=1e-10, atol=0)


class _SharedHead(nn.Module):
    """``head`` uses the embedding's weight directly, outside the embedding's forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3).double()
        self.other = nn.Linear(3, 3).double()

    def forward(self, x):
        return F.linear(self.body(x), self.other.weight)


class Shifted(nn.Module):
    """A module without a rule (measured from its recorded call) that takes the model's buffer as an input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))

    def forward(self, x, shift):
        return x * self.scale + shift


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.shifted, self.out = Shifted(), nn.Linear(5, 3).double()
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))

    def forward(self, x):
        return self.out(self.shifted(x, self.shift))


@pytest.mark.parametrize("given_inputs", [False, True])
def test_a_buffer_taken_as_a_layer_input_is_not_seen_as_changed_by_the_independence_check(given_inputs):
    """observe's independence check put the buffers back with copy_ after its own forwards, which moved their
    version counters: the recorded call that took the buffer (a PyG GCN's edge_index kept as a buffer) was then
    refused as "modified in place after the call", though nothing had changed it."""
    torch.manual_seed(0)
    model = WithBuffer()
    inputs, targets = _batch()
    expected = _naive_sqnorms(model, inputs, targets)
    norms = PerExampleGradNorms(model, _per_example_loss)
    with norms.observe(6, **({"model_inputs": inputs} if given_inputs else {})) as observed:
        _per_example_loss(model(inputs), targets).mean().backward()
    torch.testing.assert_close(observed.sqnorms, expected, rtol=1e-10, atol=0)


def test_parameters_used_outside_their_module_are_measured_after_the_pass_which_is_left_intact():
    """other.weight is read outside other's call: the hooks miss it, so the output gradients kept in the first
    pass measure it (the per-example loop's norms), and on every later pass; p.grad is the plain backward's."""
    from test_per_example import naive_per_example
    model, (inputs, targets) = _SharedHead(), _batch()
    plain = _SharedHead()
    plain.load_state_dict(model.state_dict())
    expected = sum(naive_per_example(plain, _per_example_loss, inputs, targets).values())
    _per_example_loss(plain(inputs), targets).mean().backward()
    engine = PerExampleGradNorms(model, _per_example_loss)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with engine.observe(6) as observed:
            _per_example_loss(model(inputs), targets).mean().backward()
        torch.testing.assert_close(observed.sqnorms, expected, rtol=1e-10, atol=0)
        for p, q in zip(model.parameters(), plain.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_a_weight_also_read_outside_its_layer_is_measured_from_the_output_gradients():
    """The layer's call is hooked, its weight's second use is not (in a form the graph's capture does not take):
    found by counting the graph's uses from the model's outputs at the end of its call, in every pass, so that
    pass keeps its output gradients, which measure it as the per-example loop does; also where the forward starts
    reading it so after its first pass. p.grad is the caller's backward's."""
    from test_per_example import ReadTwice, naive_per_example, regression_loss
    torch.manual_seed(0)
    model = ReadTwice().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    engine = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    for twice, backend in [(True, "vmap"), (False, "ghost"), (False, "ghost"), (True, "vmap"), (True, "vmap")]:
        model.twice = twice
        model.zero_grad()
        regression_loss(model(x), y).mean().backward()
        plain = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with engine.observe(5) as observed:
            regression_loss(model(x), y).mean().backward()
        assert observed.backend_of["proj.weight"] == backend
        for name, values in naive_per_example(model, regression_loss, x, y).items():
            torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)
        assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), plain))


@pytest.mark.parametrize("form, backend", [("linear", "ghost"), ("twice", "ghost"), ("reversed", "vmap")])
def test_a_tied_head_read_outside_any_module_call_is_captured_in_the_callers_pass(form, backend):
    """observe walks the graph at the end of the model's call, before the caller's backward, so the table's
    products outside the embedding's calls are captured from the graph as in a call (``graph_uses``), and other
    forms are measured by the output gradients. Reference: the per-example loop."""
    from test_per_example import TiedHead, naive_per_example, token_loss
    torch.manual_seed(0)
    model = TiedHead(form).double()
    tokens, targets = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    expected = naive_per_example(model, token_loss, tokens, targets)
    engine = PerExampleGradNorms(model, token_loss, by_parameter=True)
    for _ in range(2):
        model.zero_grad()
        with engine.observe(4) as observed:
            token_loss(model(tokens), targets).mean().backward()
        assert observed.backend_of["embed.weight"] == backend
        for name, values in expected.items():
            torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)


class _Mixed(nn.Module):
    """Called as m(x, scale=...): positional and keyword inputs; its head's weight is read outside the head."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x, scale=1.0):
        return F.linear(torch.tanh(self.body(x)) * scale, self.head.weight)


def test_a_call_with_positional_and_keyword_inputs_is_measured_on_them():
    from test_per_example import naive_per_example
    torch.manual_seed(0)
    model = _Mixed().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = naive_per_example(_ScaledCall(model), _per_example_loss, x, y)
    engine = PerExampleGradNorms(model, _per_example_loss, by_parameter=True)
    with engine.observe(6) as observed:
        _per_example_loss(model(x, scale=3.0), y).mean().backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter[name.removeprefix("model.")], values, rtol=1e-10,
                                   atol=1e-15)


class _ScaledCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, scale=3.0)


def test_a_weight_only_the_callers_loss_reads_is_refused_not_measured_as_zero():
    """The loss applies head.weight itself, outside the model's call: no output gradient can give its share."""
    torch.manual_seed(0)
    model = _Mixed().double()
    model.forward = lambda x: torch.tanh(model.body(x))   # returns the hidden states; the head is the loss's
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = PerExampleGradNorms(model, _per_example_loss)
    with pytest.raises(ValueError, match=r"head\.weight.*used outside the model's call"):
        with engine.observe(6):
            _per_example_loss(F.linear(model(x), model.head.weight), y).mean().backward()


def test_a_new_plan_keeps_the_output_gradients_of_its_first_pass():
    """A weight read outside its layer is unfrozen after the first passes: the first pass of the new plan keeps
    the output gradients, so it is measured at once (the per-example loop's norms)."""
    from test_per_example import ReadTwice, naive_per_example, regression_loss
    torch.manual_seed(0)
    model = ReadTwice().double()
    model.proj.weight.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    engine = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    for step in range(3):
        if step == 2:
            model.proj.weight.requires_grad_(True)
        model.zero_grad()
        with engine.observe(5) as observed:
            regression_loss(model(x), y).mean().backward()
    for name, values in naive_per_example(model, regression_loss, x, y).items():
        torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)


def test_two_backward_passes_through_one_forward_are_an_error_after_them_leaving_p_grad_the_callers():
    """loss1.backward(retain_graph=True); loss2.backward(): the layers' output gradients arrive twice, which the
    per-example norms of one pass cannot take; the error comes after the caller's backward, so p.grad is the sum
    a plain run gives."""
    model, (inputs, targets) = _model(), _batch()
    plain = _model()
    outputs = plain(inputs)
    _per_example_loss(outputs, targets).mean().backward(retain_graph=True)
    outputs.square().mean().backward()
    with pytest.raises(ValueError, match="more than one backward"):
        with PerExampleGradNorms(model, _per_example_loss).observe(6):
            outputs = model(inputs)
            _per_example_loss(outputs, targets).mean().backward(retain_graph=True)
            outputs.square().mean().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


class _InternalLoss(nn.Module):
    """Computes its loss inside from ``labels``, as HuggingFace models do; a weight is read outside its layer."""

    def __init__(self):
        super().__init__()
        self.body, self.other = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x, labels):
        logits = F.linear(torch.tanh(self.body(x)), self.other.weight)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_under_ddp_the_output_gradients_are_those_before_its_output_node():
    """DistributedDataParallel(find_unused_parameters=True), the HF Trainer's default, passes every output through
    one autograd node of its own, so the gradient of the loss the model returns reaches the logits inside DDP, not
    the logits DDP hands out: the outputs are read on the module inside it. One gloo process; the norms are the
    per-example loop's, p.grad the plain DDP backward's."""
    from torch.nn.parallel import DistributedDataParallel

    from _ranks import one_rank_process_group
    torch.manual_seed(0)
    model = _InternalLoss().double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    parameters = dict(model.named_parameters())
    expected = {name: torch.stack([torch.zeros((), dtype=x.dtype) if g is None else g.square().sum() for g in grads])
                for name, grads in zip(parameters, zip(*(torch.autograd.grad(
                    model(x[i:i + 1], y[i:i + 1])["loss"], list(parameters.values()), allow_unused=True)
                    for i in range(7))))}
    plain = copy.deepcopy(model)
    plain(x, y)["loss"].backward()
    with one_rank_process_group():
        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
        with PerExampleGradNorms(wrapped, _per_example_loss, by_parameter=True).observe(7) as observed:
            wrapped(x, labels=y)["loss"].backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter["module." + name], values, rtol=1e-10, atol=1e-15)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_hooks_are_inert_outside_the_block_and_bad_arguments_are_rejected():
    model, (inputs, targets) = _model(), _batch()
    norms = PerExampleGradNorms(model, _per_example_loss)
    _per_example_loss(model(inputs[:2]), targets[:2]).mean().backward()  # another batch size: no error, no record
    with pytest.raises(ValueError, match="batch_size"):
        with norms.observe(0):
            pass
    with pytest.raises(ValueError, match="loss_scale"):
        with norms.observe(6, loss_scale=0.0):
            pass


def test_an_optimizer_step_inside_the_block_is_refused_not_measured_at_the_new_weights():
    """The per-module fallback re-runs its recorded call when the block ends; had the caller stepped the optimizer
    inside the block, the re-run would see the new weights: that is an error, and the gradient stays the caller's."""
    torch.manual_seed(0)
    model, (inputs, targets) = nn.Sequential(nn.Linear(5, 3), _Scale()).double(), _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(Exception, match="modified in place after the call"):
        with PerExampleGradNorms(model, _per_example_loss).observe(6):
            _per_example_loss(model(inputs), targets).mean().backward()
            optimizer.step()


@pytest.mark.parametrize("length, warns", [(5, True), (4, False)])
def test_observe_warns_once_where_a_dim_as_large_as_the_batch_cannot_be_checked(length, warns):
    """observe without the model's inputs cannot probe: a measured input with a dim besides the batch's of size B
    (the bias Embedding's (T, T) buckets at T == B) gets a warning, once; T != B gets none."""
    import warnings

    from test_per_example import RelativeBias, regression_loss
    torch.manual_seed(0)
    model = RelativeBias(length, followed=False).double().eval()
    x, y = torch.randn(5, length, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    engine = PerExampleGradNorms(model, regression_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            try:
                with engine.observe(5):
                    regression_loss(model(x), y).mean().backward()
            except ValueError:   # T != B: the bias table needs the whole-model vmap, which observe cannot run
                pass
    messages = [str(w.message) for w in caught if "a dim besides the batch's" in str(w.message)]
    assert len(messages) == (1 if warns else 0)
    # it says what the caller can do: a new user read "runs from the next pass on" and waited for it
    assert all("without observe(..., model_inputs=inputs) such layers stay with the whole-model vmap in every pass"
               in message and "input ('embed') has" in message for message in messages)   # and names the layer


def test_observe_with_the_model_inputs_measures_by_the_output_gradients_what_the_hooks_cannot():
    """With model_inputs, T == B is checked as in __call__ (no warning): the bias table's (T, T) calls are not
    examples, so it needs the whole-model vmap, which runs after the pass on the loss <y_i, G_i> of the outputs
    and the gradients the caller's backward brought to them. The caller's loss here weighs the examples unequally
    and is scaled, which observe is not told: its norms are still each weighted term's, as the per-example loop
    gives them; p.grad is the caller's."""
    import copy
    import warnings

    from test_per_example import RelativeBias, naive_per_example, regression_loss
    torch.manual_seed(0)
    model = RelativeBias(5, followed=False).double().eval()
    x, y = torch.randn(5, 5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    expected = {name: weights.square() * values for name, values in
                naive_per_example(model, regression_loss, x, y).items()}
    plain = copy.deepcopy(model)
    (0.3 * (weights * regression_loss(plain(x), y)).sum()).backward()
    engine = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    for _ in range(2):   # the second pass keeps the output gradients because the first needed them
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with engine.observe(5, loss_scale=5 * 0.3, model_inputs=x) as observed:
                (0.3 * (weights * regression_loss(model(x), y)).sum()).backward()
        for name, values in expected.items():
            torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad)


class _EncoderDecoder(nn.Module):
    """Returns its hidden states next to the output computed from them (an encoder's last hidden state next to
    the logits), and adds a table on (T, T) buckets that only the whole-model vmap measures."""

    def __init__(self, length=4):
        super().__init__()
        from test_per_example import RelativeBias
        self.encoder, self.head = RelativeBias(length, followed=False), nn.Linear(2, 3)

    def forward(self, x):
        hidden = self.encoder(x)
        return {"hidden": hidden, "logits": self.head(torch.tanh(hidden))}


def test_the_output_gradients_count_an_output_computed_from_another_once():
    """The hidden states receive the gradient that came through the logits: the loss <y_i, G_i> must take the
    logits' alone, or the encoder's norms come out four times too large."""
    from test_per_example import naive_per_example
    torch.manual_seed(0)
    model = _EncoderDecoder().double().eval()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = lambda outputs, targets: F.cross_entropy(outputs["logits"], targets, reduction="none")  # noqa: E731
    expected = naive_per_example(model, loss, x, y)
    engine = PerExampleGradNorms(model, loss, by_parameter=True)
    with engine.observe(6, model_inputs=x) as observed:
        loss(model(x), y).mean().backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)


class _TwoOutputs(nn.Module):
    """A weight read outside its module's call (only the whole-model vmap measures it), and two outputs: both
    halves of one chunk, or the hidden states next to the logits computed from them."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.body, self.other, self.head = kind, nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.linear(torch.tanh(self.body(x)), self.other.weight)
        if self.kind == "chunks":
            return h.chunk(2, -1)
        if self.kind == "sequence_first":   # computed again, not from h: its gradient does not pass through h
            return h, F.linear(torch.tanh(self.body(x)), self.other.weight).unsqueeze(0).expand(4, -1, -1)
        return h, self.head(torch.tanh(h))


@pytest.mark.parametrize("kind", ["chunks", "hidden_and_logits"])
def test_every_output_the_loss_uses_counts_once(kind):
    """Outputs of one operation (chunk) share an autograd node; hidden states are used by the loss directly and
    through the logits computed from them (their hook then sees the alias handed to the caller, which gets only
    the direct use). Reference: the per-example loop; p.grad is the plain backward's."""
    from test_per_example import naive_per_example
    torch.manual_seed(0)
    model = _TwoOutputs(kind).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))

    def loss(outputs, targets):
        first, second = outputs
        return F.cross_entropy(second, targets, reduction="none") + first.square().sum(1)

    expected = naive_per_example(model, loss, x, y)
    plain = copy.deepcopy(model)
    loss(plain(x), y).mean().backward()
    engine = PerExampleGradNorms(model, loss, by_parameter=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with engine.observe(7) as observed:
            loss(model(x), y).mean().backward()
        for name, values in expected.items():
            torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name


def test_an_output_without_the_examples_in_dim_0_that_the_loss_uses_is_refused():
    """A sequence-first (T, B, d) output reaching the vmap-measured weight: its gradient cannot be given to the
    examples, so observe refuses rather than leave it out; p.grad is the plain backward's."""
    torch.manual_seed(0)
    model = _TwoOutputs("sequence_first").double()
    x = torch.randn(6, 5, dtype=torch.float64)
    engine = PerExampleGradNorms(model, lambda outputs, targets: outputs[0].sum(1))
    with pytest.raises(ValueError, match=r"other\.weight.*an output of shape \(4, 6, 6\)"):
        with engine.observe(6):
            first, second = model(x)
            (first.sum(1) + second.sum((0, 2))).mean().backward()
    assert model.other.weight.grad is not None


class _Scaled(nn.Module):
    """RelativeBias times a scale passed as a tensor without the examples in dim 0."""

    def __init__(self):
        super().__init__()
        from test_per_example import RelativeBias
        self.inner = RelativeBias(4, followed=False).eval()

    def forward(self, x, scale=None):
        return self.inner(x) * (1.0 if scale is None else scale)


def test_without_model_inputs_observe_measures_on_the_inputs_of_the_models_one_call():
    """No model_inputs (Lightning's case): the vmap runs on the inputs the model's one call received."""
    from test_per_example import naive_per_example, regression_loss
    torch.manual_seed(0)
    model = _Scaled().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected = naive_per_example(model, regression_loss, x, y)
    engine = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    with engine.observe(5) as observed:
        regression_loss(model(x), y).mean().backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)
    scale = torch.tensor(0.5, dtype=x.dtype)   # an input shared by all the examples: passed to each as it is
    expected = {name: values / 16 for name, values in expected.items()}   # the loss is a quarter of it
    with engine.observe(5) as observed:
        regression_loss(model(x, scale), y / 2).mean().backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-10, atol=1e-15)


def test_observe_refuses_what_the_output_gradients_cannot_stand_for_and_leaves_p_grad_alone():
    """The model called twice or not at all, or an input without the examples in dim 0: a ValueError that
    names the table and the cause; p.grad is what the caller's backward left."""
    from test_per_example import regression_loss
    torch.manual_seed(0)
    model = _Scaled().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    engine = PerExampleGradNorms(model, regression_loss)
    passes = {"called 2 times": lambda: regression_loss(model(x), y) + regression_loss(model(x), y),
              "called 0 times": lambda: regression_loss(model.inner(x), y),
              r"an input of shape \(2,\) holds neither the 5 examples observe was given": lambda: regression_loss(model(x, torch.ones(2, dtype=x.dtype)), y)}
    for cause, losses in passes.items():
        model.zero_grad()
        losses().mean().backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with pytest.raises(ValueError, match=r"inner\.bias\.weight.*" + cause):
            with engine.observe(5):
                losses().mean().backward()
        for p, grad in zip(model.parameters(), expected):
            assert torch.equal(p.grad, grad)
    with pytest.raises(ValueError, match=r"inner\.bias\.weight.*more than one backward"):
        with engine.observe(5):
            outputs = model(x)
            torch.autograd.grad(outputs.square().sum(), outputs, retain_graph=True)   # a logged gradient norm
            regression_loss(outputs, y).mean().backward()


def test_observe_with_a_vmap_batch_measures_what_the_hooks_cannot_and_leaves_the_training_alone():
    """The bias table's (T, T) calls (T != B) need the whole-model vmap: with vmap_batch it runs after the caller's
    pass, on forked random generators; p.grad is the caller's, and the norms are the per-example loop's."""
    import copy

    from test_per_example import RelativeBias, naive_per_example, regression_loss
    torch.manual_seed(0)
    model = RelativeBias(4, followed=False).double()
    model.drop.p = 0.0
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected = naive_per_example(model, regression_loss, x, y)
    plain = copy.deepcopy(model)
    regression_loss(plain(x), y).mean().backward()
    engine = PerExampleGradNorms(model, regression_loss, by_parameter=True)
    with engine.observe(5, vmap_batch=(x, y)) as observed:
        regression_loss(model(x), y).mean().backward()
    for name, values in expected.items():
        torch.testing.assert_close(observed.by_parameter[name], values, rtol=1e-9, atol=1e-15)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    model.drop.p = 0.5   # now the pass and the vmap draw dropout masks: the training's stream is the same
    draws = []
    for measured in (True, False):
        torch.manual_seed(4)
        if measured:
            with engine.observe(5, vmap_batch=(x, y)):
                regression_loss(model(x), y).mean().backward()
        else:
            regression_loss(model(x), y).mean().backward()
        draws.append(torch.randn(3))
    assert torch.equal(*draws)


def test_a_block_without_a_backward_is_an_error_not_zeros():
    """Nothing, a forward alone, or a forward without grad inside the block: no gradient reached the hooks, so
    the norms would be zeros; a ValueError says to run the backward inside the block."""
    model, (inputs, targets) = _model(), _batch()
    engine = PerExampleGradNorms(model, _per_example_loss)
    passes = [lambda: None, lambda: _per_example_loss(model(inputs), targets)]
    for run in passes:
        with pytest.raises(ValueError, match="no gradient reached the model's parameters inside the observe block"):
            with engine.observe(inputs.shape[0]):
                run()
    with pytest.raises(ValueError, match="no gradient reached"):
        with engine.observe(inputs.shape[0]), torch.no_grad():
            model(inputs)
    with engine.observe(inputs.shape[0]) as observed:   # and a real pass afterwards is measured
        _per_example_loss(model(inputs), targets).mean().backward()
    assert observed.sqnorms.shape == (inputs.shape[0],) and bool((observed.sqnorms > 0).all())


def test_a_model_that_changes_its_input_in_place_is_refused_where_its_outputs_must_be_recomputed():
    """observe measures the parameters that need the whole-model vmap (here a Linear on rows picked by an index)
    by recomputing the model's outputs from the inputs of its call: a forward that changed them in place made that
    recomputation start from the changed input (0.32 to 0.84 off, silently, in a review's script). Now a ValueError
    names the cause."""
    torch.manual_seed(0)

    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            x.mul_(2.0)
            rows = torch.arange(x.shape[0]).roll(1)
            return self.out(self.mid(torch.tanh(self.embed(x))[rows])[rows.argsort()])

    model = Doubles().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    norms = PerExampleGradNorms(model, _per_example_loss)
    with pytest.raises(ValueError, match="changed one of its inputs in place"):
        with norms.observe(5):
            _per_example_loss(model(x), y).mean().backward()


def test_a_captured_tied_head_is_refused_where_the_model_is_called_twice_in_the_pass():
    """observe checks the graph at the end of the model's first call: a second call's product of the table is not
    captured, so the table is refused (it would be 0.26 off), not measured from the first call's products alone.
    p.grad is the caller's."""
    from test_per_example import TiedHead, token_loss
    torch.manual_seed(0)
    model = TiedHead("linear").double()
    tokens, targets = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    model.zero_grad()
    (token_loss(model(tokens), targets) + token_loss(model(tokens.flip(1)), targets)).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    engine = PerExampleGradNorms(model, token_loss, by_parameter=True)
    model.zero_grad()
    with pytest.raises(ValueError, match="called 2 times"):
        with engine.observe(4):
            (token_loss(model(tokens), targets) + token_loss(model(tokens.flip(1)), targets)).mean().backward()
    assert all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), plain))


def test_a_captured_tied_head_refuses_a_second_backward_through_its_product():
    """autograd.grad through the head's product (not reaching the embedding's call) and then the backward: the
    product's hook would add its per-example gradient twice (1.6 off); refused as for the layers' hooks."""
    from test_per_example import TiedHead, token_loss
    torch.manual_seed(0)
    model = TiedHead("linear").double()
    tokens, targets = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    engine = PerExampleGradNorms(model, token_loss, by_parameter=True)
    captured = []
    handle = model.mix.register_forward_hook(lambda module, args, output: captured.append(output))
    with pytest.raises(ValueError, match="more than one backward"):
        with engine.observe(4):
            loss = token_loss(model(tokens), targets).mean()
            torch.autograd.grad(loss, captured[-1], retain_graph=True)
            loss.backward()
    handle.remove()
