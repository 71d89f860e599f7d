"""%%trace on any nn.Module with tensor inputs, against an oracle of plain PyTorch hooks.

A module whose forward takes no ``input_ids`` gets INPUT as it is: a tensor is one positional
input ``[batch, ...]``, a tuple of tensors several, a dict keyword inputs. Several invokes are
concatenated along dim 0, without padding.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import ipy_intervene as ii
from ipy_intervene.errors import InputError
from ipy_intervene.tracing.trace import NO_INPUT
from conftest import PROMPT, hook_count, hooks


class Pair(nn.Module):
    """Two positional tensor inputs of different widths, and an optional keyword scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 6)
        self.act = nn.Tanh()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.act(self.a(x) + self.b(y))) * scale


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.fixture
def pair() -> Pair:
    torch.manual_seed(1)
    return Pair().eval()


def run(module, source, input=NO_INPUT, **names):
    model = ii.wrap(module)
    ns = {"model": model, "torch": torch, **names}
    ii.trace(model, source, input, namespace=ns)
    return ns


def record(seen, key):
    return lambda m, a, o: seen.__setitem__(key, o.detach().clone())


def zero_col0(m, a, o):
    o = o.clone()
    o[:, 0] = 0
    return o


# -- reads and edits, one invoke ------------------------------------------------------------

@torch.no_grad()
def test_reads_equal_hooked_forward(mlp):
    x = torch.randn(5, 4)
    ns = run(mlp, "h0 = model[0].output\nh1 = model[1].output\nout = tracer.output", x)
    seen = {}
    with hooks((mlp[0], record(seen, "h0")), (mlp[1], record(seen, "h1"))):
        expected = mlp(x)
    assert torch.equal(ns["h0"], seen["h0"]) and ns["h0"].shape == (5, 8)
    assert torch.equal(ns["h1"], seen["h1"])
    assert torch.equal(ns["out"], expected)
    assert hook_count(mlp) == 0


@torch.no_grad()
def test_inplace_edit_changes_the_final_output_like_a_hook(mlp):
    x = torch.randn(5, 4)
    x = x.abs()
    mlp[0].weight[0].abs_()  # so that ReLU's column 0 is not already all zeros
    mlp[0].bias[0] = 0.5
    ns = run(mlp, "model[1].output[:, 0] = 0\nout = tracer.output\nlast = model[2].output", x)
    with hooks((mlp[1], zero_col0)):
        expected = mlp(x)
    assert torch.equal(ns["out"], expected)
    assert torch.equal(ns["last"], expected)
    assert not torch.equal(ns["out"], mlp(x))
    assert hook_count(mlp) == 0


@torch.no_grad()
def test_assignment_and_input_write(mlp):
    x = torch.randn(3, 4)
    ns = run(mlp, "model[0].output = model[0].output * 2\nout = tracer.output", x)
    with hooks((mlp[0], lambda m, a, o: o * 2)):
        expected = mlp(x)
    assert torch.equal(ns["out"], expected)

    ns = run(mlp, "model[2].input = model[2].input + 1\nout = tracer.output", x)
    handle = mlp[2].register_forward_pre_hook(lambda m, a: (a[0] + 1,))
    try:
        expected = mlp(x)
    finally:
        handle.remove()
    assert torch.equal(ns["out"], expected)


@torch.no_grad()
def test_two_positional_inputs(pair):
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    ns = run(pair, "a = model.a.output\nb = model.b.output\nmodel.act.output[:, 0] = 0\n"
                   "out = tracer.output", (x, y))
    seen = {}
    with hooks((pair.a, record(seen, "a")), (pair.b, record(seen, "b")),
               (pair.act, zero_col0)):
        expected = pair(x, y)
    assert torch.equal(ns["a"], seen["a"]) and torch.equal(ns["b"], seen["b"])
    assert torch.equal(ns["out"], expected)
    assert not torch.equal(ns["out"], pair(x, y))
    assert hook_count(pair) == 0


@torch.no_grad()
def test_a_list_of_tensors_and_a_dict_of_keyword_inputs(pair):
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    ns = run(pair, "out = tracer.output", [x, y])
    assert torch.equal(ns["out"], pair(x, y))
    ns = run(pair, "out = tracer.output\nh = model.a.output", {"x": x, "y": y, "scale": 3.0})
    assert torch.equal(ns["out"], pair(x, y, scale=3.0))
    assert torch.equal(ns["h"], pair.a(x))


@torch.no_grad()
def test_an_integer_tensor_to_a_module_without_input_ids_is_passed_as_it_is():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ns = run(net, "e = model[0].output\nout = tracer.output", ids)
    assert torch.equal(ns["e"], net[0](ids)) and torch.equal(ns["out"], net(ids))


@torch.no_grad()
def test_float_tensor_to_a_module_whose_first_argument_is_not_input_ids():
    class Mixed(nn.Module):  # forward takes input_ids too, but not first
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, input_ids=None):
            return self.lin(x)

    torch.manual_seed(3)
    net, x = Mixed().eval(), torch.randn(2, 4)
    ns = run(net, "h = model.lin.output", x)
    assert torch.equal(ns["h"], net(x))


# -- several invokes ------------------------------------------------------------------------

@torch.no_grad()
def test_invokes_get_their_own_rows(mlp):
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    ns = run(mlp, "with tracer.invoke(x1):\n    a = model[0].output\n    oa = tracer.output\n"
                  "with tracer.invoke(x2):\n    b = model[0].output\n    ob = tracer.output\n",
             x1=x1, x2=x2)
    assert ns["a"].shape == (2, 8) and ns["b"].shape == (3, 8)
    torch.testing.assert_close(ns["a"], mlp[0](x1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ns["b"], mlp[0](x2), rtol=0, atol=1e-6)
    torch.testing.assert_close(ns["oa"], mlp(x1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ns["ob"], mlp(x2), rtol=0, atol=1e-6)
    assert hook_count(mlp) == 0


@torch.no_grad()
def test_a_value_flows_from_one_invoke_to_the_other(mlp):
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    ns = run(mlp, "with tracer.invoke(x1):\n    a = model[0].output\n    clean = tracer.output\n"
                  "with tracer.invoke(x2):\n    model[0].output = a\n    patched = tracer.output\n",
             x1=x1, x2=x2)
    # the oracle: one batched forward whose rows 2..3 get rows 0..1 of layer 0's output
    def patch(m, a, o):
        o = o.clone()
        o[2:] = o[:2]
        return o

    with hooks((mlp[0], patch)):
        expected = mlp(torch.cat([x1, x2]))
    assert torch.equal(ns["clean"], expected[:2])
    assert torch.equal(ns["patched"], expected[2:])
    torch.testing.assert_close(ns["patched"], mlp(x1), rtol=0, atol=1e-6)
    assert hook_count(mlp) == 0


@torch.no_grad()
def test_invokes_of_two_positional_inputs_and_an_edit_in_one(pair):
    x1, y1, x2, y2 = torch.randn(1, 4), torch.randn(1, 5), torch.randn(2, 4), torch.randn(2, 5)
    ns = run(pair, "with tracer.invoke((x1, y1)):\n    o1 = tracer.output\n"
                   "with tracer.invoke((x2, y2)):\n    model.act.output[:, 0] = 0\n"
                   "    o2 = tracer.output\n", x1=x1, y1=y1, x2=x2, y2=y2)

    def zero_rows(m, a, o):
        o = o.clone()
        o[1:, 0] = 0
        return o

    with hooks((pair.act, zero_rows)):
        expected = pair(torch.cat([x1, x2]), torch.cat([y1, y2]))
    assert torch.equal(ns["o1"], expected[:1]) and torch.equal(ns["o2"], expected[1:])


def test_batch_rows_and_size():
    torch.manual_seed(0)
    model = ii.wrap(Pair())
    batch = model.prepare([(torch.randn(2, 4), torch.randn(2, 5)),
                           (torch.randn(3, 4), torch.randn(3, 5))])
    assert batch.size == 5 and batch.rows == [slice(0, 2), slice(2, 5)]
    assert [a.shape for a in batch.args] == [(5, 4), (5, 5)] and batch.kwargs == {}
    batch = model.prepare([{"x": torch.randn(2, 4), "y": torch.randn(2, 5), "scale": 2.0}] * 2)
    assert batch.args == () and batch.size == 4 and batch.kwargs["scale"] == 2.0
    assert batch.rows == [slice(0, 2), slice(2, 4)]
    one = model.prepare([(torch.randn(6, 4), torch.randn(6, 5))])
    assert one.size == 6 and one.rows == [slice(0, 6)]


def test_token_models_keep_token_batches(demo):
    batch = demo.prepare([PROMPT, torch.tensor([[5, 6, 7]])])
    assert batch.args == () and batch.size == 2 and batch.rows == [slice(0, 1), slice(1, 2)]
    assert set(batch.kwargs) >= {"input_ids", "attention_mask"}


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("inputs, message", [
    ([torch.randn(2, 4), torch.randn(3, 5)], r"shape \[3, 5\] in invoke 1 but \[2, 4\]"),
    ([(torch.randn(2, 4), torch.randn(2, 5)), (torch.randn(2, 4),)], "same inputs"),
    ([(torch.randn(2, 4), torch.randn(3, 5)), (torch.randn(2, 4), torch.randn(2, 5))],
     "has 3 rows"),
    ([torch.randn(2, 4), [1, 2]], "takes no `input_ids`"),
    ([torch.tensor(1.0), torch.tensor(2.0)], "0-dim"),
    ([{"x": torch.randn(1, 4), "scale": 1.0}, {"x": torch.randn(1, 4), "scale": 2.0}],
     "must be\\s+the same"),
])
def test_mismatched_invokes_are_input_errors(inputs, message):
    model = ii.wrap(Pair())
    with pytest.raises(InputError, match=message):
        model.prepare(inputs)


@pytest.mark.parametrize("bad, message", [
    ("a prompt", "takes no `input_ids`"),
    ([1, 2, 3], "takes no `input_ids`"),
    (3.5, "takes no `input_ids`"),
])
def test_token_inputs_to_a_module_without_input_ids_are_named(mlp, bad, message):
    with pytest.raises(InputError, match=message):
        ii.wrap(mlp).prepare([bad])


def test_float_tensor_to_a_token_model_is_still_refused(demo):
    with pytest.raises(InputError, match="integer tensor"):
        demo.prepare([torch.zeros(2, 3)])
    with pytest.raises(InputError, match="mix token inputs"):
        demo.prepare([PROMPT, (torch.zeros(1, 3),)])


def test_mismatched_shapes_in_a_cell_publish_nothing(mlp):
    model = ii.wrap(mlp)
    ns = {"model": model, "x1": torch.randn(2, 4), "x2": torch.randn(2, 5)}
    before = dict(ns)
    with pytest.raises(InputError, match=r"\[2, 5\] in invoke 1 but \[2, 4\] in invoke 0"):
        ii.trace(model, "with tracer.invoke(x1):\n    a = model[0].output\n"
                        "with tracer.invoke(x2):\n    b = model[0].output\n", namespace=ns)
    assert ns == before and hook_count(mlp) == 0


def test_a_failing_cell_publishes_nothing_and_leaves_no_hook(mlp):
    model = ii.wrap(mlp)
    ns = {"model": model, "torch": torch, "x1": torch.randn(2, 4), "x2": torch.randn(3, 4)}
    before = dict(ns)
    with pytest.raises(ZeroDivisionError):
        ii.trace(model, "with tracer.invoke(x1):\n    a = model[0].output\n"
                        "with tracer.invoke(x2):\n    b = model[1].output\n    1 / 0\n",
                 namespace=ns)
    assert ns == before and hook_count(mlp) == 0
    with pytest.raises(ii.InterventionError):  # a wrong-shaped write into the running forward
        ii.trace(model, "h = model[0].output\nmodel[0].output = torch.zeros(2, 9)\n"
                        "out = tracer.output", torch.randn(2, 4), namespace=ns)
    assert ns == before and hook_count(mlp) == 0
    with pytest.raises(RuntimeError):  # the module itself fails on the input
        ii.trace(model, "h = model[0].output", torch.randn(2, 7), namespace=ns)
    assert ns == before and hook_count(mlp) == 0
