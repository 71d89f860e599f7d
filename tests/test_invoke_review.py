"""Review of the names-across-invokes rule (issue 22): cells that give a wrong number with no
message today. Each test is the smallest cell that shows one defect, checked against the same
work run one prompt at a time with plain PyTorch hooks; it passes when the cell gives the
per-prompt numbers or stops with a clear error (InputError/SiteError/InterventionError/
CellSyntaxError). Tests marked xfail(strict) document defects still open; the others guard
defects fixed since the review (ea267c9) and patterns that must keep running."""

from __future__ import annotations

import pytest
import torch

import ipy_intervene as ii
from ipy_intervene.errors import CellSyntaxError, InterventionError, SiteError
from conftest import CORRUPT, PROMPT, SHORT, hook_count

PROMPTS = [PROMPT, SHORT, "When Mary and John went to the store"]  # 15, 7, 9 tokens
CLEAR = (CellSyntaxError, InterventionError, SiteError)


def alone(model, text, layer=None, fn=None):
    """Last-position logits of ``text`` alone, ``fn`` a forward hook on block ``layer``."""
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    handle = model.module.transformer.h[layer].register_forward_hook(fn) if fn else None
    try:
        with torch.no_grad():
            return model.module(ids).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()


def block_outputs(model, text):
    """Each block's output for ``text`` alone."""
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o.clone()))
               for i, b in enumerate(model.module.transformer.h)]
    try:
        alone(model, text)
    finally:
        for h in handles:
            h.remove()
    return seen


def right_or_clear_error(model, cell, ns, check):
    """The cell gives the per-prompt numbers (``check(ns)``) or a clear error; never another
    number. Either way no hook stays behind."""
    try:
        ii.trace(model, cell, namespace=ns)
    except CLEAR:
        assert hook_count(model.module) == 0
        return
    assert hook_count(model.module) == 0
    check(ns)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


STEER = torch.randn(128, generator=torch.Generator().manual_seed(0))


def scaled_each(demo, ns):
    """Prompt i's block 2 output scaled by [1.0, 0.0, 0.5][i], each alone."""
    for out, s, text in zip(ns["outs"], [1.0, 0.0, 0.5], PROMPTS):
        close(out, alone(demo, text, 2, lambda m, a, o, s=s: o * s))


def steered_each(demo, ns):
    """Prompt i's last position at block 2 steered by [1.0, -2.0, 0.5][i] * STEER, each alone."""
    for c, text, out in zip([1.0, -2.0, 0.5], PROMPTS, ns["outs"]):
        close(out, alone(demo, text, 2, lambda m, a, o, c=c: torch.cat(
            [o[:, :-1], o[:, -1:] + c * STEER], 1)))


def steered_then_doubled(demo, ns):
    """The first invoke adds STEER to block 2, the second 2 * STEER, each alone."""
    close(ns["o1"], alone(demo, PROMPT, 2, lambda m, a, o: o + STEER))
    close(ns["o2"], alone(demo, CORRUPT, 2, lambda m, a, o: o + 2 * STEER))


# -- 1. a name the set-up binds (loop variable, assignment between invokes) and one invoke
#       also binds is taken from that invoke ----------------------------------------------

def test_loop_variable_also_bound_in_the_clean_invoke(demo):
    """The seeds' one-forward patching with the same loop variable in both places."""
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT}
    cell = ("with tracer.invoke(a):\n"
            "    clean = []\n"
            "    for l in range(4):\n"
            "        clean.append(model.transformer.h[l].output[:, -1])\n"
            "res = []\n"
            "for l in range(4):\n"
            "    with tracer.invoke(b):\n"
            "        model.transformer.h[l].output[:, -1] = clean[l]\n"
            "        res.append(model.lm_head.output[0, -1])\n")

    def check(ns):
        clean = block_outputs(demo, PROMPT)
        for layer in range(4):
            patch = (lambda m, a, o, c=clean[layer]:
                     torch.cat([o[:, :-1], c[:, -1:]], 1))
            close(ns["res"][layer], alone(demo, CORRUPT, layer, patch))

    right_or_clear_error(demo, cell, ns, check)


def test_assignment_between_invokes_of_a_name_an_earlier_invoke_binds(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT}
    cell = ("with tracer.invoke(a):\n"
            "    s = 0.0\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output * s\n"
            "s = 1.0\n"
            "with tracer.invoke(b):\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output * s\n"
            "    o = model.lm_head.output[0, -1]\n")
    right_or_clear_error(demo, cell, ns, lambda ns: close(ns["o"], alone(demo, CORRUPT)))


# -- 2. functions defined in the cell read the notebook's globals at forward time ----------

def test_helper_defined_in_the_cell_reads_the_loop_variable(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("def steer(h):\n"
            "    return h * s\n"
            "outs = []\n"
            "for s, p in zip([1.0, 0.0, 0.5], prompts):\n"
            "    with tracer.invoke(p):\n"
            "        model.transformer.h[2].output = steer(model.transformer.h[2].output)\n"
            "        outs.append(model.lm_head.output[0, -1])\n")

    right_or_clear_error(demo, cell, ns, lambda ns: scaled_each(demo, ns))


def test_lambda_made_in_the_loop_of_invokes_reads_the_loop_variable(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "for s, p in zip([1.0, 0.0, 0.5], prompts):\n"
            "    f = lambda h: h * s\n"
            "    with tracer.invoke(p):\n"
            "        model.transformer.h[2].output = f(model.transformer.h[2].output)\n"
            "        outs.append(model.lm_head.output[0, -1])\n")

    right_or_clear_error(demo, cell, ns, lambda ns: scaled_each(demo, ns))


def test_helper_reads_a_name_the_invoke_binds_with_a_stale_global(demo):
    ns = {"model": demo, "a": PROMPT, "h": torch.zeros(3)}  # left by an earlier cell
    cell = ("def size():\n"
            "    return h.norm()\n"
            "with tracer.invoke(a):\n"
            "    h = model.transformer.h[2].output\n"
            "    n = size()\n")

    def check(ns):
        close(ns["n"], block_outputs(demo, PROMPT)[2].norm())

    right_or_clear_error(demo, cell, ns, check)


def test_patching_through_a_helper_uses_a_stale_global(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT, "clean": torch.zeros(128)}
    cell = ("def patch(h):\n"
            "    h[:, -1] = clean\n"
            "with tracer.invoke(a):\n"
            "    clean = model.transformer.h[1].output[:, -1]\n"
            "with tracer.invoke(b):\n"
            "    patch(model.transformer.h[1].output)\n"
            "    o = model.lm_head.output[0, -1]\n")

    def check(ns):
        clean = block_outputs(demo, PROMPT)[1]
        close(ns["o"], alone(demo, CORRUPT, 1,
                             lambda m, a, o: torch.cat([o[:, :-1], clean[:, -1:]], 1)))

    right_or_clear_error(demo, cell, ns, check)


# -- 3. reads that are not snapshots ------------------------------------------------------

def test_read_then_in_place_method_on_the_site(demo):
    ns = {"model": demo, "a": PROMPT}
    cell = ("with tracer.invoke(a):\n"
            "    pat = model.transformer.h[1].output\n"
            "    model.transformer.h[1].output.mul_(0)\n")
    right_or_clear_error(demo, cell, ns, lambda ns: close(
        ns["pat"][0, -1], block_outputs(demo, PROMPT)[1][0, -1]))


def test_read_then_edit_through_a_helper(demo):
    ns = {"model": demo, "a": PROMPT}
    cell = ("def zero_last(x):\n"
            "    x[:, -1] = 0\n"
            "with tracer.invoke(a):\n"
            "    pat = model.transformer.h[1].output\n"
            "    zero_last(model.transformer.h[1].output)\n")
    right_or_clear_error(demo, cell, ns, lambda ns: close(
        ns["pat"][0, -1], block_outputs(demo, PROMPT)[1][0, -1]))


# -- 4. positive positions in invokes of different lengths (issue 27: each invoke sees its
#       own prompt's positions; tests/test_invoke_positions.py has the rest) --------------

def test_position_from_the_start_in_a_shorter_invoke(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "for p in prompts:\n"
            "    with tracer.invoke(p):\n"
            "        outs.append(model.transformer.h[1].output[0, 2])\n")

    def check(ns):
        for out, text in zip(ns["outs"], PROMPTS):
            close(out, block_outputs(demo, text)[1][0, 2])

    right_or_clear_error(demo, cell, ns, check)


def test_mean_over_positions_in_a_shorter_invoke(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "for p in prompts:\n"
            "    with tracer.invoke(p):\n"
            "        outs.append(model.transformer.h[1].output.mean(1)[0])\n")

    def check(ns):
        for out, text in zip(ns["outs"], PROMPTS):
            close(out, block_outputs(demo, text)[1].mean(1)[0])

    right_or_clear_error(demo, cell, ns, check)


# -- 5. statements between invokes that read an invoke's name the set-up also binds ---------

def test_statement_after_an_invoke_in_its_loop_reads_the_set_up_value(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("total = 0.0\n"
            "x = 0.0\n"
            "for p in prompts:\n"
            "    with tracer.invoke(p):\n"
            "        x = model.lm_head.output[0, -1].max()\n"
            "    total = total + x\n")

    def check(ns):
        expected = sum(float(alone(demo, text).max()) for text in PROMPTS)
        assert abs(float(ns["total"]) - expected) < 1e-3

    right_or_clear_error(demo, cell, ns, check)


def test_statement_before_an_invoke_in_its_loop_reads_the_previous_item(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "prev = None\n"
            "for p in prompts:\n"
            "    outs.append(prev)\n"
            "    with tracer.invoke(p):\n"
            "        prev = model.lm_head.output[0, -1]\n")

    def check(ns):
        assert ns["outs"][0] is None
        for out, text in zip(ns["outs"][1:], PROMPTS):
            close(out, alone(demo, text))

    right_or_clear_error(demo, cell, ns, check)


# -- 6. a list made before the invokes fills in forward order, not invoke order ------------

def test_list_made_before_the_loop_is_in_invoke_order(demo):
    ns = {"model": demo, "a": PROMPT}
    cell = ("layers = [3, 2, 1, 0]\n"
            "outs = []\n"
            "for layer in layers:\n"
            "    with tracer.invoke(a):\n"
            "        outs.append(model.transformer.h[layer].output[0, -1])\n")

    def check(ns):
        seen = block_outputs(demo, PROMPT)
        for layer, out in zip(ns["layers"], ns["outs"]):
            close(out, seen[layer][0, -1])

    right_or_clear_error(demo, cell, ns, check)


# -- 7. an in-place change between invokes reaches the invokes registered before it --------


def test_tensor_changed_in_place_between_invokes(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT, "vec": STEER.clone()}
    cell = ("with tracer.invoke(a):\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output + vec\n"
            "    o1 = model.lm_head.output[0, -1]\n"
            "vec *= 2\n"
            "with tracer.invoke(b):\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output + vec\n"
            "    o2 = model.lm_head.output[0, -1]\n")

    right_or_clear_error(demo, cell, ns, lambda ns: steered_then_doubled(demo, ns))


def test_settings_dict_changed_in_a_loop_of_invokes(demo):
    ns = {"model": demo, "prompts": PROMPTS, "vec": STEER}
    cell = ("cfg = {}\n"
            "outs = []\n"
            "for c, p in zip([1.0, -2.0, 0.5], prompts):\n"
            "    cfg['coef'] = c\n"
            "    with tracer.invoke(p):\n"
            "        model.transformer.h[2].output[:, -1] += cfg['coef'] * vec\n"
            "        outs.append(model.lm_head.output[0, -1])\n")

    right_or_clear_error(demo, cell, ns, lambda ns: steered_each(demo, ns))


# -- 8. a name local to a function defined inside an invoke counts as the invoke's ----------

def test_local_of_a_function_in_an_invoke_takes_over_the_loop_variable(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT}
    cell = ("with tracer.invoke(a):\n"
            "    def first(hs):\n"
            "        for layer in range(len(hs)):\n"
            "            pass\n"
            "        return hs[0]\n"
            "    h0 = first([model.transformer.h[0].output])\n"
            "outs = []\n"
            "for layer in [1, 2]:\n"
            "    with tracer.invoke(b):\n"
            "        model.transformer.h[layer].output[:] = 0\n"
            "        outs.append(model.lm_head.output[0, -1])\n")

    def check(ns):
        for layer, out in zip([1, 2], ns["outs"]):
            close(out, alone(demo, CORRUPT, layer, lambda m, a, o: o * 0))

    right_or_clear_error(demo, cell, ns, check)


# -- confusing errors -----------------------------------------------------------------------

@pytest.mark.parametrize("word", ["break", "continue"])
def test_break_in_an_invoke_of_a_loop_is_a_clear_error(demo, word):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "for p in prompts:\n"
            "    with tracer.invoke(p):\n"
            "        outs.append(model.lm_head.output[0, -1])\n"
            "        if len(outs) == 2:\n"
            f"            {word}\n")
    with pytest.raises(CellSyntaxError, match="invoke") as info:
        ii.trace(demo, cell, namespace=ns)
    assert info.value.line == 6
    assert hook_count(demo.module) == 0 and "outs" not in ns


# -- more ways for a cell's function or an object to see one value for every invoke ---------

LOOP = ("outs = []\n"
        "for s, p in zip([1.0, 0.0, 0.5], prompts):\n"
        "{pre}"
        "    with tracer.invoke(p):\n"
        "        model.transformer.h[2].output = {call}(model.transformer.h[2].output)\n"
        "        outs.append(model.lm_head.output[0, -1])\n")


def test_helper_reads_the_loop_variable_through_another_helper(demo):
    cell = ("def g(h):\n    return h * s\n"
            "def steer(h):\n    return g(h)\n" + LOOP.format(pre="", call="steer"))
    right_or_clear_error(demo, cell, {"model": demo, "prompts": PROMPTS},
                         lambda ns: scaled_each(demo, ns))


def test_lambda_in_a_dict_reads_the_loop_variable(demo):
    cell = LOOP.format(pre="    fns = {'f': lambda h: h * s}\n", call="fns['f']")
    right_or_clear_error(demo, cell, {"model": demo, "prompts": PROMPTS},
                         lambda ns: scaled_each(demo, ns))


def test_method_of_a_cell_class_reads_the_loop_variable(demo):
    cell = ("class Steer:\n    def __call__(self, h):\n        return h * s\n"
            "st = Steer()\n" + LOOP.format(pre="", call="st"))
    right_or_clear_error(demo, cell, {"model": demo, "prompts": PROMPTS},
                         lambda ns: scaled_each(demo, ns))


def test_tensor_changed_in_place_through_an_alias_between_invokes(demo):
    ns = {"model": demo, "a": PROMPT, "b": CORRUPT, "vec": STEER}
    cell = ("w = vec.clone()\n"
            "with tracer.invoke(a):\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output + w\n"
            "    o1 = model.lm_head.output[0, -1]\n"
            "alias = w\n"
            "alias *= 2\n"
            "with tracer.invoke(b):\n"
            "    model.transformer.h[2].output = model.transformer.h[2].output + w\n"
            "    o2 = model.lm_head.output[0, -1]\n")

    right_or_clear_error(demo, cell, ns, lambda ns: steered_then_doubled(demo, ns))


def test_tensor_in_a_list_filled_in_place_in_a_loop_of_invokes(demo):
    ns = {"model": demo, "prompts": PROMPTS, "vec": STEER}
    cell = ("coefs = [torch.tensor(1.0)]\n"
            "outs = []\n"
            "for c, p in zip([1.0, -2.0, 0.5], prompts):\n"
            "    coefs[0].fill_(c)\n"
            "    with tracer.invoke(p):\n"
            "        model.transformer.h[2].output[:, -1] += coefs[0] * vec\n"
            "        outs.append(model.lm_head.output[0, -1])\n")
    ns["torch"] = torch

    right_or_clear_error(demo, cell, ns, lambda ns: steered_each(demo, ns))


# -- ordinary patterns that must keep running (they give the right numbers today) -----------

def test_dict_of_lists_made_between_invokes_runs(demo):
    """`res[layer] = []` between invokes, then each invoke appends to `res[layer]`: every item
    of the dict is made once and never changed, so this is unambiguous and must not be refused."""
    ns = {"model": demo, "prompts": PROMPTS}
    ii.trace(demo, "res = {}\n"
                   "for layer in range(2):\n"
                   "    res[layer] = []\n"
                   "    for p in prompts:\n"
                   "        with tracer.invoke(p):\n"
                   "            model.transformer.h[layer].output[:, -1] = 0\n"
                   "            res[layer].append(model.lm_head.output[0, -1])\n", namespace=ns)
    for layer in range(2):
        assert len(ns["res"][layer]) == len(PROMPTS)
        for out, text in zip(ns["res"][layer], PROMPTS):
            close(out, alone(demo, text, layer, lambda m, a, o: torch.cat(
                [o[:, :-1], o[:, -1:] * 0], 1)))


def test_labels_appended_between_invokes_run(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    ii.trace(demo, "outs, labels = [], []\n"
                   "for p in prompts:\n"
                   "    labels.append(p[:4])\n"
                   "    with tracer.invoke(p):\n"
                   "        outs.append(model.lm_head.output[0, -1])\n", namespace=ns)
    assert ns["labels"] == [p[:4] for p in PROMPTS]
    for out, text in zip(ns["outs"], PROMPTS):
        close(out, alone(demo, text))


def test_invoke_inside_match_is_run_or_named(demo):
    ns = {"model": demo, "prompts": PROMPTS}
    cell = ("outs = []\n"
            "for p in prompts:\n"
            "    match p:\n"
            "        case str():\n"
            "            with tracer.invoke(p):\n"
            "                outs.append(model.lm_head.output[0, -1])\n")
    try:
        ii.trace(demo, cell, namespace=ns)
    except CellSyntaxError as exc:
        assert "match" in str(exc)
        return
    for out, text in zip(ns["outs"], PROMPTS):
        close(out, alone(demo, text))


# -- the same through %%trace in IPython --------------------------------------------------

def test_shell_loop_variable_also_bound_in_the_clean_invoke(shell, demo):
    shell.user_ns.update(a=PROMPT, b=CORRUPT)
    try:
        shell.run_cell("%%trace model\n"
                       "with tracer.invoke(a):\n"
                       "    clean = []\n"
                       "    for l in range(4):\n"
                       "        clean.append(model.transformer.h[l].output[:, -1])\n"
                       "res = []\n"
                       "for l in range(4):\n"
                       "    with tracer.invoke(b):\n"
                       "        model.transformer.h[l].output[:, -1] = clean[l]\n"
                       "        res.append(model.lm_head.output[0, -1])\n")
    except CLEAR:
        assert hook_count(demo.module) == 0
        return
    clean = block_outputs(demo, PROMPT)
    for layer in range(4):
        close(shell.user_ns["res"][layer], alone(demo, CORRUPT, layer, lambda m, a, o, c=clean[layer]:
                                                 torch.cat([o[:, :-1], c[:, -1:]], 1)))


def test_shell_position_from_the_start_in_a_shorter_invoke(shell, demo):
    shell.user_ns["prompts"] = PROMPTS
    try:
        shell.run_cell("%%trace model\n"
                       "outs = []\n"
                       "for p in prompts:\n"
                       "    with tracer.invoke(p):\n"
                       "        outs.append(model.transformer.h[1].output[0, 2])\n")
    except CLEAR:
        assert hook_count(demo.module) == 0
        return
    for out, text in zip(shell.user_ns["outs"], PROMPTS):
        close(out, block_outputs(demo, text)[1][0, 2])


# -- state changed by the set-up in ways invoke_setup.check_setup does not see (ea267c9) ----

@pytest.mark.parametrize("define, pre, expr", [
    pytest.param("class Cfg:\n    def set(self, v):\n        self.v = v\ncfg = Cfg()\n",
                 "    cfg.set(s)\n", "cfg.v", id="method-setter"),
    pytest.param("def set_scale(v):\n    global scale\n    scale = v\n",
                 "    set_scale(s)\n", "scale", id="global-setter"),
    pytest.param("class Cfg:\n    pass\ncfg = Cfg()\n",
                 "    setattr(cfg, 'v', s)\n", "cfg.v", id="setattr"),
])
def test_state_set_by_a_call_in_a_loop_of_invokes(demo, define, pre, expr):
    cell = define + LOOP.format(pre=pre, call="").replace(
        "= (model.transformer.h[2].output)", f"= model.transformer.h[2].output * {expr}")
    right_or_clear_error(demo, cell, {"model": demo, "prompts": PROMPTS},
                         lambda ns: scaled_each(demo, ns))


def test_helper_called_through_another_name_reads_the_loop_variable(demo):
    cell = "def f(h):\n    return h * s\ng = f\n" + LOOP.format(pre="", call="g")
    right_or_clear_error(demo, cell, {"model": demo, "prompts": PROMPTS},
                         lambda ns: scaled_each(demo, ns))


# -- appends in invoke order (ea267c9): what other ways of filling a list do ---------------

def layer_outputs_in_order(demo, layers, outs):
    seen = block_outputs(demo, PROMPT)
    assert len(outs) == len(layers)
    for layer, out in zip(layers, outs):
        close(out, seen[layer][0, -1])


def test_last_item_right_after_append_is_the_invokes_own(demo):
    ns = {"model": demo, "a": PROMPT}
    cell = ("outs = []\n"
            "mine = {}\n"
            "for layer in [3, 0]:\n"
            "    with tracer.invoke(a):\n"
            "        outs.append(model.transformer.h[layer].output[0, -1])\n"
            "        mine[layer] = outs[-1]\n")
    right_or_clear_error(demo, cell, ns, lambda ns: layer_outputs_in_order(
        demo, [3, 0], [ns["mine"][3], ns["mine"][0]]))


def test_index_taken_after_append_points_at_the_invokes_item(demo):
    ns = {"model": demo, "a": PROMPT}
    cell = ("outs = []\n"
            "idx = {}\n"
            "for layer in [3, 0]:\n"
            "    with tracer.invoke(a):\n"
            "        outs.append(model.transformer.h[layer].output[0, -1])\n"
            "        idx[layer] = len(outs) - 1\n")
    right_or_clear_error(demo, cell, ns, lambda ns: layer_outputs_in_order(
        demo, [3, 0], [ns["outs"][ns["idx"][3]], ns["outs"][ns["idx"][0]]]))


@pytest.mark.parametrize("fill", ["res['x'].append({v})", "outs.extend([{v}])"])
def test_other_ways_of_filling_a_shared_list_are_in_invoke_order(demo, fill):
    ns = {"model": demo, "a": PROMPT}
    cell = ("outs = []\n"
            "res = {'x': outs}\n"
            "layers = [3, 2, 1, 0]\n"
            "for layer in layers:\n"
            "    with tracer.invoke(a):\n"
            f"        {fill.format(v='model.transformer.h[layer].output[0, -1]')}\n")
    right_or_clear_error(demo, cell, ns,
                         lambda ns: layer_outputs_in_order(demo, ns["layers"], ns["outs"]))
